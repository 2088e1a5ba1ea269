"""ila: identify the layers that matter for a fine-tune (ILA, seeds/000) and spend compute only there.

    import ila
    ranking = ila.identify("runs/x", model="smollm2-135m", data="alpaca.jsonl", max_steps=100)
    ranking.top(0.75); ranking.jaccard(ila.Ranking.load("runs/y/ranking.json"))

Attributes load lazily so that `ila --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "identify": "ila.api",
    "identify_options": "ila.api",
    "list_methods": "ila.api",
    "list_datasets": "ila.api",
    "list_strategies": "ila.api",
    "train_options": "ila.api",
    "train": "ila.api",
    "analyze": "ila.api",
    "analyze_options": "ila.api",
    "experiment": "ila.api",
    "evaluate": "ila.api",
    "export": "ila.exports",
    "peft_config": "ila.exports",
    "prepare_strategy": "ila.integration",
    "rank_update": "ila.integration",
    "TrainConfig": "ila.config",
    "select_layers": "ila.selection",
    "Selection": "ila.selection",
    "compare": "ila.comparison",
    "format_comparison": "ila.comparison",
    "write_comparison": "ila.comparison",
    "Comparison": "ila.comparison",
    "Ranking": "ila.ranking",
    "LayerScore": "ila.ranking",
    "LayerId": "ila.layers",
    "discover_layers": "ila.layers",
    "LayerGates": "ila.gates",
    "IdentifyConfig": "ila.config",
    "load_config": "ila.config",
    "load_model": "ila.models",
    "load_data": "ila.data",
    "IlaError": "ila.errors",
    "StabilityDetector": "ila.importance.stability",
    "StabilityCallback": "ila.importance.stability",
    "plot_heatmap": "ila.report",
    "plot_agreement": "ila.report",
    "write_report": "ila.report.html",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ila' has no attribute {name!r}")
