"""Linear-layer discovery: every linear layer inside the decoder blocks of a causal LM, as a `LayerId`.

`LayerId` is the one vocabulary of the package: rankings, gates, selections and heatmaps all speak it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ila.errors import IlaError

__all__ = ["LayerId", "find_blocks", "discover_layers", "linear_module_types", "base_model_of"]


@dataclass(frozen=True, order=True)
class LayerId:
    """One linear layer: `name` (module name in the base model), `block` (decoder block index), `role`.

    `role` is the module's last name component (`q_proj`, `down_proj`, `c_attn`); where that repeats inside one
    block (GPT-2's `attn.c_proj` and `mlp.c_proj`) it is the shortest unique dotted suffix.
    """

    name: str
    block: int
    role: str


def linear_module_types() -> tuple[type, ...]:
    """Module classes that count as linear layers: `nn.Linear` and GPT-2 style `Conv1D`."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the `nn.ModuleList` of identical modules (`model.layers`, `transformer.h`) whose length
    is the config's `num_hidden_layers`; without that field, the longest such list."""
    model = base_model_of(model)
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = getattr(text_config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if depth is not None and len(module) == depth:
            return name, module  # the outermost list of the right length (not a list of experts inside a block)
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise IlaError(f"model {type(model).__name__}: found no stack of decoder blocks (an nn.ModuleList)")
    return best


def _unwrap_linear(module: nn.Module) -> nn.Module:
    """A PEFT-wrapped layer's `base_layer`, else the module."""
    return getattr(module, "base_layer", module)


def discover_layers(model: nn.Module, roles: Sequence[str] | None = None) -> list[LayerId]:
    """Every linear layer inside the decoder blocks, in block order then module order.

    `roles` filters by role (exact names or regular expressions matched against the whole role). Works on the
    bare transformers model and on a PEFT-wrapped one (names are those of the base model either way).
    """
    base = base_model_of(model)
    prefix, blocks = find_blocks(base)
    linear_types = linear_module_types()
    layers: list[LayerId] = []
    for index, block in enumerate(blocks):
        local: list[str] = []
        for rel_name, module in block.named_modules():
            if not rel_name or ".lora_" in f".{rel_name}" or rel_name.endswith("base_layer"):
                continue
            if isinstance(_unwrap_linear(module), linear_types):
                local.append(rel_name)
        for rel_name, role in zip(local, _roles_for(local), strict=True):
            layers.append(LayerId(name=f"{prefix}.{index}.{rel_name}", block=index, role=role))
    if roles:
        patterns = [re.compile(r) for r in roles]
        layers = [layer for layer in layers if any(p.fullmatch(layer.role) for p in patterns)]
    if not layers:
        wanted = f" with roles {list(roles)}" if roles else ""
        raise IlaError(f"model {type(base).__name__}: no linear layers in its decoder blocks{wanted}")
    return layers


def _roles_for(rel_names: Iterable[str]) -> list[str]:
    """Shortest dotted suffix of each relative name that is unique within the block."""
    names = list(rel_names)
    roles = []
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if sum(1 for other in names if other == suffix or other.endswith("." + suffix)) == 1:
                roles.append(suffix)
                break
        else:
            roles.append(name)
    return roles


def role_order(layers: Iterable[LayerId]) -> list[str]:
    """Roles in the order they first appear in the model (for heatmap rows)."""
    seen: dict[str, None] = {}
    for layer in layers:
        seen.setdefault(layer.role, None)
    return list(seen)


def contiguous_runs(n_blocks: int, segments: int) -> list[range]:
    """`segments` contiguous runs of block indices, as equal as possible: with n_blocks = q·segments + m, the
    first m runs hold q + 1 blocks and the rest q (numpy's `array_split`). Mid-Block segments and layer swapping
    use it."""
    q, m = divmod(n_blocks, segments)
    starts = [i * q + min(i, m) for i in range(segments + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(segments)]
