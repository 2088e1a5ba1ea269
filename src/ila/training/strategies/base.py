"""The training-strategy interface and its registry.

A training strategy is one file in `ila/training/strategies/` that calls `register(Strategy(...))` at import:
a name, a one-line summary, the training methods it works with, an optional options dataclass (its YAML section
named after the strategy, and its flags), and `prepare(context) -> Plan`. `prepare` makes the model trainable
(adapters, `requires_grad`) and returns the Trainer callbacks that steer training; `ila train`
(`training/finetune.py`) runs the HF Trainer with them. The CLI, the API, config validation and `ila experiment`
grids learn about strategies from this registry alone.

Strategy files keep heavy imports (torch, transformers, peft) inside functions, so that building the command
line stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ila.errors import IlaError
from ila.registry import Registry

DEFAULT = "selection"


@dataclass
class Context:
    """What `ila train` hands a strategy's `prepare`."""

    config: Any  # ila.config.TrainConfig
    options: Any  # the strategy's options dataclass (None if it has none)
    model: Any  # the loaded base model
    layers: list  # LayerId of every linear layer in the decoder blocks, model order
    rankings: list  # ila.ranking.Ranking given with --ranking ("source" names the file)
    train: Any  # datasets.Dataset of tokenised training examples
    collator: Any  # the batch collator of `train`


@dataclass
class Plan:
    """A strategy's answer: the model to train and how to steer its training."""

    model: Any  # the model the Trainer trains (PEFT-wrapped or not)
    selection: Any  # ila.selection.Selection: the layers whose parameters train at some step (selection.json)
    callbacks: list = field(default_factory=list)  # transformers TrainerCallbacks
    extra_loss: Callable[[], Any] | None = None  # added to the task loss once per optimizer step
    # some trainable parameters get no gradient in a step (DDP must look for unused parameters)
    sparse_steps: bool = False
    record: Callable[[], dict] | None = None  # what the strategy measured, for run.json["strategy_record"]
    finish: Callable[[Path, dict], None] | None = None  # writes the strategy's own files: (run folder, run metadata)


@dataclass(frozen=True)
class Strategy:
    """One training strategy."""

    name: str
    summary: str  # one line: what it trains when
    prepare: Callable[[Context], Plan]
    methods: tuple[str, ...]  # training methods (`--method`) it works with
    options: type | None = None  # dataclass of `option(...)` fields
    # check(config, options) raises IlaError for a config the strategy cannot run with (before any loading)
    check: Callable[[Any, Any], None] | None = None
    # needs_ranking(config, options): whether it reads a --ranking (`ila experiment` supplies one)
    needs_ranking: Callable[[Any, Any], bool] = lambda config, options: False
    needs_data: bool = False  # prepare reads Context.train and Context.collator (not only the Trainer does)


def _reserved() -> set[str]:
    import dataclasses

    from ila.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


_REGISTRY: Registry[Strategy] = Registry("training strategy", "strategy", "ila.training.strategies", {"base"},
                                         _reserved)


def register(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry (a strategy file calls this at import)."""
    return _REGISTRY.add(strategy.name, strategy, strategy.prepare.__module__)


def strategies() -> dict[str, Strategy]:
    """Every registered strategy by name (the files of this package are imported once, on first call)."""
    return _REGISTRY.all()


def get_strategy(name: str) -> Strategy:
    """The strategy called `name`; an unknown name is an `IlaError` listing the known ones."""
    return _REGISTRY.get(name)


def no_rankings(config: Any, name: str) -> None:
    """Raise if rankings were given to a strategy that does not read them."""
    if config.rankings:
        raise IlaError(f"rankings: strategy {name} reads no ranking, but {config.rankings[0]} was given")


def check_method(config: Any, strategy: Strategy) -> None:
    """Raise unless `config.method` is one the strategy works with."""
    if config.method not in strategy.methods:
        raise IlaError(f"method: strategy {strategy.name} trains with {' or '.join(strategy.methods)}, not "
                       f"{config.method!r}")


def describe() -> str:
    """One line per strategy (`ila train --list-strategies`)."""
    return "\n".join(f"{name:<10} {s.summary} [methods: {', '.join(s.methods)}]"
                     for name, s in sorted(strategies().items()))
