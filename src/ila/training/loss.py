"""The task loss: mean next-token cross-entropy over response tokens (labels ≠ -100)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ila.layers import base_model_of


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (computing the LM head at chosen positions only)."""
    base = base_model_of(model)
    cached = getattr(base, "_ila_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(base.forward).parameters
        base._ila_logits_to_keep = cached
    return cached


def response_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the response tokens (`reduction`: "mean", equal to transformers' own causal-LM loss,
    or "sum").

    Logits are computed only at positions whose next token is a response token in some row
    (`logits_to_keep` with a position tensor, transformers ≥ 4.50): prompts are often long and the
    LM head over a 50k–260k vocabulary is a large share of a small model's step.
    """
    labels = batch["labels"]
    next_labels = labels[:, 1:]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if accepts_logits_to_keep(model):
        keep = (next_labels != -100).any(dim=0).nonzero().squeeze(1)
        logits = model(**kwargs, logits_to_keep=keep).logits
        targets = next_labels[:, keep]
    else:
        logits = model(**kwargs).logits[:, :-1]
        targets = next_labels
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)


def batch_losses(model: nn.Module, dataset: Sequence[Mapping], collator: Callable[[list], Mapping], batch_size: int,
                 *, reduction: str = "mean", bf16: bool = False) -> Iterator[torch.Tensor]:
    """`response_loss` of each consecutive batch of `dataset` (collated, on the model's device, bf16 autocast when
    asked), in order, with the graph kept for the caller's backward pass."""
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = response_loss(model, batch, reduction=reduction)
        yield loss  # outside autocast: the caller's backward pass runs as without the helper
