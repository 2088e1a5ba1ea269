"""block-influence: ShortGPT's Block Influence (Men et al. 2024), a block-level signal on the data.

For decoder block b with input hidden states x and output y (every non-padding token t of the data):
BI_b = 1 − mean_t cos(x_t, y_t) — a block that barely turns its input changes the representation little.
The angular variant (Gromov et al. 2024) is mean_t arccos(cos(x_t, y_t)) / π. Every linear layer of a block
gets the block's score: the ranking orders blocks, not layers within one (metadata `level: block`).
No training and no update: one forward pass per batch of the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ila.importance.base import NEEDS_DATA, NEEDS_MODEL, ImportanceMethod, Inputs, Scores, register
from ila.options import one_of, option, positive

if TYPE_CHECKING:
    from torch import nn


@dataclass
class BlockInfluenceOptions:
    distance: str = option("cosine", "block-influence: 1 − cos (ShortGPT) or the angular distance arccos(cos)/π",
                           check=one_of("cosine", "angular"), flag="--block-influence-distance")
    examples: int = option(64, "block-influence: training examples the distance is averaged over", check=positive,
                           flag="--block-influence-examples")
    batch_size: int = option(4, "block-influence: batch size of the forward passes", check=positive)


def block_distances(model: nn.Module, dataset: Sequence[Mapping], collator: Callable[[list], Mapping],
                    batch_size: int, distance: str = "cosine") -> list[float]:
    """Mean distance between each decoder block's input and output hidden states over the non-padding tokens."""
    import math

    import torch
    from tqdm.auto import tqdm

    from ila.layers import find_blocks
    from ila.training.loss import accepts_logits_to_keep

    _, blocks = find_blocks(model)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    mask: list[torch.Tensor] = []  # the current batch's non-padding positions, shared with the hooks

    def hook(index: int):
        def record(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1.0, 1.0)
            d = 1.0 - cos if distance == "cosine" else torch.arccos(cos) / math.pi
            totals[index] += d[mask[0]].sum().cpu()
        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    keeps_logits = accepts_logits_to_keep(model)
    tokens = 0
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(dataset), batch_size), desc="block-influence: batches", leave=False):
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = collator(rows)
                attention = batch["attention_mask"].to(device).bool()
                mask[:] = [attention]
                tokens += int(attention.sum())
                kwargs = {"logits_to_keep": 1} if keeps_logits else {}  # the LM head output is not used
                model(input_ids=batch["input_ids"].to(device), attention_mask=attention.long(), use_cache=False,
                      **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return (totals / max(tokens, 1)).tolist()


def score(inputs: Inputs) -> Scores:
    from ila.layers import base_model_of

    options: BlockInfluenceOptions = inputs.options
    from ila.data import seeded_subset
    data = seeded_subset(inputs.train, options.examples, inputs.config.sample_seed)
    per_block = block_distances(base_model_of(inputs.model), data, inputs.collator, options.batch_size,
                                options.distance)
    return Scores([per_block[layer.block] for layer in inputs.layers],
                  {"block_scores": per_block, "distance": options.distance, "examples": len(data)})


register(ImportanceMethod(
    name="block-influence",
    summary="ShortGPT block influence 1 − cos(h_in, h_out) of each decoder block on the data (or angular), "
            "given to its layers",
    needs=frozenset({NEEDS_MODEL, NEEDS_DATA}),
    score=score,
    options=BlockInfluenceOptions,
    title="block influence",
    level="block",
))
