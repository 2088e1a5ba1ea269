"""Writing a matplotlib figure as a PNG, atomically (no half-written image), and releasing it."""

from __future__ import annotations

from pathlib import Path

from ila.io import atomic_path


def save_png(fig, path: str | Path) -> Path:
    """Save `fig` to `path` (120 dpi PNG) through a temporary file, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
