"""The Python API; the CLI calls exactly these functions."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ila.config import IdentifyConfig, load_config
from ila.errors import IlaError
from ila.ranking import Ranking

# Keyword options of `identify` (the CLI's options) and the config field each one sets.
IDENTIFY_OPTIONS = {
    "model": "model",
    "data": "data",
    "adapter": "adapter",
    "seed": "seed",
    "max_examples": "max_examples",
    "max_length": "max_length",
    "max_steps": "stage1.max_steps",
    "method": "stage1.method",
    "epsilon": "stage1.epsilon",
    "milestones": "stage1.milestones",
    "stage2_steps": "stage2.steps",
    "init_score": "stage2.init_score",
    "budget": "stage2.budget",
}


def identify(
    out: str | Path,
    *,
    config: IdentifyConfig | str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> Ranking:
    """Run ILA and write the run folder `out`; returns the ranking.

    `config` is an `IdentifyConfig` or a YAML path; `options` are the CLI's options by their Python names
    (`model`, `data`, `adapter`, `seed`, `max_steps`, `stage2_steps`, `method`, `epsilon`, `init_score`,
    `budget`, `max_examples`, `max_length`, `milestones`) and override it.
    """
    from ila.importance.ila import run_identify

    unknown = sorted(set(options) - set(IDENTIFY_OPTIONS))
    if unknown:
        raise IlaError(f"identify: unknown option {unknown[0]!r} (expected one of: {', '.join(IDENTIFY_OPTIONS)})")
    overrides = {IDENTIFY_OPTIONS[k]: v for k, v in options.items()}
    if isinstance(config, IdentifyConfig):  # through the same validation as a YAML file
        given = {k: v for k, v in overrides.items() if v is not None}
        config = load_config(None, _flatten(asdict(config)) | given)
    else:
        config = load_config(config, overrides)
    return run_identify(config, out, resume=resume)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
