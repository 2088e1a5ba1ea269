"""ila-fast: first-order ILA, −∂L/∂γᵢ at γ = 1 on the stage-1 update (no stage-2 optimisation).

ILA's stage 2 (seeds/000 Eq. 7) minimises L(θ₀ + γ ⊙ ΔW) over the gates γ under the budget Σγᵢ ≤ H. Linearised
at γ = 1 (the fine-tuned model), L(γ) ≈ L(1) + Σᵢ ∂L/∂γᵢ · (γᵢ − 1), where ∂L/∂γᵢ = ⟨∇_{Wᵢ}L, ΔWᵢ⟩. Under the
budget the linear model gives up first the gates whose update lowers the loss least (largest ∂L/∂γᵢ), so the
ranking by −∂L/∂γᵢ is the first-order answer to Eq. 7, at the cost of one forward and backward pass per batch.
It cannot see interactions between layers: two updates that do the same work each look useful alone, and the
curvature that makes the loss saturate as gates close (what stage 2 follows step by step) is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

from ila.importance.base import NEEDS_DATA, NEEDS_MODEL, NEEDS_UPDATE, ImportanceMethod, Inputs, Scores, register
from ila.options import option, positive


@dataclass
class IlaFastOptions:
    examples: int = option(64, "ila-fast: training examples the gradient is averaged over (token-weighted)",
                           check=positive, flag="--ila-fast-examples")
    batch_size: int = option(4, "ila-fast: batch size of the gradient passes", check=positive)


def score(inputs: Inputs) -> Scores:
    import torch

    from ila.gates import LayerGates
    from ila.importance.stage2 import gate_gradient

    options: IlaFastOptions = inputs.options
    from ila.data import seeded_subset
    data = seeded_subset(inputs.train, options.examples, inputs.config.sample_seed)
    model = inputs.update.model
    for p in model.parameters():
        p.requires_grad_(False)
    gates = LayerGates(inputs.layers).attach(model, inputs.update.initial)
    try:
        gradient = gate_gradient(model, gates, data, inputs.collator, options.batch_size,
                                 values=torch.ones(len(inputs.layers)), bf16=inputs.config.dtype == "bfloat16")
    finally:
        gates.detach()
    return Scores([-g for g in gradient], {"examples": len(data)})


register(ImportanceMethod(
    name="ila-fast",
    summary="first-order ILA: −∂L/∂γᵢ = −⟨∇_W L, ΔWᵢ⟩ at γ = 1 on the stage-1 update, no stage 2",
    needs=frozenset({NEEDS_MODEL, NEEDS_DATA, NEEDS_UPDATE}),
    score=score,
    options=IlaFastOptions,
    title="ila-fast −∂L/∂γᵢ",
))
