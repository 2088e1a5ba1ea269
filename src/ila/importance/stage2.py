"""ILA stage 2 (seeds/000 Sec. 3, Eq. 5–7, Def. 2): learn one importance score per layer, until it settles.

The backbone and the stage-1 update are frozen. Each layer's update is scaled by the gate γᵢ = σ(sᵢ), and the
scores s minimise the task loss under the budget of Def. 2, ‖γ‖ < H, realised as a hinge penalty on the L1
norm of the gates (γ ≥ 0, so ‖γ‖₁ = Σγᵢ):

    min_s  E_z[L(z; θ₀ + σ(s) ⊙ ΔW)] + λ · max(0, Σᵢ σ(sᵢ) − H),     H = budget · N.

While the gates sum above H, every score feels the same downward push λ·σ'(sᵢ); a layer keeps its gate only
if its update lowers the loss by more than λ per unit of gate. Scores start at s₀ (`init_score`, App. C.4).

The scores are optimised by AdamW on minibatches of the chosen split. Every `interval` steps the objective
(task loss + penalty) is taken on a fixed probe set of examples (no sampling noise, the same examples every time),
and stage 2 has settled when, for `patience` checks in a row, the relative change of that objective and
1 − Spearman ρ between the score vectors of consecutive checks both stay below their tolerances; `max_steps`
always caps it. (A fixed training set, whole every step, settles too, but overfits a few hundred gates to those
examples: see docs/method.md.)

Ties: the ranking orders layers with equal scores by −∂L/∂γᵢ at the final gates (the first-order loss
reduction from the layer's update), taken on the probe set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ila.gates import LayerGates
from ila.layers import LayerId, base_model_of
from ila.ranking import spearman
from ila.training import CostCallback, ResponseLossTrainer, training_arguments
from ila.training.loss import batch_losses


@dataclass
class Stage2Result:
    """Learned scores (model order of `layers`) and what stage 2 measured."""

    scores: list[float]
    losses: list[float]  # objective (task + penalty) of each optimizer step's minibatch
    task_losses: list[float]
    penalties: list[float]
    checks: list[tuple[int, float]]  # (step, objective on the probe set) at every check of the settle rule
    settled_step: int | None  # step where the stopping rule fired; None if `max_steps` came first
    steps: int  # optimizer steps taken
    gate_gradient: list[float]  # ∂L/∂γᵢ (task loss) at the final gates
    cost: dict[str, float]
    cost_steps_ms: list[float]  # wall time of every optimizer step


def budget_penalty(gates: LayerGates, budget: float, weight: float) -> torch.Tensor:
    """λ · max(0, Σσ(s) − budget·N)."""
    g = gates.gates()
    return weight * torch.relu(g.sum() - budget * g.numel())


class SettleRule:
    """Feed (objective, scores) at every check; `settled_at` is the step where both stopped moving."""

    def __init__(self, tolerance: float, order_tolerance: float, patience: int, min_steps: int = 0) -> None:
        self.tolerance, self.order_tolerance = tolerance, order_tolerance
        self.patience, self.min_steps = patience, min_steps
        self.settled_at: int | None = None
        self._last: tuple[float, list[float]] | None = None
        self._calm = 0

    def update(self, step: int, loss: float, scores: list[float]) -> bool:
        """True once the loss and the score order have been still for `patience` consecutive checks."""
        if self.settled_at is not None:
            return True
        if self._last is not None:
            last_loss, last_scores = self._last
            loss_change = abs(loss - last_loss) / max(abs(last_loss), 1e-12)
            still = scores == last_scores or len(scores) < 2
            order_change = 0.0 if still else 1.0 - spearman(last_scores, scores)
            calm = loss_change < self.tolerance and order_change < self.order_tolerance
            self._calm = self._calm + 1 if calm else 0
        self._last = (loss, list(scores))
        if self._calm >= self.patience and step >= self.min_steps:
            self.settled_at = step
        return self.settled_at is not None


class _SettleCallback(TrainerCallback):
    """At every evaluation (the probe set, every `interval` steps) feeds the objective and the scores to the rule;
    stops the Trainer once it fires."""

    def __init__(self, gates: LayerGates, rule: SettleRule, penalty) -> None:
        self.gates, self.rule, self.penalty = gates, rule, penalty
        self.checks: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        with torch.no_grad():
            objective = float(metrics["eval_loss"]) + float(self.penalty())
        self.checks.append((state.global_step, objective))
        if self.rule.update(state.global_step, objective, self.gates.scores.detach().float().cpu().tolist()):
            control.should_training_stop = True


def run_stage2(
    model: nn.Module,
    layers: list[LayerId],
    train_set,
    probe_set,
    collator,
    options: Any,
    work_dir: Path,
    *,
    seed: int,
    initial: dict[str, dict[str, torch.Tensor]] | None = None,
    report_to: str = "none",
    bf16: bool = False,
    callbacks: list | None = None,
) -> Stage2Result:
    """Learn the scores of `layers` on `model` (a PEFT LoRA model, or a fully tuned one with `initial` θ₀).

    `train_set` gives the minibatches, `probe_set` the fixed examples of the settle rule and the tie-break;
    `options` an `IlaOptions` (steps, batch, learning rate, budget, rule). Extra Trainer `callbacks` see the
    gates as `model.ila_gates` (of the base model) while it runs.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    gates = LayerGates(layers, init_score=options.init_score).attach(model, initial)
    # Registered as a submodule so the Trainer's optimizer (and DDP under accelerate) sees exactly the scores.
    base = base_model_of(model)
    base.add_module("ila_gates", gates)
    rule = SettleRule(options.tolerance, options.order_tolerance, options.patience, options.min_steps)

    def penalty() -> torch.Tensor:
        return budget_penalty(gates, options.budget, options.budget_weight)

    settle = _SettleCallback(gates, rule, penalty)
    cost = CostCallback()
    args = training_arguments(
        work_dir,
        max_steps=options.max_steps,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        seed=seed,
        scheduler="constant",
        report_to=report_to,
        bf16=bf16,
        eval_steps=options.interval,
    )
    trainer = ResponseLossTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=probe_set,
        data_collator=collator,
        callbacks=[cost, settle, *(callbacks or [])],
        extra_loss=penalty,
        frozen_eval=True,
        logging_dir=Path(work_dir).parent / "logs" / "stage2",
    )
    try:
        trainer.train()
        gradient = gate_gradient(model, gates, probe_set, collator, options.batch_size, bf16=bf16)
    finally:
        gates.detach()
        del base._modules["ila_gates"]
    history = [e for e in trainer.state.log_history if "loss" in e]
    return Stage2Result(
        scores=gates.scores.detach().float().cpu().tolist(),
        losses=[e["loss"] for e in history],
        task_losses=[e.get("task_loss") for e in history],
        penalties=[e.get("penalty") for e in history],
        checks=settle.checks,
        settled_step=rule.settled_at,
        steps=trainer.state.global_step,
        gate_gradient=gradient,
        cost=cost.summary(model, trainer.state.num_input_tokens_seen),
        cost_steps_ms=list(cost.step_ms),
    )


def gate_gradient(model: nn.Module, gates: LayerGates, dataset, collator, batch_size: int, *,
                  values: torch.Tensor | None = None, bf16: bool = False) -> list[float]:
    """∂L/∂γᵢ of the token-mean task loss over `dataset` at gate values `values` (default: the current gates),
    in eval mode, one pass, no update. The model's own parameters should not require gradients."""
    values = (gates.gates() if values is None else values).detach().clone().requires_grad_(True)
    tokens = sum(sum(1 for t in row["labels"][1:] if t != -100) for row in dataset)
    model.eval()
    with gates.fixed(values):
        for loss in batch_losses(model, dataset, collator, batch_size, reduction="sum", bf16=bf16):
            (loss / tokens).backward()
    return values.grad.float().cpu().tolist()
