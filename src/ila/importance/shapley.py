"""shapley: Monte-Carlo permutation Shapley values of each stage-1 update's contribution to the loss — the
counterfactual reference the cheap signals are judged against (seeds/002, related work: layer importance by
Shapley values).

Players are the layers' updates (`shapley.level: layer`) or the decoder blocks' (`block`: all of a block's
updates together). v(S) = L(θ₀) − L(θ₀ + Σ_{i∈S} ΔWᵢ): the loss the updates in S remove, on a fixed set of
examples, with the updates switched on and off through the gates γᵢ ∈ {0, 1} (`gates.py`). For a random
permutation π, player i's marginal is v(before_π(i) ∪ {i}) − v(before_π(i)); φᵢ is its mean over permutations
and the standard error is the marginals' standard deviation / √permutations. Permutations run while the budget
of loss evaluations allows (each distinct coalition is evaluated once); when all 2ⁿ coalitions fit the budget,
the values are computed exactly from them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from ila.errors import IlaError
from ila.importance.base import NEEDS_DATA, NEEDS_MODEL, NEEDS_UPDATE, ImportanceMethod, Inputs, Scores, register
from ila.options import one_of, option, positive


@dataclass
class ShapleyOptions:
    level: str = option("block", "shapley: players are single layers' updates or whole blocks'",
                        check=one_of("layer", "block"), flag="--shapley-level")
    budget: int = option(320, "shapley: most loss evaluations (a permutation of n players costs up to n + 1; "
                         "2ⁿ of them give exact values)",
                         check=positive, flag="--shapley-budget")
    examples: int = option(16, "shapley: fixed training examples every loss is measured on", check=positive,
                           flag="--shapley-examples")
    batch_size: int = option(8, "shapley: batch size of the loss evaluations", check=positive)


def players_of(layers: list, level: str) -> list[list[int]]:
    """The players: for each, the indices of its layers (one layer, or every layer of one block)."""
    if level == "layer":
        return [[i] for i in range(len(layers))]
    blocks: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        blocks.setdefault(layer.block, []).append(i)
    return [blocks[b] for b in sorted(blocks)]


def check_layers(options: ShapleyOptions, layers: list) -> None:
    """The budget must pay for one permutation: n + 1 loss evaluations for n players."""
    n = len(players_of(layers, options.level))
    if options.budget < n + 1:
        hint = " or use --shapley-level block" if options.level == "layer" else ""
        raise IlaError(f"shapley.budget: {options.budget} loss evaluations cannot finish one permutation of {n} "
                       f"{options.level}s (it needs {n + 1}); raise it{hint}")


def permutation_shapley(value: Callable[[frozenset[int]], float], n: int, budget: int,
                        seed: int) -> tuple[list[float], list[float | None], dict]:
    """Shapley values of `n` players under `value(coalition)`, with at most `budget` evaluations of `value`.

    When all 2ⁿ coalitions fit the budget the values are exact: φᵢ = Σ_{S ∌ i} |S|!(n−|S|−1)!/n! ·
    (v(S ∪ {i}) − v(S)). Otherwise random permutations (seeded), each coalition evaluated once, while the next
    permutation is sure to fit (at most `budget` permutations). Returns (values, standard errors — 0 when
    exact, None from a single permutation —, metadata)."""
    import torch
    from tqdm.auto import tqdm

    cache: dict[frozenset[int], float] = {}
    progress = tqdm(total=min(2 ** n, budget), desc="shapley: loss evaluations", leave=False)

    def v(coalition: frozenset[int]) -> float:
        if coalition not in cache:
            cache[coalition] = value(coalition)
            progress.update()
        return cache[coalition]

    if 2 ** n <= budget:
        values = [0.0] * n
        for i in range(n):
            others = [j for j in range(n) if j != i]
            for size in range(n):
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                for subset in itertools.combinations(others, size):
                    s = frozenset(subset)
                    values[i] += weight * (v(s | {i}) - v(s))
        progress.close()
        return values, [0.0] * n, {"permutations": None, "evaluations": len(cache), "exact": True}
    generator = torch.Generator().manual_seed(seed)
    marginals: list[list[float]] = [[] for _ in range(n)]
    permutations = 0
    while permutations == 0 or (len(cache) + n - 1 <= budget and permutations < budget):
        coalition: frozenset[int] = frozenset()
        before = v(coalition)
        for player in torch.randperm(n, generator=generator).tolist():
            coalition = coalition | {player}
            after = v(coalition)
            marginals[player].append(after - before)
            before = after
        permutations += 1
    progress.close()
    values = [sum(m) / permutations for m in marginals]
    errors: list[float | None] = [None] * n
    if permutations > 1:
        errors = [math.sqrt(sum((x - mu) ** 2 for x in m) / (permutations - 1) / permutations)
                  for m, mu in zip(marginals, values, strict=True)]
    return values, errors, {"permutations": permutations, "evaluations": len(cache), "exact": False}


def score(inputs: Inputs) -> Scores:
    import torch

    from ila.gates import LayerGates
    from ila.training.loss import response_loss

    options: ShapleyOptions = inputs.options
    check_layers(options, inputs.layers)
    from ila.data import seeded_subset
    data = seeded_subset(inputs.train, options.examples, inputs.config.sample_seed)
    model = inputs.update.model
    device = next(model.parameters()).device
    batches = [{k: t.to(device) for k, t in inputs.collator([data[j] for j in range(i, min(i + options.batch_size,
               len(data)))]).items()} for i in range(0, len(data), options.batch_size)]
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    players = players_of(inputs.layers, options.level)
    gates = LayerGates(inputs.layers).attach(model, inputs.update.initial)
    bf16 = inputs.config.dtype == "bfloat16"

    def loss(on: frozenset) -> float:
        values = torch.zeros(len(inputs.layers))
        for player in on:
            values[players[player]] = 1.0
        total = 0.0
        with gates.fixed(values), torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            for batch in batches:
                total += float(response_loss(model, batch, reduction="sum"))
        return total / max(tokens, 1)

    model.eval()
    try:
        base_loss = loss(frozenset())
        values, errors, meta = permutation_shapley(lambda s: base_loss - loss(s) if s else 0.0, len(players),
                                                   options.budget, inputs.config.seed)
    finally:
        gates.detach()
    per_layer = [0.0] * len(inputs.layers)
    for player, indices in enumerate(players):
        for i in indices:
            per_layer[i] = values[player]
    meta.update(level=options.level, players=len(players), examples=len(data), base_loss=base_loss,
                shapley_values=values, standard_errors=errors)
    return Scores(per_layer, meta)


register(ImportanceMethod(
    name="shapley",
    summary="Monte-Carlo permutation Shapley value of each update's (layer's or block's) loss reduction, "
            "updates switched on/off by gates",
    needs=frozenset({NEEDS_MODEL, NEEDS_DATA, NEEDS_UPDATE}),
    score=score,
    options=ShapleyOptions,
    title="Shapley value (loss removed)",
    level="block",  # the default `shapley.level`; a layer-level run says so in its ranking's metadata
    check_layers=check_layers,
))
