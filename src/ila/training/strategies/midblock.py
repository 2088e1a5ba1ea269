"""midblock: Mid-Block Efficient Tuning — LoRA on chosen contiguous segments of blocks (seeds/004 Sec. 4.4, App. A).

`segments` has one character per segment, "1" to adapt it: "01100" splits the N_L decoder blocks into 5
contiguous segments and puts LoRA on every linear layer of the 2nd and 3rd. Segments are as equal as possible:
with N_L = q·s + m, the first m segments hold q + 1 blocks and the others q (numpy's `array_split`).

Rank budget (seed 004 keeps the trainable-parameter count nearly constant): a LoRA of rank r on a layer with
d_in inputs and d_out outputs trains r·(d_in + d_out) parameters, so all-layer LoRA at `lora.r` trains
P = r·Σ_all (d_in + d_out). The adapted layers get rank r' = round(P / Σ_adapted (d_in + d_out)), the rank whose
count is nearest P (within half a rank step), and alpha scales with it (α' = α·r'/r) so the update's scale
α/r is unchanged. `keep_rank: true` keeps r and α. The rank is one `LoraConfig.r` for every adapted layer (no
`rank_pattern`), and the built model is checked: every adapted layer has rank r', every other layer none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ila.errors import IlaError
from ila.options import option
from ila.training.strategies.base import Context, Plan, Strategy, check_method, no_rankings, register


def segment_string(value: str) -> str | None:
    if not value:
        return "is empty (expected one 0 or 1 per segment, e.g. 01100)"
    if set(value) - {"0", "1"}:
        return "is not a string of 0 and 1 (e.g. 01100)"
    if "1" not in value:
        return "marks no segment (all zeros: nothing would train)"
    return None


@dataclass
class MidBlockOptions:
    """Which segments of blocks get LoRA, and at what rank."""

    segments: str = option("01100", "one 0/1 per contiguous segment of the blocks; LoRA goes on the 1 segments",
                           check=segment_string, flag="--segments")
    keep_rank: bool = option(False, "keep lora.r on the adapted layers (default: raise it so the trainable "
                             "parameters match all-layer LoRA at lora.r)", flag="--keep-rank")


def check(config: Any, options: MidBlockOptions) -> None:
    check_method(config, STRATEGY)
    no_rankings(config, "midblock")


def segment_blocks(segments: str, n_blocks: int) -> list[list[int]]:
    """The blocks of each segment: len(segments) contiguous runs, the first n_blocks % len(segments) one longer."""
    s = len(segments)
    if s > n_blocks:
        raise IlaError(f"midblock.segments: {segments!r} has {s} segments but the model has only {n_blocks} blocks")
    from ila.layers import contiguous_runs

    return [list(run) for run in contiguous_runs(n_blocks, s)]


def matched_rank(r: int, all_cost: int, adapted_cost: int) -> int:
    """The rank on the adapted layers whose parameter count is nearest all-layer LoRA at rank r."""
    return max(1, round(r * all_cost / adapted_cost))


def prepare(context: Context) -> Plan:
    from ila.layers import base_model_of
    from ila.selection import Selection
    from ila.training.methods import apply_method

    config, options = context.config, context.options
    layers = context.layers
    blocks = sorted({x.block for x in layers})
    runs = segment_blocks(options.segments, len(blocks))
    chosen = {blocks[i] for flag, run in zip(options.segments, runs, strict=True) if flag == "1" for i in run}
    adapted = [x for x in layers if x.block in chosen]
    base = base_model_of(context.model)

    def cost(xs) -> int:  # d_in + d_out: the sum of the weight's shape (nn.Linear and GPT-2's Conv1D alike)
        return sum(sum(base.get_submodule(x.name).weight.shape) for x in xs)

    lora = config.lora
    if not options.keep_rank:
        rank = matched_rank(lora.r, cost(layers), cost(adapted))
        lora = dataclasses.replace(lora, r=rank, alpha=lora.alpha * rank / lora.r)
    model = apply_method(context.model, [x.name for x in adapted], config, lora=lora)
    ranks = {}
    for x in layers:  # the rank each layer really got
        r = getattr(base_model_of(model).get_submodule(x.name), "r", {}).get("default")
        if (r is not None) != (x.block in chosen) or (r is not None and r != lora.r):
            raise AssertionError(f"layer {x.name}: LoRA rank {r}, expected {lora.r if x.block in chosen else None}")
        if r is not None:
            ranks[x.name] = r
    selection = Selection(f"midblock:{options.segments}", adapted, len(layers), extra={
        "segments": options.segments, "segment_blocks": [[blocks[i] for i in run] for run in runs],
        "ranks": ranks, "lora_alpha": lora.alpha,
        "lora_params": lora.r * cost(adapted), "all_layer_lora_params": config.lora.r * cost(layers),
    })
    return Plan(model, selection)


STRATEGY = register(Strategy(
    name="midblock", summary="LoRA on marked contiguous segments of blocks at a matched parameter budget "
    "(Mid-Block, seeds/004)", prepare=prepare, methods=("lora",), options=MidBlockOptions, check=check,
))
