"""Layer selection: which linear layers a fine-tune trains (seeds/000 Sec. 4.3–4.5, Tables 6–8, 12, 14).

Every strategy maps the model's layers (and, where it uses them, rankings) to the set of layers to train; the
rest are frozen (full fine-tuning) or get no adapter (LoRA, QLoRA, AdaLoRA). One `--select` value names it:

| value | trains | paper |
|---|---|---|
| `all` | every linear layer | LoRA / FFT baselines |
| `freeze-bottom:F` | all but the ⌈F·N⌉ least important of the ranking (default F = 0.25) | "w/ ILA", Table 5 |
| `top:F` | only the ⌈F·N⌉ most important | Tables 6, 7, 11 |
| `random:F` | all but ⌈F·N⌉ layers drawn at random with `--seed` | RL 1 / RL 2, Table 8 |
| `first:F` | all but the first ⌈F·N⌉ layers in model order | FL, Table 8 |
| `last:F` | all but the last ⌈F·N⌉ layers in model order | LL, Table 8 |
| `names:REGEX` | layers whose module name matches REGEX (`re.search`) | — |
| `intersect:F` | all but the layers in the bottom ⌈F·N⌉ of *every* given ranking | Table 12 |

A ranking from another model is refused unless `transfer=True`, which maps it by relative depth and role
(Table 14): target block b of B takes the scores of source block round(b·(B_s − 1)/(B − 1)), role by role.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ila.errors import IlaError
from ila.layers import LayerId
from ila.ranking import LayerScore, Ranking, count_of

DEFAULT_FRACTION = {"freeze-bottom": 0.25}


@dataclass
class Selection:
    """The layers to train, in model order, and how they were chosen."""

    strategy: str
    trained: list[LayerId]
    total: int
    mapping: dict[str, str] = field(default_factory=dict)  # target layer -> source layer (cross-model transfer)
    extra: dict = field(default_factory=dict)  # what a training strategy adds to selection.json (e.g. ranks)

    @property
    def fraction(self) -> float:
        return len(self.trained) / self.total

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "trained_count": len(self.trained), "total_count": self.total,
                "trained_fraction": self.fraction, "trained": [x.name for x in self.trained],
                **({"transfer_mapping": self.mapping} if self.mapping else {}), **self.extra}


def _ranked(rankings: Sequence[Ranking], spec: str) -> Ranking:
    if len(rankings) != 1:
        raise IlaError(f"--select {spec}: needs exactly one --ranking, got {len(rankings)}")
    return rankings[0]


def _keep_all_but(layers: Sequence[LayerId], frozen: set[str]) -> list[LayerId]:
    return [x for x in layers if x.name not in frozen]


def _freeze_bottom(layers, rankings, arg, seed, spec):
    return _keep_all_but(layers, {x.name for x in _ranked(rankings, spec).bottom(arg)})


def _top(layers, rankings, arg, seed, spec):
    top = {x.name for x in _ranked(rankings, spec).top(arg)}
    return [x for x in layers if x.name in top]


def _random(layers, rankings, arg, seed, spec):
    frozen = random.Random(seed).sample([x.name for x in layers], count_of(arg, len(layers)))
    return _keep_all_but(layers, set(frozen))


def _first(layers, rankings, arg, seed, spec):
    return list(layers[count_of(arg, len(layers)):])


def _last(layers, rankings, arg, seed, spec):
    return list(layers[: len(layers) - count_of(arg, len(layers))])


def _names(layers, rankings, arg, seed, spec):
    try:
        pattern = re.compile(arg)
    except re.error as exc:
        raise IlaError(f"--select {spec}: invalid regular expression ({exc})") from None
    return [x for x in layers if pattern.search(x.name)]


def _intersect(layers, rankings, arg, seed, spec):
    if len(rankings) < 2:
        raise IlaError(f"--select {spec}: needs two or more --ranking files, got {len(rankings)}")
    frozen = set.intersection(*({x.name for x in r.bottom(arg)} for r in rankings))
    return _keep_all_but(layers, frozen)


STRATEGIES: dict[str, tuple[Callable, str]] = {  # name -> (function, argument kind)
    "all": (lambda layers, *_: list(layers), "none"),
    "freeze-bottom": (_freeze_bottom, "fraction"),
    "top": (_top, "fraction"),
    "random": (_random, "fraction"),
    "first": (_first, "fraction"),
    "last": (_last, "fraction"),
    "names": (_names, "regex"),
    "intersect": (_intersect, "fraction"),
}


def parse_select(spec: str) -> tuple[str, float | str | None]:
    """`top:0.3` -> ("top", 0.3); validates the name and the argument."""
    name, _, raw = spec.partition(":")
    if name not in STRATEGIES:
        raise IlaError(f"--select {spec!r}: unknown strategy {name!r} (expected one of: {', '.join(STRATEGIES)})")
    kind = STRATEGIES[name][1]
    if kind == "none":
        if raw:
            raise IlaError(f"--select {spec!r}: '{name}' takes no argument")
        return name, None
    if kind == "regex":
        if not raw:
            raise IlaError(f"--select {spec!r}: expected names:REGEX")
        return name, raw
    if not raw and name in DEFAULT_FRACTION:
        return name, DEFAULT_FRACTION[name]
    try:
        value = float(raw)
    except ValueError:
        raise IlaError(f"--select {spec!r}: expected {name}:F with a fraction F in (0, 1]") from None
    if not 0 < value <= 1:
        raise IlaError(f"--select {spec!r}: fraction {value!r} is not in (0, 1]")
    return name, value


def select_layers(
    spec: str, layers: Sequence[LayerId], rankings: Sequence[Ranking] = (), *, seed: int = 0,
    transfer: bool = False,
) -> Selection:
    """Apply the `--select` value `spec` to the model's `layers`; rankings must match the model."""
    name, arg = parse_select(spec)
    mapping: dict[str, str] = {}
    matched = []
    for ranking in rankings:
        if transfer:
            ranking, part = transfer_ranking(ranking, layers)
            mapping.update(part)
        else:
            check_matches(ranking, layers)
        matched.append(ranking)
    trained = STRATEGIES[name][0](list(layers), matched, arg, seed, spec)
    if not trained:
        raise IlaError(f"--select {spec}: selects no layer to train")
    return Selection(spec, trained, len(layers), mapping)


def check_matches(ranking: Ranking, layers: Sequence[LayerId]) -> None:
    """Raise unless the ranking scores exactly the model's layers."""
    source = ranking.metadata.get("source", "ranking")
    have, want = {x.name for x in ranking.layers}, {x.name for x in layers}
    if have == want:
        return
    blocks_r = len({x.block for x in ranking.layers})
    blocks_m = len({x.block for x in layers})
    if blocks_r != blocks_m:
        raise IlaError(f"{source}: ranks {blocks_r} blocks but the model has {blocks_m} "
                       "(a ranking from another model needs --transfer)")
    missing = sorted(want - have)
    extra = sorted(have - want)
    example = f"model layer {missing[0]} is not ranked" if missing else f"ranked layer {extra[0]} is not in the model"
    raise IlaError(f"{source}: does not match the model ({example}; a ranking from another model needs --transfer)")


def transfer_ranking(ranking: Ranking, layers: Sequence[LayerId]) -> tuple[Ranking, dict[str, str]]:
    """Map a ranking onto another model's layers by relative depth and role (seeds/000 App. C.3, Table 14)."""
    source = ranking.metadata.get("source", "ranking")
    by_block_role = {(x.layer.block, x.layer.role): x for x in ranking.entries}
    src_blocks = sorted({x.block for x in ranking.layers})
    dst_blocks = sorted({x.block for x in layers})
    entries, mapping = [], {}
    for layer in layers:
        pos = dst_blocks.index(layer.block) / max(1, len(dst_blocks) - 1)
        src_block = src_blocks[round(pos * (len(src_blocks) - 1))]
        entry = by_block_role.get((src_block, layer.role))
        if entry is None:
            raise IlaError(f"{source}: has no role {layer.role!r} to transfer to {layer.name} "
                           f"(source roles: {', '.join(sorted({x.role for x in ranking.layers}))})")
        entries.append(LayerScore(layer, entry.score, entry.tiebreak))
        mapping[layer.name] = entry.layer.name
    return Ranking(entries, dict(ranking.metadata), ranking.gates), mapping
