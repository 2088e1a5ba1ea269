"""weight-norm: LISA's mean weight norm of each layer over the stage-1 steps (seeds/002, LISA: "record mean
norms of each layer at every step", w⁽ℓ⁾ = (1/T) Σₜ ‖θₜ⁽ℓ⁾‖).

θₜ⁽ℓ⁾ is what stage 1 trains in layer ℓ: the LoRA weight β·Bₜ·Aₜ (LoRA stage 1; LISA's LoRA observation) or
the full weight Wₜ (full stage 1). A callback records the Frobenius norms after every optimizer step; the score
is their mean. It needs stage 1 trained in this run (a given --adapter has no steps to average over).
"""

from __future__ import annotations

from ila.importance.base import NEEDS_MODEL, NEEDS_UPDATE, ImportanceMethod, Inputs, Scores, register


def lora_weight_norm(module, adapter: str = "default") -> float:
    """‖β·B·A‖_F of a PEFT LoRA layer, from the r × r Gram matrices: ‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ) (cheaper than
    forming B·A, so it can run after every step)."""
    import torch

    a, b = module.lora_A[adapter].weight.detach().double(), module.lora_B[adapter].weight.detach().double()
    square = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
    return float(module.scaling[adapter] * torch.sqrt(square))


def track(model, layers):
    """A TrainerCallback that appends every layer's weight norm after each optimizer step."""
    import torch
    from transformers import TrainerCallback

    from ila.layers import base_model_of

    modules = [base_model_of(model).get_submodule(layer.name) for layer in layers]

    class WeightNormCallback(TrainerCallback):
        def __init__(self) -> None:
            self.norms: list[list[float]] = []  # one row per optimizer step

        def on_step_end(self, args, state, control, **kwargs):
            self.norms.append([lora_weight_norm(m) if hasattr(m, "lora_A") else
                               float(torch.linalg.matrix_norm(m.weight.detach().double())) for m in modules])

    return WeightNormCallback()


def score(inputs: Inputs) -> Scores:
    norms = inputs.tracked.norms
    steps = len(norms)
    means = [sum(row[i] for row in norms) / steps for i in range(len(inputs.layers))] if steps else None
    if means is None:
        from ila.errors import IlaError

        raise IlaError("weight-norm: stage 1 ran no step in this process (a resumed run that had finished?)")
    return Scores(means, {"tracked_steps": steps})


register(ImportanceMethod(
    name="weight-norm",
    summary="LISA's mean norm of each layer's trained weight over the stage-1 steps (seeds/002)",
    needs=frozenset({NEEDS_MODEL, NEEDS_UPDATE}),
    score=score,
    title="mean weight norm",
    track=track,
))
