"""weight-norm: LISA's mean weight norm of each layer over the stage-1 steps (seeds/002, LISA: "record mean
norms of each layer at every step", w⁽ℓ⁾ = (1/T) Σₜ ‖θₜ⁽ℓ⁾‖).

θₜ⁽ℓ⁾ is what stage 1 trains in layer ℓ: the LoRA weight β·Bₜ·Aₜ (LoRA stage 1; LISA's LoRA observation) or
the full weight Wₜ (full stage 1). A callback records the Frobenius norms after every optimizer step; the score
is their mean. It needs stage 1 trained in this run (a given --adapter has no steps to average over); the norms
are saved with each stage-1 checkpoint, so a resumed stage 1 keeps the steps before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ila.errors import IlaError
from ila.importance.base import NEEDS_MODEL, NEEDS_UPDATE, ImportanceMethod, Inputs, Scores, register

NORMS_FILE = "weight_norms.json"  # beside each stage-1 checkpoint

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainerCallback

    from ila.layers import LayerId


def lora_weight_norm(module: nn.Module, adapter: str = "default") -> float:
    """‖β·B·A‖_F of a PEFT LoRA layer, from the r × r Gram matrices: ‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ) (cheaper than
    forming B·A, so it can run after every step)."""
    import torch

    a, b = module.lora_A[adapter].weight.detach().double(), module.lora_B[adapter].weight.detach().double()
    square = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
    return float(module.scaling[adapter] * torch.sqrt(square))


def track(model: nn.Module, layers: list[LayerId]) -> TrainerCallback:
    """A TrainerCallback that appends every layer's weight norm after each optimizer step, saves the norms with
    each stage-1 checkpoint and reads them back when stage 1 resumes from one."""
    import torch
    from transformers import TrainerCallback

    from ila.io import read_json, write_json_atomic
    from ila.layers import base_model_of

    modules = [base_model_of(model).get_submodule(layer.name) for layer in layers]

    class WeightNormCallback(TrainerCallback):
        def __init__(self) -> None:
            self.norms: list[list[float]] = []  # one row per optimizer step
            self.started = False

        def restore(self, args, state) -> None:
            """Once, before the first step (or at the end, when a resumed run has none left): the rows of the
            steps before the checkpoint stage 1 resumed from."""
            if not self.started and state.global_step > 0:
                path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / NORMS_FILE
                if not path.is_file():
                    raise IlaError(f"weight-norm: {path} is missing, so the steps before the checkpoint have no "
                                   "norms; run again without --resume")
                self.norms = read_json(path, f"weight-norm: {path}")
            self.started = True

        def on_step_begin(self, args, state, control, **kwargs):
            self.restore(args, state)

        def on_train_end(self, args, state, control, **kwargs):
            self.restore(args, state)

        def on_step_end(self, args, state, control, **kwargs):
            self.norms.append([lora_weight_norm(m) if hasattr(m, "lora_A") else
                               float(torch.linalg.matrix_norm(m.weight.detach().double())) for m in modules])

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_json_atomic(Path(args.output_dir) / f"checkpoint-{state.global_step}" / NORMS_FILE,
                                  self.norms)

    return WeightNormCallback()


def score(inputs: Inputs) -> Scores:
    norms = inputs.tracked.norms
    if not norms:
        raise IlaError("weight-norm: stage 1 ran no step in this process, so there are no norms to average")
    return Scores([sum(row[i] for row in norms) / len(norms) for i in range(len(inputs.layers))],
                  {"tracked_steps": len(norms)})


register(ImportanceMethod(
    name="weight-norm",
    summary="LISA's mean norm of each layer's trained weight over the stage-1 steps (seeds/002)",
    needs=frozenset({NEEDS_MODEL, NEEDS_UPDATE}),
    score=score,
    title="mean weight norm",
    track=track,
))
