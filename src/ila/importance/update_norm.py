"""update-norm: the Frobenius norm ‖ΔWᵢ‖_F of each layer's stage-1 update, or ‖ΔWᵢ‖_F / ‖W₀ᵢ‖_F.

The weight change of seeds/004 Sec. 3.2 (Eq. 1), per linear layer, and the observation behind LISA (seeds/002)
that fine-tuning moves some layers' weights far more than others. ΔW is β·B·A for a LoRA update (Eq. 4 of
seeds/000) and θ_t − θ₀ for a full one. A layer that moved more is taken as more important.
"""

from __future__ import annotations

from dataclasses import dataclass

from ila.importance.base import NEEDS_MODEL, NEEDS_UPDATE, ImportanceMethod, Inputs, Scores, register
from ila.options import option


@dataclass
class UpdateNormOptions:
    relative: bool = option(False, "update-norm: divide each ‖ΔWᵢ‖_F by the base weight's ‖W₀ᵢ‖_F",
                            flag="--update-norm-relative")


def score(inputs: Inputs) -> Scores:
    import torch

    scores = []
    for layer in inputs.layers:
        norm = torch.linalg.matrix_norm(inputs.update.delta(layer).float()).item()
        if inputs.options.relative:
            norm /= max(torch.linalg.matrix_norm(inputs.update.base_weight(layer).float()).item(), 1e-12)
        scores.append(norm)
    return Scores(scores, {"relative": inputs.options.relative})


register(ImportanceMethod(
    name="update-norm",
    summary="Frobenius norm of each layer's stage-1 update ΔW, absolute or relative to W₀ (seeds/004 Sec. 3.2)",
    needs=frozenset({NEEDS_MODEL, NEEDS_UPDATE}),
    score=score,
    options=UpdateNormOptions,
    title="‖ΔW‖_F",
    sharded=True,
))
