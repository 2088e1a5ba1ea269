"""Agreement matrices of a comparison (Jaccard@top and Spearman ρ) as one annotated heatmap PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ila.report.figure import save_png  # noqa: E402


def plot_agreement(comparison, path: str | Path, *, labels: list[str] | None = None) -> Path:
    """Write the two matrices of an `ila.comparison.Comparison` side by side, each cell annotated. Atomic write."""
    path = Path(path)
    labels = labels or comparison.names
    n = len(labels)
    size = max(3.2, 0.55 * n + 1.6)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.0, size))
    of = " of block orders" if getattr(comparison, "level", "layer") == "block" else ""
    panels = ((f"Jaccard@{comparison.top:g}{of}", comparison.jaccard, 0.0),
              (f"Spearman ρ{of}", comparison.spearman, -1.0))
    for ax, (title, matrix, low) in zip(axes, panels, strict=True):
        grid = np.array(matrix, dtype=float)
        image = ax.imshow(grid, vmin=low, vmax=1.0, cmap="viridis")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > low + 0.6 * (1 - low) else "white")
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return save_png(fig, path)
