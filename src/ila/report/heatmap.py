"""Heatmap of layer scores in the layout of seeds/000 Fig. 1: blocks on x, linear-layer roles on y."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ila.layers import role_order  # noqa: E402
from ila.ranking import Ranking  # noqa: E402
from ila.report.figure import save_png  # noqa: E402


def plot_heatmap(ranking: Ranking, path: str | Path, *, top: float = 0.75, title: str | None = None) -> Path:
    """Write a PNG of sᵢ per (role, block); layers in the top `top` fraction carry a dot. Atomic write."""
    path = Path(path)
    roles = role_order(ranking.layers)
    blocks = sorted({layer.block for layer in ranking.layers})
    grid = np.full((len(roles), len(blocks)), np.nan)
    marks = np.zeros_like(grid, dtype=bool)
    top_names = {layer.name for layer in ranking.top(top)}
    for entry in ranking.entries:
        i, j = roles.index(entry.layer.role), blocks.index(entry.layer.block)
        grid[i, j] = entry.score
        marks[i, j] = entry.layer.name in top_names
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(blocks) + 2.5), max(2.5, 0.42 * len(roles) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ys, xs = np.nonzero(marks)
    ax.scatter(xs, ys, s=9, c="white", edgecolors="black", linewidths=0.4, label=f"top {top:.0%}")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_yticks(range(len(roles)), roles, fontsize=8)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("linear layer")
    ax.set_title(title or "layer importance scores", fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.16), fontsize=7, frameon=False)
    return save_png(fig, path)
