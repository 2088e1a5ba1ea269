"""Held-out loss and perplexity: token-weighted cross-entropy over response tokens."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ila.errors import IlaError

if TYPE_CHECKING:
    from torch import nn

_COLUMNS = ("input_ids", "attention_mask", "labels")


def _row(item: Mapping[str, Any], index: int) -> dict[str, Any]:
    if "input_ids" not in item or "labels" not in item:
        keys = ", ".join(sorted(map(str, item))) or "none"
        raise IlaError(f"held-out example {index}: missing 'input_ids' or 'labels' (fields present: {keys}); "
                       "expected a dataset from ila.data.build_dataset")
    return {k: item[k] for k in _COLUMNS if k in item}


def heldout_loss(model: nn.Module, dataset: Sequence[Mapping[str, Any]], collator: Callable[[list[dict]], Any], *,
                 batch_size: int = 8) -> dict[str, float | int]:
    """Mean next-token cross-entropy over all response tokens of DATASET (labels != -100), and its exp.

    DATASET holds tokenised examples (`input_ids`, `attention_mask`, `labels`, as `ila.data.build_dataset`
    makes them) and COLLATOR pads a list of them (`ila.data.collate`). The loss is weighted by tokens over the
    whole set: sum of per-token losses / number of response tokens, not a mean of per-batch means. Runs under
    `torch.no_grad()` with the model in eval mode (its previous mode is restored).

    Returns `loss`, `perplexity` (exp(loss); inf on overflow), `tokens` (response tokens scored) and
    `examples`.
    """
    import torch

    from ila.training.loss import response_loss

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise IlaError(f"batch_size is {batch_size!r}, expected a positive integer")
    n = len(dataset)
    if n == 0:
        raise IlaError("held-out set is empty, expected at least one example")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                rows = [_row(dataset[i], i) for i in range(start, min(n, start + batch_size))]
                batch = collator(rows)
                batch = {k: batch[k].to(device) for k in _COLUMNS if k in batch}
                count = int((batch["labels"][:, 1:] != -100).sum())
                if count == 0:
                    continue
                total += float(response_loss(model, batch)) * count
                tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise IlaError(f"held-out set of {n} example(s) has no response tokens to score "
                       "(all labels are -100)")
    loss = total / tokens
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens, "examples": n}
