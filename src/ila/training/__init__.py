"""Training on the HF Trainer: the response-only loss, the Trainer subclass that uses it, cost callbacks, the
training methods (`methods.py`) and strategies (`strategies/`). Attributes load lazily, so that the command line
can list strategies without importing torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"CostCallback": "ila.training.cost", "peak_memory_bytes": "ila.training.cost",
            "response_loss": "ila.training.loss", "ResponseLossTrainer": "ila.training.trainer",
            "training_arguments": "ila.training.trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ila.training' has no attribute {name!r}")
