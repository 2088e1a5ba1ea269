"""Compare rankings: Jaccard of the top fraction (seeds/000 Sec. 4.2) and Spearman ρ, for every pair."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

from ila.errors import IlaError
from ila.io import write_json_atomic, write_text_atomic
from ila.ranking import Ranking


@dataclass
class Comparison:
    """Pairwise similarity matrices of named rankings (diagonal = 1)."""

    names: list[str]
    top: float
    jaccard: list[list[float]]
    spearman: list[list[float]]
    labels: list[str] | None = None  # short names for tables and plots (default: `names`)
    level: str = "layer"  # "block": the rankings' block orders were compared


def compare(rankings: list[Ranking | str | Path], top: float = 0.75, labels: list[str] | None = None,
            level: str = "layer") -> Comparison:
    """Jaccard@top and Spearman between every pair of rankings (files or `Ranking` objects); `labels` are short
    names for the CSV and the plot (default: what made each ranking, `label`). `level="block"` compares the
    block orders (`Ranking.by_block`), e.g. layer-level signals against a block-level reference."""
    if len(rankings) < 2:
        raise IlaError("compare: give at least two rankings")
    if not 0 < top <= 1:
        raise IlaError(f"--top: {top!r} is not a fraction in (0, 1]")
    if level not in ("layer", "block"):
        raise IlaError(f"--level: {level!r} is not 'layer' or 'block'")
    loaded = [r if isinstance(r, Ranking) else Ranking.load(r) for r in rankings]
    if level == "block":
        loaded = [r.by_block() for r in loaded]
    given = labels or [str(r) if not isinstance(r, Ranking) else f"ranking{i + 1}" for i, r in enumerate(rankings)]
    if len(given) != len(loaded):
        raise IlaError(f"compare: {len(given)} labels for {len(loaded)} rankings")
    names = [f"{name} ({label(x)})" for name, x in zip(given, loaded, strict=True)]
    n = len(loaded)
    jac = [[1.0 if i == j else loaded[i].jaccard(loaded[j], top) for j in range(n)] for i in range(n)]
    spr = [[1.0 if i == j else loaded[i].spearman(loaded[j]) for j in range(n)] for i in range(n)]
    return Comparison(names, top, jac, spr, labels or _short_labels(loaded), level)


def _short_labels(rankings: list[Ranking]) -> list[str]:
    """`label` of each ranking, numbered where two are the same."""
    plain = [label(r) for r in rankings]
    return [f"{i + 1}: {x}" if plain.count(x) > 1 else x for i, x in enumerate(plain)]


def write_comparison(c: Comparison, out: str | Path) -> list[Path]:
    """Write `jaccard.csv`, `spearman.csv`, `agreement.png` (both matrices, annotated) and `comparison.json`
    (written last) into the folder `out`; returns the paths."""
    from ila.report import plot_agreement

    out = Path(out)
    labels = c.labels or c.names
    paths = []
    for name, matrix in (("jaccard", c.jaccard), ("spearman", c.spearman)):
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["", *labels])
        writer.writerows([[row_label, *(f"{v:.4f}" for v in row)] for row_label, row in zip(labels, matrix,
                                                                                            strict=True)])
        paths.append(write_text_atomic(out / f"{name}.csv", text.getvalue()))
    paths.append(plot_agreement(c, out / "agreement.png", labels=labels))
    paths.append(write_json_atomic(out / "comparison.json", asdict(c)))
    return paths


def label(ranking: Ranking) -> str:
    """What made a ranking: method · data · seed (from its metadata; the registry names old ILA rankings)."""
    meta = ranking.metadata
    parts = [ranking.method or "unknown method", meta.get("data"), f"seed {meta['seed']}" if "seed" in meta else None]
    return " · ".join(str(p) for p in parts if p)


def format_comparison(c: Comparison) -> str:
    """Two rankings: the `jaccard@T = x` and `spearman = y` lines. More: both matrices."""
    of = " (block orders)" if c.level == "block" else ""
    if len(c.names) == 2:
        return (f"jaccard@{c.top:g} = {c.jaccard[0][1]:.3f}{of}\nspearman = {c.spearman[0][1]:.3f}{of}\n"
                f"[1] {c.names[0]}\n[2] {c.names[1]}")
    labels = [f"[{i + 1}]" for i in range(len(c.names))]
    lines = [f"{label} {name}" for label, name in zip(labels, c.names, strict=True)]
    if of:
        lines.append(f"compared{of}")
    for title, matrix in ((f"jaccard@{c.top:g}", c.jaccard), ("spearman", c.spearman)):
        lines.append("")
        lines.append(f"{title:<14}" + "".join(f"{label:>8}" for label in labels))
        for label, row in zip(labels, matrix, strict=True):
            lines.append(f"{label:<14}" + "".join(f"{v:>8.3f}" for v in row))
    return "\n".join(lines)
