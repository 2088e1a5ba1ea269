"""ILA (seeds/000 Alg. 1): learn a gate σ(sᵢ) on each layer's stage-1 update; the scores sᵢ rank the layers.

Stage 1 (the update, `stage1.py`) is prepared by the identify job; this file fits the gates (stage 2,
`stage2.py`) until they settle. Options live under `ila:` in the YAML config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ila.errors import IlaError
from ila.importance.base import NEEDS_DATA, NEEDS_MODEL, NEEDS_UPDATE, ImportanceMethod, Inputs, Scores, register
from ila.options import finite, fraction, non_negative, one_of, option, positive


@dataclass
class IlaOptions:
    """Stage 2: one score per layer, gate σ(s) on its update (Eq. 5–7), under the budget H (Def. 2)."""

    max_steps: int = option(200, "stage-2 step cap (stage 2 stops earlier once settled)", check=positive,
                            flag="--stage2-steps")
    batch_size: int = option(4, "stage-2 per-device batch size", check=positive)
    learning_rate: float = option(0.2, "AdamW learning rate of the scores", check=positive)
    data: str = option("train", "split the gates are fitted on (and the probe set drawn from)",
                       check=one_of("train", "heldout"), flag="--stage2-data")
    init_score: float = option(4.0, "initial score s₀ of every layer (App. C.4)", check=finite, flag=True)
    budget: float = option(0.75, "budget H as a fraction of the layers: Σσ(sᵢ) ≤ H·N (Def. 2)", check=fraction,
                           flag=True)
    budget_weight: float = option(0.01, "λ of the hinge penalty λ·max(0, Σσ(sᵢ) − H·N)", check=non_negative)
    probe_examples: int = option(16, "fixed examples the settle rule takes the objective on", check=positive,
                                 flag="--stage2-probe")
    interval: int = option(5, "steps between two checks of the settle rule", check=positive)
    tolerance: float = option(5e-3, "settled when the relative change of the probe objective between checks stays "
                              "below this...", check=positive, flag="--stage2-tolerance")
    order_tolerance: float = option(0.01, "...and 1 − Spearman ρ between the scores of consecutive checks stays below "
                                    "this", check=positive)
    patience: int = option(2, "consecutive settled checks required", check=positive)
    min_steps: int = option(10, "never stop stage 2 before this step", check=non_negative)


def split_and_probe(train, heldout, options: IlaOptions, seed: int):
    """The split stage 2 fits the gates on (`options.data`) and its seeded probe set of `probe_examples`."""
    split = train if options.data == "train" else heldout
    if split is None or len(split) == 0:
        raise IlaError(f"ila.data: the {options.data} split is empty (raise heldout_fraction or use train)")
    from ila.data import seeded_subset
    return split, seeded_subset(split, options.probe_examples, seed)


def check(config, options: IlaOptions) -> None:
    """Fitting the gates on the held-out split needs one."""
    if options.data == "heldout" and config.heldout_fraction == 0:
        raise IlaError("ila.data: 'heldout' needs heldout_fraction > 0")


def score(inputs: Inputs) -> Scores:
    """Stage 2 on the stage-1 update; the scores are the gate logits sᵢ."""
    from ila.importance.stage2 import run_stage2

    options: IlaOptions = inputs.options
    split, probe = split_and_probe(inputs.train, inputs.heldout, options, inputs.config.sample_seed)
    s2 = run_stage2(inputs.update.model, inputs.layers, split, probe, inputs.collator, options, inputs.work_dir,
                    seed=inputs.config.seed, initial=inputs.update.initial, report_to=inputs.config.report_to,
                    bf16=inputs.config.dtype == "bfloat16")
    metadata = {
        "stage2_steps": s2.steps,
        "stage2_settled_step": s2.settled_step,
        "stage2_probe_examples": len(probe),
        "stage2_checks": s2.checks,
        "stage2_final_loss": s2.losses[-1] if s2.losses else None,
        "stage2_losses": s2.losses,
        "stage2_task_losses": s2.task_losses,
        "stage2_penalties": s2.penalties,
        "stage2_cost": s2.cost,
    }
    # Ties go to the layer whose update lowers the loss more at the final gates: −∂L/∂γᵢ.
    return Scores(s2.scores, metadata, tiebreak=[-g for g in s2.gate_gradient], gates=True)


register(ImportanceMethod(
    name="ila",
    summary="learned gate σ(sᵢ) on each layer's stage-1 update under a budget (seeds/000 Alg. 1)",
    needs=frozenset({NEEDS_MODEL, NEEDS_DATA, NEEDS_UPDATE}),
    score=score,
    options=IlaOptions,
    title="ILA scores sᵢ",
    check=check,
))
