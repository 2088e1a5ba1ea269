"""The PEFT LoRA config of every LoRA fine-tune in `ila` (stage 1 of identify, `ila train`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def lora_config(settings: Any, target_modules: Sequence[str]):
    """A `peft.LoraConfig` adapting exactly `target_modules` (full module names) with `settings`
    (`ila.config.LoraConfig`: r, alpha, dropout)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(target_modules), task_type="CAUSAL_LM")
