"""selection (the default): train a fixed set of linear layers chosen by `--select` for the whole run.

`--select all | freeze-bottom:F | top:F | random:F | first:F | last:F | names:REGEX | intersect:F` (see
`ila.selection`); the selected layers get adapters or `requires_grad`, the rest stay frozen throughout
(seeds/000 Sec. 5: freeze the least important 25 %, or train only the top 10–30 %).
"""

from __future__ import annotations

from typing import Any

from ila.training.strategies.base import Context, Plan, Strategy, register

NEEDS_RANKING = ("freeze-bottom", "top", "intersect")


def prepare(context: Context) -> Plan:
    from ila.selection import select_layers
    from ila.training.methods import AdaLoraAllocationCallback, adalora_orthogonality, apply_method

    config = context.config
    seed = config.seed if config.select_seed is None else config.select_seed
    selection = select_layers(config.select, context.layers, context.rankings, seed=seed, transfer=config.transfer)
    model = apply_method(context.model, [x.name for x in selection.trained], config)
    if config.method != "adalora":
        return Plan(model, selection)
    return Plan(model, selection, [AdaLoraAllocationCallback(model)], extra_loss=lambda: adalora_orthogonality(model))


def needs_ranking(config: Any, options: Any) -> bool:
    from ila.selection import parse_select

    return parse_select(config.select)[0] in NEEDS_RANKING


register(Strategy(
    name="selection", summary="train the layers --select chooses, the same ones every step (default)",
    prepare=prepare, methods=("lora", "qlora", "full", "adalora"), needs_ranking=needs_ranking,
))
