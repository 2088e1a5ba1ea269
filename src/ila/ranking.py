"""Ranking: one importance score per linear layer, its JSON file, and comparisons between rankings.

Rankings are compared by the Jaccard similarity of their top fraction (seeds/000 Sec. 4.2: top 75 %,
J(S₁, S₂) = |S₁ ∩ S₂| / |S₁ ∪ S₂|) and by Spearman rank correlation of the scores of shared layers.

`ranking.json` schema (version 1)::

    {"format": "ila.ranking", "version": 1,
     "layers": [{"name": str, "block": int, "role": str, "score": float,
                 "gate": float (ILA only), "tiebreak": float (optional)}, ...],
     "metadata": {"method": str, "method_config": {...}, ...}}

`layers` is in model order; `score` is the method's score (higher = more important; for ILA the gate logit
sᵢ, and `gate` is σ(sᵢ)). Layers with equal scores are ordered by `tiebreak` (higher first), then by a hash of
their name: never by model order. `metadata` names the method and its settings, plus what it measured.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ila.errors import IlaError
from ila.io import read_json, write_json_atomic
from ila.layers import LayerId

FORMAT = "ila.ranking"
VERSION = 1


@dataclass(frozen=True)
class LayerScore:
    """One layer's importance: its score (for ILA the gate logit sᵢ, `gate` = σ(sᵢ)) and tie-break value."""

    layer: LayerId
    score: float
    tiebreak: float | None = None

    @property
    def gate(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.score)) if self.score > -700 else 0.0


@dataclass
class Ranking:
    """Scores for the linear layers of one model, most important = highest score."""

    entries: list[LayerScore]
    metadata: dict[str, Any] = field(default_factory=dict)
    gates: bool = False  # scores are gate logits: the file also stores σ(sᵢ)

    @classmethod
    def from_scores(
        cls, layers: Sequence[LayerId], scores: Iterable[float], metadata: dict[str, Any] | None = None, *,
        tiebreak: Sequence[float] | None = None, gates: bool = False,
    ) -> Ranking:
        values = [float(s) for s in scores]
        if len(values) != len(layers) or (tiebreak is not None and len(tiebreak) != len(layers)):
            raise ValueError(f"{len(layers)} layers but {len(values)} scores and "
                             f"{len(tiebreak) if tiebreak is not None else 'no'} tie-break values")
        ties = [None] * len(values) if tiebreak is None else [float(t) for t in tiebreak]
        entries = [LayerScore(layer, s, t) for layer, s, t in zip(layers, values, ties, strict=True)]
        return cls(entries, dict(metadata or {}), gates)

    @property
    def method(self) -> str | None:
        """The importance method that made the ranking (rankings from before methods had names: 'ila')."""
        from ila.importance.base import method_of

        return method_of(self.metadata)

    @property
    def layers(self) -> list[LayerId]:
        """Layers in model order."""
        return [e.layer for e in self.entries]

    def scores(self) -> dict[str, float]:
        """Score by module name."""
        return {e.layer.name: e.score for e in self.entries}

    def ordered(self) -> list[LayerId]:
        """Layers from most to least important; equal scores by `tiebreak` (higher first), then by name hash."""

        def key(e: LayerScore) -> tuple:
            return (-e.score, -(e.tiebreak or 0.0), hashlib.sha256(e.layer.name.encode()).hexdigest())

        return [e.layer for e in sorted(self.entries, key=key)]

    def near_ties(self, top: float = 0.75, tolerance: float = 0.01) -> int:
        """How many scores lie within `tolerance` × (score range) of the cut between the top `top` and the rest:
        layers whose side of the cut a small change of the scores could flip."""
        order = sorted((e.score for e in self.entries), reverse=True)
        k = count_of(top, len(order))
        if k >= len(order):
            return 0
        cut = (order[k - 1] + order[k]) / 2
        width = tolerance * (order[0] - order[-1])
        return sum(1 for s in order if abs(s - cut) <= width)

    def by_block(self) -> Ranking:
        """The blocks ranked: each block scores the mean rank of its layers (average ranks over all layers,
        scaled to [0, 1]), so layer scores of different scales (roles, methods) weigh alike. Entries are
        `LayerId("block <b>", b, "block")`; a block-level method's ranking keeps its block order."""
        ranks = average_ranks([e.score for e in self.entries])
        scale = max(len(ranks) - 1, 1)
        members: dict[int, list[float]] = {}
        for e, r in zip(self.entries, ranks, strict=True):
            members.setdefault(e.layer.block, []).append((r - 1) / scale)
        layers = [LayerId(f"block {b}", b, "block") for b in sorted(members)]
        return Ranking.from_scores(layers, [sum(members[b]) / len(members[b]) for b in sorted(members)],
                                   {**self.metadata, "level": "block"})

    def top(self, fraction: float = 0.75) -> list[LayerId]:
        """The ⌈fraction·N⌉ most important layers."""
        return self.ordered()[: count_of(fraction, len(self.entries))]

    def bottom(self, fraction: float = 0.25) -> list[LayerId]:
        """The ⌈fraction·N⌉ least important layers."""
        return self.ordered()[::-1][: count_of(fraction, len(self.entries))]

    def jaccard(self, other: Ranking, top: float = 0.75) -> float:
        """Jaccard similarity of the two top-`top` sets of module names."""
        return jaccard({x.name for x in self.top(top)}, {x.name for x in other.top(top)})

    def spearman(self, other: Ranking) -> float:
        """Spearman rank correlation of the scores of the layers both rankings share."""
        mine, theirs = self.scores(), other.scores()
        common = [name for name in mine if name in theirs]
        if len(common) < 2:
            raise IlaError("spearman: the rankings share fewer than two layer names")
        return spearman([mine[n] for n in common], [theirs[n] for n in common])

    # -- files ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "layers": [self._row(e) for e in self.entries],
            "metadata": self.metadata,
        }

    def _row(self, e: LayerScore) -> dict[str, Any]:
        row: dict[str, Any] = {"name": e.layer.name, "block": e.layer.block, "role": e.layer.role, "score": e.score}
        if self.gates:
            row["gate"] = e.gate
        if e.tiebreak is not None:
            row["tiebreak"] = e.tiebreak
        return row

    def save(self, path: str | Path) -> Path:
        """Write the JSON file atomically (a temporary file renamed into place)."""
        return write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Ranking:
        """Read and validate a ranking file; every defect is an `IlaError` naming the file and field."""
        path = Path(path)
        if not path.is_file():
            raise IlaError(f"ranking {path}: file not found")
        data = read_json(path, f"ranking {path}")
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise IlaError(f"ranking {path}: expected an object with a 'layers' list")
        entries = []
        for i, row in enumerate(data["layers"]):
            if not isinstance(row, dict):
                raise IlaError(f"ranking {path}: layers[{i}] is not an object")
            for key, kind in (("name", str), ("block", int), ("role", str), ("score", (int, float))):
                value = row.get(key)
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise IlaError(f"ranking {path}: layers[{i}].{key} is missing or not a {_kind_name(kind)}")
            if not _finite(row["score"]):
                raise IlaError(f"ranking {path}: layers[{i}].score is not a finite number")
            tiebreak = row.get("tiebreak")
            if tiebreak is not None and (isinstance(tiebreak, bool) or not isinstance(tiebreak, (int, float))
                                         or not _finite(tiebreak)):
                raise IlaError(f"ranking {path}: layers[{i}].tiebreak is not a finite number")
            layer = LayerId(row["name"], row["block"], row["role"])
            entries.append(LayerScore(layer, float(row["score"]), None if tiebreak is None else float(tiebreak)))
        if not entries:
            raise IlaError(f"ranking {path}: 'layers' is empty")
        if len({e.layer.name for e in entries}) != len(entries):
            raise IlaError(f"ranking {path}: layer names repeat")
        metadata = data.get("metadata", {})
        return cls(entries, metadata if isinstance(metadata, dict) else {}, gates="gate" in data["layers"][0])


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


def _kind_name(kind: Any) -> str:
    return {str: "string", int: "integer"}.get(kind, "number")


def count_of(fraction: float, n: int) -> int:
    """⌈fraction·n⌉, at least 1: how many of n layers a fraction selects."""
    if not 0 < fraction <= 1:
        raise IlaError(f"fraction {fraction!r} is not in (0, 1]")
    return max(1, math.ceil(fraction * n - 1e-9))


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of the average ranks. 0.0 where either side is constant.

    Written out because it is six lines and SciPy is not otherwise a dependency.
    """
    rx, ry = average_ranks(x), average_ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0
