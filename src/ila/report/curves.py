"""Training curves of a ranking (PNG): the stage-1 probe loss with the ε-stop step marked, and the stage-2
objective per step with its task loss, probe checks and settled step, where the metadata records them."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ila.report.figure import save_png  # noqa: E402
from ila.report.inputs import as_numbers, as_pairs, is_number  # noqa: E402


def plot_curves(stage1: list[tuple[float, float]], meta: dict, stage2: list[float | None], path: Path) -> Path:
    """One PNG: stage-1 probe loss against steps with the ε-stop step marked, and the stage-2 objective per step
    (task loss and probe checks when recorded, settled step marked); a panel for each that is given."""
    panels = [p for p, given in (("stage1", stage1), ("stage2", stage2)) if given]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "stage1":
            _stage1_panel(ax, stage1, meta)
        else:
            _stage2_panel(ax, stage2, meta)
    return save_png(fig, path)


def _stage1_panel(ax, points: list[tuple[float, float]], meta: dict) -> None:
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label="probe loss")
    step = meta.get("stability_step")
    if is_number(step):
        eps = meta.get("epsilon")
        ax.axvline(step, color="C3", linestyle="--",
                   label=f"ε-stop, step {step:g}" + (f" (ε = {eps:g})" if is_number(eps) else ""))
    ax.set_title("stage 1: expected-loss estimate", fontsize=10)
    ax.set_xlabel("stage-1 step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)


def _stage2_panel(ax, losses: list[float | None], meta: dict) -> None:
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, [math.nan if v is None else v for v in losses], label="objective (task + budget)")
    task = as_numbers(meta.get("stage2_task_losses"))
    if len(task) == len(losses) and any(v is not None for v in task):
        ax.plot(steps, [math.nan if v is None else v for v in task], linestyle=":", label="task loss")
    checks = as_pairs(meta.get("stage2_checks"))
    if checks:
        ax.scatter([c[0] for c in checks], [c[1] for c in checks], s=14, color="C2", zorder=3,
                   label="probe objective (checks)")
    settled = meta.get("stage2_settled_step")
    if is_number(settled):
        ax.axvline(settled, color="C3", linestyle="--", label=f"settled, step {settled:g}")
    ax.set_title("stage 2: gate fitting", fontsize=10)
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
