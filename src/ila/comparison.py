"""Compare rankings: Jaccard of the top fraction (seeds/000 Sec. 4.2) and Spearman ρ, for every pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ila.errors import IlaError
from ila.ranking import Ranking


@dataclass
class Comparison:
    """Pairwise similarity matrices of named rankings (diagonal = 1)."""

    names: list[str]
    top: float
    jaccard: list[list[float]]
    spearman: list[list[float]]


def compare(rankings: list[Ranking | str | Path], top: float = 0.75) -> Comparison:
    """Jaccard@top and Spearman between every pair of rankings (files or `Ranking` objects)."""
    if len(rankings) < 2:
        raise IlaError("compare: give at least two rankings")
    if not 0 < top <= 1:
        raise IlaError(f"--top: {top!r} is not a fraction in (0, 1]")
    loaded = [r if isinstance(r, Ranking) else Ranking.load(r) for r in rankings]
    names = [f"{r if not isinstance(r, Ranking) else f'ranking{i + 1}'} ({label(x)})"
             for i, (r, x) in enumerate(zip(rankings, loaded))]
    n = len(loaded)
    jac = [[1.0 if i == j else loaded[i].jaccard(loaded[j], top) for j in range(n)] for i in range(n)]
    spr = [[1.0 if i == j else loaded[i].spearman(loaded[j]) for j in range(n)] for i in range(n)]
    return Comparison(names, top, jac, spr)


def label(ranking: Ranking) -> str:
    """What made a ranking: method · data · seed (from its metadata; the registry names old ILA rankings)."""
    meta = ranking.metadata
    parts = [ranking.method or "unknown method", meta.get("data"), f"seed {meta['seed']}" if "seed" in meta else None]
    return " · ".join(str(p) for p in parts if p)


def format_comparison(c: Comparison) -> str:
    """Two rankings: the `jaccard@T = x` and `spearman = y` lines. More: both matrices."""
    if len(c.names) == 2:
        return (f"jaccard@{c.top:g} = {c.jaccard[0][1]:.3f}\nspearman = {c.spearman[0][1]:.3f}\n"
                f"[1] {c.names[0]}\n[2] {c.names[1]}")
    labels = [f"[{i + 1}]" for i in range(len(c.names))]
    lines = [f"{label} {name}" for label, name in zip(labels, c.names, strict=True)]
    for title, matrix in ((f"jaccard@{c.top:g}", c.jaccard), ("spearman", c.spearman)):
        lines.append("")
        lines.append(f"{title:<14}" + "".join(f"{label:>8}" for label in labels))
        for label, row in zip(labels, matrix, strict=True):
            lines.append(f"{label:<14}" + "".join(f"{v:>8.3f}" for v in row))
    return "\n".join(lines)
