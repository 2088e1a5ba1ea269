"""grad-norm: the Fisher-style mean squared gradient of the task loss with respect to each layer's base weight.

On the untrained model (no stage-1 update): over a few batches of the data, score_i = mean over batches b and
entries of (∂L_b/∂Wᵢ)², the diagonal empirical Fisher of the layer averaged over its entries — how strongly the
data pulls on the layer before any fine-tuning (a data-dependent signal; see seeds/002's closing discussion of
cheap empirical proxies).
"""

from __future__ import annotations

from dataclasses import dataclass

from ila.importance.base import NEEDS_DATA, NEEDS_MODEL, ImportanceMethod, Inputs, Scores, register
from ila.options import option, positive


@dataclass
class GradNormOptions:
    batches: int = option(8, "grad-norm: batches the squared gradient is averaged over", check=positive,
                          flag="--grad-norm-batches")
    batch_size: int = option(4, "grad-norm: batch size", check=positive)


def score(inputs: Inputs) -> Scores:
    import torch

    from ila.layers import base_model_of
    from ila.training.loss import batch_losses

    options: GradNormOptions = inputs.options
    n = min(options.batches * options.batch_size, len(inputs.train))
    from ila.data import seeded_subset
    data = seeded_subset(inputs.train, n, inputs.config.sample_seed)
    model = inputs.model
    base = base_model_of(model)
    weights = [base.get_submodule(x.name).weight for x in inputs.layers]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    totals = torch.zeros(len(weights), dtype=torch.float64)
    batches = 0
    model.eval()
    for loss in batch_losses(model, data, inputs.collator, options.batch_size,
                             bf16=inputs.config.dtype == "bfloat16"):
        grads = torch.autograd.grad(loss, weights)
        totals += torch.stack([g.float().pow(2).mean().double().cpu() for g in grads])
        batches += 1
    return Scores((totals / max(batches, 1)).tolist(), {"batches": batches, "examples": n})


register(ImportanceMethod(
    name="grad-norm",
    summary="mean squared gradient of the loss w.r.t. each layer's base weight on the untrained model (Fisher-style)",
    needs=frozenset({NEEDS_MODEL, NEEDS_DATA}),
    score=score,
    options=GradNormOptions,
    title="mean (∂L/∂W)²",
))
