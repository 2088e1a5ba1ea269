"""ILA stage 2 (seeds/000 Sec. 3, Eq. 5–7, Def. 2): learn one importance score per layer.

The backbone and the stage-1 update are frozen. Each layer's update is scaled by the gate γᵢ = σ(sᵢ), and the
scores s minimise the task loss under the budget of Def. 2, ‖γ‖ < H, realised as a hinge penalty on the L1
norm of the gates (γ ≥ 0, so ‖γ‖₁ = Σγᵢ):

    min_s  E_z[L(z; θ₀ + σ(s) ⊙ ΔW)] + λ · max(0, Σᵢ σ(sᵢ) − H),     H = budget · N.

While the gates sum above H, every score feels the same downward push λ·σ'(sᵢ); a layer keeps its gate only
if its update lowers the loss by more than λ per unit of gate. Layers whose update does not help therefore
fall below those whose update does; once Σσ(s) ≤ H the penalty is silent and only the task loss acts.
Scores start at s₀ (`init_score`, App. C.4) and are optimised by AdamW without weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ila.config import IdentifyConfig
from ila.gates import LayerGates
from ila.layers import LayerId, base_model_of
from ila.training import CostCallback, ResponseLossTrainer, training_arguments


@dataclass
class Stage2Result:
    """Learned scores (model order of `layers`) and what stage 2 measured."""

    scores: list[float]
    losses: list[float]
    cost: dict[str, float]
    cost_steps_ms: list[float]  # wall time of every optimizer step


def budget_penalty(gates: LayerGates, budget: float, weight: float) -> torch.Tensor:
    """λ · max(0, Σσ(s) − budget·N)."""
    g = gates.gates()
    return weight * torch.relu(g.sum() - budget * g.numel())


def run_stage2(
    model: nn.Module,
    layers: list[LayerId],
    train_dataset,
    collator,
    config: IdentifyConfig,
    work_dir: Path,
    *,
    initial: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Stage2Result:
    """Learn the scores of `layers` on `model` (a PEFT LoRA model, or a fully tuned one with `initial` θ₀)."""
    s2 = config.stage2
    for p in model.parameters():
        p.requires_grad_(False)
    gates = LayerGates(layers, init_score=s2.init_score)
    if initial is None:
        gates.attach_lora(model)
    else:
        gates.attach_full(model, initial)
    # Registered as a submodule so the Trainer's optimizer (and DDP under accelerate) sees exactly the scores.
    base = base_model_of(model)
    base.add_module("ila_gates", gates)
    cost = CostCallback()
    args = training_arguments(
        work_dir,
        max_steps=s2.steps,
        batch_size=s2.batch_size,
        learning_rate=s2.learning_rate,
        seed=config.seed,
        scheduler="constant",
        report_to=config.report_to,
        bf16=config.dtype == "bfloat16",
    )
    trainer = ResponseLossTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[cost],
        extra_loss=lambda: budget_penalty(gates, s2.budget, s2.budget_weight),
        frozen_eval=True,
    )
    try:
        trainer.train()
    finally:
        gates.detach()
        del base._modules["ila_gates"]
    return Stage2Result(
        scores=gates.scores.detach().float().cpu().tolist(),
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        cost=cost.summary(model, trainer.state.num_input_tokens_seen),
        cost_steps_ms=list(cost.step_ms),
    )
