"""The importance-method interface and its registry.

An importance method is one file in `ila/importance/` that calls `register(ImportanceMethod(...))` at import:
a name, a one-line summary, what it needs, an optional options dataclass (its YAML section, named after the
method, and its flags) and `score(inputs) -> Scores`. The identify job (`importance/job.py`) prepares what the
method needs, calls `score`, and writes the ranking; the CLI, the API, config validation, ranking metadata,
the heatmap and `ila compare` learn about methods from this registry alone.

Method files keep heavy imports (torch, transformers, peft) inside `score`, so that listing methods and
building the command line stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ila.registry import Registry

# What a method can ask for.
NEEDS_MODEL = "model"  # the base model and its layers
NEEDS_DATA = "data"  # tokenised train / held-out examples
NEEDS_UPDATE = "update"  # a stage-1 update: trained here (stage 1) or given with --adapter
NEEDS_WEIGHTS = "weights"  # the model's safetensors files, read one tensor at a time (no loaded model)

ALL = "all"  # `--method all`: every registered method on one model and data

# Modules of this package that are not methods (imported on demand only: they import torch).
HELPERS = {"base", "job", "stage1", "stage2", "stability"}


@dataclass
class Inputs:
    """What the identify job hands a method: everything it declared it needs, and its options."""

    config: Any  # IdentifyConfig
    options: Any  # the method's options dataclass (None if it has none)
    layers: list  # LayerId of every layer to rank, model order
    model: Any = None  # the base model; with an update, the tuned model (PEFT LoRA, or fully tuned)
    tokenizer: Any = None
    train: Any = None  # datasets.Dataset of tokenised examples
    heldout: Any = None
    collator: Any = None
    update: Any = None  # ila.importance.stage1.Update (with NEEDS_UPDATE)
    weights: Any = None  # ila.models.WeightFiles of the model (with NEEDS_WEIGHTS)
    tracked: Any = None  # what the method's `track` callback recorded during stage 1
    work_dir: Path | None = None  # scratch space inside the run folder, removed at the end


@dataclass
class Scores:
    """A method's answer: one score per layer of `Inputs.layers` (higher = more important)."""

    scores: list[float]
    metadata: dict[str, Any] = field(default_factory=dict)  # what the method measured (steps, losses, cost)
    tiebreak: list[float] | None = None  # orders layers with equal scores (higher first); None: by name hash
    gates: bool = False  # the scores are gate logits sᵢ (the ranking also stores σ(sᵢ))


@dataclass(frozen=True)
class ImportanceMethod:
    """One importance method."""

    name: str
    summary: str  # one line: what it measures
    needs: frozenset[str]
    score: Callable[[Inputs], Scores]
    options: type | None = None  # dataclass of `option(...)` fields
    title: str = ""  # heatmap title prefix, e.g. "ILA scores sᵢ"
    level: str = "layer"  # "layer", or "block" for a signal given to every layer of a block
    # check(config, options) raises IlaError for a config the method cannot run with
    check: Callable[[Any, Any], None] | None = None
    # check_layers(options, layers) raises IlaError for layers the method cannot score (before any training)
    check_layers: Callable[[Any, list], None] | None = None
    # track(model, layers) -> a transformers TrainerCallback attached to stage-1 training; the callback reaches
    # `score` as `inputs.tracked` (a method with `track` needs stage 1 trained here: no --adapter)
    track: Callable[[Any, list], Any] | None = None
    # runs where FSDP or ZeRO-3 shard the parameters: it reads whole weights only through ila.distributed (others
    # are refused there: gates added after sharding are not all-reduced, local gradients and norms are shards)
    sharded: bool = False

    def needs_update(self) -> bool:
        return NEEDS_UPDATE in self.needs

    def needs_training(self) -> bool:
        """The method watches stage-1 training, so a given adapter cannot stand in for it."""
        return self.track is not None


def _reserved() -> set[str]:
    import dataclasses

    from ila.config import IdentifyConfig

    return {f.name for f in dataclasses.fields(IdentifyConfig)} | {ALL}


_REGISTRY: Registry[ImportanceMethod] = Registry("importance method", "method", "ila.importance", HELPERS, _reserved)


def register(method: ImportanceMethod) -> ImportanceMethod:
    """Add a method to the registry (a method file calls this at import); a name registers once."""
    if method.level not in ("layer", "block"):
        raise ValueError(f"method {method.name}: level {method.level!r} is not 'layer' or 'block'")
    if method.track is not None and NEEDS_UPDATE not in method.needs:
        raise ValueError(f"method {method.name}: tracks stage 1, so it must need an update")
    return _REGISTRY.add(method.name, method, method.score.__module__)


def unregister(name: str) -> None:
    """Remove a method (tests that register a throw-away one)."""
    _REGISTRY.remove(name)


def methods() -> dict[str, ImportanceMethod]:
    """Every registered method by name (the method files of this package are imported once, on first call)."""
    return _REGISTRY.all()


def method_names(name: str) -> list[str]:
    """The methods `--method name` runs: every registered one for 'all' (data-free and base-model methods first,
    then those that score the stage-1 update), else `name` alone."""
    if name != ALL:
        return [get_method(name).name]
    return sorted(methods(), key=lambda n: (methods()[n].needs_update(), n))


def get_method(name: str) -> ImportanceMethod:
    """The method called `name`; an unknown name is an `IlaError` listing the known ones."""
    hint = " (the stage-1 update is --update lora|full)" if name in ("lora", "full") else ""
    return _REGISTRY.get(name, hint)


def method_of(metadata: dict[str, Any]) -> str | None:
    """The method a ranking's metadata names (rankings from before the registry say 'ila-lora', 'ila-full' or
    'stage2-on-adapter': ILA)."""
    name = metadata.get("method")
    if name in ("ila-lora", "ila-full", "stage2-on-adapter"):
        return "ila"
    return name if isinstance(name, str) else None


def describe() -> str:
    """One line per method: name, what it measures, what it needs (`ila identify --list-methods`)."""
    lines = []
    for name, m in sorted(methods().items()):
        needs = ", ".join(sorted(m.needs)) or "nothing"
        lines.append(f"{name:<18} {m.summary} [needs: {needs}; {m.level}-level]")
    return "\n".join(lines)
