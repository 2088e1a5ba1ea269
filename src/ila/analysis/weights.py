"""Weight-level comparisons of a base and a tuned model (seeds/004 Sec. 4.3): weight change per block and layer
swapping of contiguous segments of blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ila.errors import IlaError
from ila.layers import contiguous_runs, discover_layers, find_blocks


def check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    """Raise naming the first config field, then the first parameter, in which the two models differ."""
    fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head")
    a, b = base.config.get_text_config(), tuned.config.get_text_config()
    for name in fields:
        if getattr(a, name, None) != getattr(b, name, None):
            raise IlaError(f"tuned model: architecture differs from the base model ({name}: "
                           f"{getattr(a, name, None)!r} vs {getattr(b, name, None)!r})")
    pa, pb = dict(base.named_parameters()), dict(tuned.named_parameters())
    for name in pa:
        if name not in pb or pa[name].shape != pb[name].shape:
            shape = tuple(pb[name].shape) if name in pb else "missing"
            raise IlaError(f"tuned model: architecture differs from the base model (parameter {name}: "
                           f"{tuple(pa[name].shape)} vs {shape})")


def weight_change(base: nn.Module, tuned: nn.Module) -> list[dict]:
    """Per block (`layer` = block index + 1, the hidden state the block writes): `weight_change`, the Frobenius
    norm of the change of the attention projections taken together (seeds/004 Eq. 1), and `weight_change_all`,
    the same over every linear layer of the block."""
    layers = discover_layers(base)
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    attention: dict[int, float] = {}
    every: dict[int, float] = {}
    for layer in layers:  # under no_grad: the parameters may require gradients
        inside = layer.name.split(f".{layer.block}.", 1)[-1]  # self_attn.q_proj, attn.c_attn, attention.dense
        is_attention = "attn" in inside or "attention" in inside
        for name in (f"{layer.name}.weight", f"{layer.name}.bias"):
            if name not in before:
                continue
            delta = float((after[name].detach().double() - before[name].detach().double()).pow(2).sum())
            every[layer.block] = every.get(layer.block, 0.0) + delta
            if is_attention:
                attention[layer.block] = attention.get(layer.block, 0.0) + delta
    rows = []
    for block in sorted(every):
        for metric, sums in (("weight_change", attention), ("weight_change_all", every)):
            rows.append({"metric": metric, "layer": block + 1, "mode": "weights", "base": None, "tuned": None,
                         "value": sums.get(block, 0.0) ** 0.5})
    return rows


def segment_ranges(n_blocks: int, segments: int) -> list[range]:
    """`segments` contiguous runs of blocks (`ila.layers.contiguous_runs`), refusing a count the model cannot
    split."""
    if not 2 <= segments <= n_blocks:
        raise IlaError(f"segments: {segments} must be between 2 and the model's {n_blocks} blocks")
    return contiguous_runs(n_blocks, segments)


@contextmanager
def swapped(base: nn.Module, tuned: nn.Module, blocks: range) -> Iterator[None]:
    """Exchange the parameters of `blocks` between the two models (in place, no copy), and back on exit."""
    _, base_blocks = find_blocks(base)
    _, tuned_blocks = find_blocks(tuned)
    pairs = [(p, q) for b in blocks for p, q in zip(base_blocks[b].parameters(), tuned_blocks[b].parameters(),
                                                     strict=True)]

    def exchange() -> None:
        with torch.no_grad():
            for p, q in pairs:
                p.data, q.data = q.data, p.data

    exchange()
    try:
        yield
    finally:
        exchange()


def swap_rows(base: nn.Module, tuned: nn.Module, segments: int,
              perplexity: Callable[[nn.Module], float]) -> list[dict]:
    """`swap_ppl` per segment: held-out perplexity of the base model with that segment taken from the tuned one
    (`base`) and of the tuned model with that segment taken from the base one (`tuned`); `value` = tuned − base."""
    _, blocks = find_blocks(base)
    rows = []
    for index, run in enumerate(segment_ranges(len(blocks), segments)):
        with swapped(base, tuned, run):
            b, t = perplexity(base), perplexity(tuned)
        rows.append({"metric": "swap_ppl", "layer": index, "mode": "swap", "base": b, "tuned": t, "value": t - b,
                     "blocks": f"{run.start}-{run.stop - 1}"})
    return rows
