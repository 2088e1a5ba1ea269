"""Ranking: one importance score per linear layer, its JSON file, and comparisons between rankings.

Rankings are compared by the Jaccard similarity of their top fraction (seeds/000 Sec. 4.2: top 75 %,
J(S₁, S₂) = |S₁ ∩ S₂| / |S₁ ∪ S₂|) and by Spearman rank correlation of the scores of shared layers.

`ranking.json` schema (version 1)::

    {"format": "ila.ranking", "version": 1,
     "layers": [{"name": str, "block": int, "role": str, "score": float, "gate": float}, ...],
     "metadata": {...}}

`layers` is in model order; `score` is sᵢ, `gate` is σ(sᵢ). `metadata` is free-form (model, data, seed, ε,
stability step, steps, timings, package versions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ila.errors import IlaError
from ila.io import write_json_atomic
from ila.layers import LayerId

FORMAT = "ila.ranking"
VERSION = 1


@dataclass(frozen=True)
class LayerScore:
    """One layer's importance: score sᵢ and gate σ(sᵢ)."""

    layer: LayerId
    score: float

    @property
    def gate(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.score)) if self.score > -700 else 0.0


@dataclass
class Ranking:
    """Scores for the linear layers of one model, most important = highest score."""

    entries: list[LayerScore]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scores(
        cls, layers: Sequence[LayerId], scores: Iterable[float], metadata: dict[str, Any] | None = None
    ) -> Ranking:
        values = [float(s) for s in scores]
        if len(values) != len(layers):
            raise ValueError(f"{len(layers)} layers but {len(values)} scores")
        return cls([LayerScore(layer, s) for layer, s in zip(layers, values, strict=True)], dict(metadata or {}))

    @property
    def layers(self) -> list[LayerId]:
        """Layers in model order."""
        return [e.layer for e in self.entries]

    def scores(self) -> dict[str, float]:
        """Score by module name."""
        return {e.layer.name: e.score for e in self.entries}

    def ordered(self) -> list[LayerId]:
        """Layers from most to least important (ties keep model order)."""
        order = sorted(range(len(self.entries)), key=lambda i: (-self.entries[i].score, i))
        return [self.entries[i].layer for i in order]

    def top(self, fraction: float = 0.75) -> list[LayerId]:
        """The ⌈fraction·N⌉ most important layers."""
        return self.ordered()[: _count(fraction, len(self.entries))]

    def bottom(self, fraction: float = 0.25) -> list[LayerId]:
        """The ⌈fraction·N⌉ least important layers."""
        return self.ordered()[::-1][: _count(fraction, len(self.entries))]

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
            "layers": [
                {"name": e.layer.name, "block": e.layer.block, "role": e.layer.role, "score": e.score,
                 "gate": e.gate}
                for e in self.entries
            ],
            "metadata": self.metadata,
        }

    def save(self, path: str | Path) -> Path:
        """Write the JSON file atomically (a temporary file renamed into place)."""
        return write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Ranking:
        """Read and validate a ranking file; every defect is an `IlaError` naming the file and field."""
        path = Path(path)
        if not path.is_file():
            raise IlaError(f"ranking {path}: file not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IlaError(f"ranking {path}: not valid JSON ({exc})") from None
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
            entries.append(LayerScore(LayerId(row["name"], row["block"], row["role"]), float(row["score"])))
        if not entries:
            raise IlaError(f"ranking {path}: 'layers' is empty")
        if len({e.layer.name for e in entries}) != len(entries):
            raise IlaError(f"ranking {path}: layer names repeat")
        metadata = data.get("metadata", {})
        return cls(entries, metadata if isinstance(metadata, dict) else {})


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


def _kind_name(kind: Any) -> str:
    return {str: "string", int: "integer"}.get(kind, "number")


def _count(fraction: float, n: int) -> int:
    if not 0 < fraction <= 1:
        raise IlaError(f"fraction {fraction!r} is not in (0, 1]")
    return max(1, math.ceil(fraction * n - 1e-9))


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _ranks(values: Sequence[float]) -> list[float]:
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
    rx, ry = _ranks(x), _ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0
