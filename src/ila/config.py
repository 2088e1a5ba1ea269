"""Job configuration: dataclasses, YAML loading and validation with one-line errors.

A YAML file mirrors `IdentifyConfig` (top-level keys `model`, `data`, `method`, …, sections `lora` and `stage1`,
and one section per importance method named after it, e.g. `ila:`) or `TrainConfig`. CLI options override the
file. Fields are declared once with `ila.options.option` (type, default, check, help, flag). Defaults cite the
paper (seeds/000) where one applies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ila.errors import IlaError
from ila.options import (
    below_one,
    check_fields,
    each,
    fraction,
    fraction_or_zero,
    non_negative,
    one_of,
    option,
    positive,
    regex,
)
from ila.options import seed as seed_range

MODEL_HELP = ("local HF folder, hub name, .gguf file, or embedded name (smollm2-135m, gemma3-270m); "
              "default smollm2-135m")
DATA_HELP = ("an embedded set (gsm8k, roleplay, codegen, harmless: ila datasets), an alpaca/messages/dialogue "
             ".json/.jsonl file, a hub dataset name, or bigbench:TASK[/SUBTASK_GLOB] with ILA_BIGBENCH; default gsm8k")


@dataclass
class LoraConfig:
    """The LoRA adapter of a fine-tune (seeds/000 App. B: r = 32, dropout 0.1)."""

    r: int = option(32, "LoRA rank", check=positive)
    alpha: float = option(32.0, "LoRA alpha; the update is scaled by alpha / r", check=positive)
    dropout: float = option(0.1, "LoRA dropout", check=below_one)
    target_roles: list[str] | None = option(None, "regexes of the layer roles to adapt (null: every linear layer "
                                            "inside the decoder blocks)", check=each(regex))


@dataclass
class Stage1Config:
    """Stage 1, the update the update-based methods score: train until the loss is ε-stable (Def. 1);
    `max_steps` always caps it."""

    update: str = option("lora", "stage-1 update: LoRA, or full fine-tuning of the ranked layers (ΔW = θ_t − θ₀, "
                         "Obs. 2)", check=one_of("lora", "full"), flag="--update")
    max_steps: int = option(200, "stage-1 step cap (stage 1 stops earlier once ε-stable)", check=positive, flag=True)
    batch_size: int = option(4, "stage-1 per-device batch size", check=positive)
    gradient_accumulation_steps: int = option(1, "stage-1 micro-batches per optimizer step", check=positive)
    learning_rate: float = option(2e-4, "stage-1 learning rate (full fine-tuning wants ~1e-5, App. B)",
                                  check=positive)
    weight_decay: float = option(0.1, "AdamW weight decay (App. B)", check=non_negative)
    warmup_ratio: float = option(0.01, "fraction of steps of linear warm-up (App. B)", check=fraction_or_zero)
    epsilon: float = option(1e-3, "ε of Def. 1: per-step change of the expected loss below which training is "
                            "stable", check=positive, flag=True)
    interval: int = option(10, "steps between two estimates of the expected loss", check=positive)
    probe_examples: int = option(32, "held-out examples whose mean loss estimates E_z[L] (0: EMA of the train "
                                 "loss)", check=non_negative)
    smoothing: float = option(0.9, "EMA factor of the train-loss estimate (used without a probe set)",
                              check=below_one)
    patience: int = option(2, "consecutive ε-stable checks required", check=positive)
    min_steps: int = option(20, "never stop before this step", check=non_negative)
    milestones: list[float] = option(help="fractions of max_steps to also rank at (Table 4)", check=each(fraction),
                                     flag=True, factory=list)
    save_steps: int = option(50, "checkpoint interval (resume with --resume)", check=positive)


@dataclass
class IdentifyConfig:
    """Everything `ila identify` needs: shared settings, the stage-1 update, and each method's own options.

    `method_options[name]` holds the options of method `name` (YAML: a top-level section named after the
    method); it is filled with defaults for the method that runs.
    """

    model: str | None = option(None, MODEL_HELP, flag=True)
    data: str | None = option(None, DATA_HELP, flag=True)
    method: str = option("ila", "importance method (see --list-methods), or 'all' to run every method on one "
                         "model and data and compare them", flag=True)
    adapter: str | None = option(None, "trained PEFT LoRA adapter for --model: the stage-1 update, instead of "
                                 "training one", flag=True)
    seed: int = option(0, "seed of the training (initialisation, dropout, batch order) and, unless --data-seed is "
                       "given, of the data", check=seed_range, flag=True)
    data_seed: int | None = option(None, "seed of the example sample, the train/held-out split and the probe sets "
                                   "drawn from them (null: seed)", check=seed_range, flag=True)
    max_length: int = option(256, "truncate examples to this many tokens", check=positive, flag=True)
    max_examples: int | None = option(2000, "cap on the examples read from --data", check=positive, flag=True)
    heldout_fraction: float = option(0.1, "fraction of examples held out (the stage-1 probe is drawn from them)",
                                     check=below_one)
    dtype: str = option("float32", "float32, or bfloat16 autocast", check=one_of("float32", "bfloat16"))
    report_to: str = option("none", "any TrainingArguments.report_to value: tensorboard (event files in "
                            "DIR/logs/), wandb, ...", flag=True)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    method_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> IdentifyConfig:
        """Raise `IlaError` naming the first invalid field."""
        from ila.importance.base import get_method, method_names

        check_fields(self)
        names = method_names(self.method)
        for name, options in self.method_options.items():
            check_fields(options, f"{name}.")
        for name in names:
            method = get_method(name)
            if method.options is not None and name not in self.method_options:
                self.method_options[name] = method.options()
            if method.check is not None:
                method.check(self, self.method_options.get(name))
        return self

    @property
    def sample_seed(self) -> int:
        """The seed of the example sample, the train/held-out split and the probe sets drawn from them."""
        return self.seed if self.data_seed is None else self.data_seed

    def options(self, method: str | None = None) -> Any:
        """The options of `method` (default: the running one) as a dataclass of its file, or None if it has
        none."""
        return self.method_options.get(method or self.method)


@dataclass
class AnalyzeConfig:
    """Everything `ila analyze` needs (seeds/004's layer-wise base-vs-tuned analysis)."""

    base: str | None = option(None, "the base model: " + MODEL_HELP, flag=True)
    tuned: str | None = option(None, "the tuned model: a model folder (same architecture as --base), a PEFT LoRA "
                               "adapter for --base, or an `ila train` run folder", flag=True)
    data: str | None = option(None, DATA_HELP, flag=True)
    ranking: str | None = option(None, "a ranking.json for --base: correlates each per-layer metric with its "
                                 "block-level importance (correlation.csv)", flag=True)
    max_examples: int = option(128, "examples analysed (dataset-level metrics keep one pooled vector per example "
                               "per layer)", check=positive, flag=True)
    max_length: int = option(256, "truncate examples to this many tokens", check=positive, flag=True)
    batch_size: int = option(8, "examples per forward pass", check=positive, flag=True)
    segments: int = option(5, "contiguous segments of blocks for layer swapping", check=positive, flag=True)
    alpha: float = option(1.0, "order α of the matrix entropies (1: Shannon)", check=positive, flag=True)
    sparsity_threshold: float = option(0.01, "|activation| below this counts as inactive (sparsity)",
                                       check=positive, flag=True)
    probe: bool = option(True, "logit lens: each layer through the final norm and LM head", flag=True)
    swap: bool = option(True, "layer swapping: held-out perplexity with one segment exchanged", flag=True)
    seed: int = option(0, "seed of the example sample", check=seed_range, flag=True)
    dtype: str = option("float32", "float32, or bfloat16 weights", check=one_of("float32", "bfloat16"))

    def validate(self) -> AnalyzeConfig:
        check_fields(self)
        if self.tuned is None:
            raise IlaError("tuned: required (a model folder, a PEFT adapter for --base, or an ila train run folder)")
        if self.segments < 2:
            raise IlaError(f"segments: {self.segments} must be at least 2")
        return self


METHODS = ("lora", "qlora", "full", "adalora")


@dataclass
class AdaLoraSettings:
    """AdaLoRA rank allocation (PEFT `AdaLoraConfig`); steps are fractions of `max_steps`."""

    init_r: int = 12
    target_r: int = 8
    tinit: float = 0.1  # fraction of steps before rank pruning starts
    tfinal: float = 0.2  # fraction of final steps with the ranks fixed
    delta_t: int = 10  # steps between two rank re-allocations


@dataclass
class TrainConfig:
    """Everything `ila train` needs. Defaults: seeds/000 App. B."""

    model: str | None = None
    data: str | None = None
    method: str = "lora"  # lora | qlora | full | adalora
    select: str = "all"  # see ila.selection
    rankings: list[str] = field(default_factory=list)
    transfer: bool = False  # map rankings from another architecture by relative depth and role
    seed: int = 0
    select_seed: int | None = None  # seed of random:F draws (None: `seed`), e.g. RL 1 / RL 2 at one training seed
    data_seed: int | None = None  # seed of the example sample and train/held-out split (None: `seed`)
    max_length: int = 512
    max_examples: int | None = None
    heldout_fraction: float = 0.05
    max_steps: int = 200
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # None: 2e-4 for adapters, 1e-5 for full fine-tuning
    weight_decay: float = 0.1
    warmup_ratio: float = 0.01
    scheduler: str = "cosine"
    save_steps: int = 50  # checkpoint interval; 0: no checkpoints (a run that cannot be resumed)
    dtype: str = "float32"  # float32 | bfloat16 (autocast; QLoRA compute dtype)
    report_to: str = "none"
    # full only: also train what lies outside the blocks' linear layers (embeddings, norms, LM head).
    # None: yes when select freezes layers (all, freeze-bottom, random, first, last, intersect), no when it
    # names the layers to train (top, names): "top:0.3" then trains those 30 % and nothing else
    train_other: bool | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    adalora: AdaLoraSettings = field(default_factory=AdaLoraSettings)
    strategy: str = "selection"  # training strategy (ila.training.strategies): selection | lisa | ist | midblock
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, more time)
    # strategy_options[name]: the options of strategy `name` (YAML: a top-level section named after it)
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        from ila.training.strategies.base import DEFAULT, get_strategy

        if self.method not in METHODS:
            raise IlaError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        strategy = get_strategy(self.strategy)
        if self.strategy != DEFAULT:
            for name, default in (("select", "all"), ("train_other", None), ("transfer", False)):
                if getattr(self, name) != default:
                    raise IlaError(f"{name}: {getattr(self, name)!r} applies to strategy selection only, not "
                                   f"{self.strategy!r}")
        for name, options in self.strategy_options.items():
            check_fields(options, f"{name}.")
        if strategy.options is not None and self.strategy not in self.strategy_options:
            self.strategy_options[self.strategy] = strategy.options()
        _check("seed", self.seed, seed_range)
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length"):
            _check(name, getattr(self, name), positive)
        _check("save_steps", self.save_steps, non_negative)
        if self.learning_rate is not None:
            _check("learning_rate", self.learning_rate, positive)
        if self.max_examples is not None:
            _check("max_examples", self.max_examples, positive)
        for name in ("select_seed", "data_seed"):
            if getattr(self, name) is not None:
                _check(name, getattr(self, name), seed_range)
        if self.train_other is not None and self.method != "full":
            raise IlaError(f"train_other: applies to method full only, not {self.method!r} (adapters train only "
                           "the selected layers)")
        _check("weight_decay", self.weight_decay, non_negative)
        _check("warmup_ratio", self.warmup_ratio, fraction_or_zero)
        _check("heldout_fraction", self.heldout_fraction, below_one)
        _check("dtype", self.dtype, one_of("float32", "bfloat16"))
        check_fields(self.lora, "lora.")
        a = self.adalora
        for name in ("init_r", "target_r", "delta_t"):
            _check(f"adalora.{name}", getattr(a, name), positive)
        if not (0 <= a.tinit < 1 and 0 <= a.tfinal < 1 and a.tinit + a.tfinal < 1):
            raise IlaError(f"adalora.tinit + adalora.tfinal: {a.tinit} + {a.tfinal} must be fractions summing below 1")
        from ila.selection import parse_select

        parse_select(self.select)
        if strategy.check is not None:
            strategy.check(self, self.options())
        return self

    def options(self) -> Any:
        """The running strategy's options (a dataclass of its file), or None if it has none."""
        return self.strategy_options.get(self.strategy)


def _check(name: str, value: Any, check) -> None:
    """One field of a config that is not declared with `option(...)`, checked by the same `ila.options` check."""
    problem = check(value)
    if problem:
        raise IlaError(f"{name}: {value!r} {problem}")


def read_yaml_mapping(path: str | Path, label: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; one-line errors name `label` and the file."""
    path = Path(path)
    if not path.is_file():
        raise IlaError(f"{label} {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise IlaError(f"{label} {path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise IlaError(f"{label} {path}: expected a mapping of keys at the top level")
    return raw


def _set_dotted(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    """Apply {"stage1.max_steps": 5}-style overrides to nested plain data (None values are skipped)."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                section = ".".join(parents[: depth + 1])
                raise IlaError(f"{where}'{section}' must be a mapping of keys, got {node[part]!r}")
            node = node[part]
        node[leaf] = value
    return raw


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, cls: type | None = None) -> Any:
    """Read a YAML config (optional), apply dotted `overrides` ({"stage1.max_steps": 10}), validate.

    `cls` is the job's config class (default `IdentifyConfig`).
    """
    raw = read_yaml_mapping(path, "config") if path is not None else {}
    where = f"config {path}: " if path is not None else ""
    overrides = overrides or {}
    cls = cls or IdentifyConfig
    key = _SECTIONED[cls][1] if cls in _SECTIONED else None
    if key is not None and overrides.get(key) not in (None, raw.get(key)):
        _drop_other_sections(raw, cls, overrides[key])
    _set_dotted(raw, overrides, where)
    return _build(cls, raw, where, "").validate()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"stage1": {"max_steps": 5}} -> {"stage1.max_steps": 5}, the form `load_config` overrides take."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A validated copy of a config object with dotted `overrides` applied (None values are skipped)."""
    raw = to_dict(config)
    if type(config) in _SECTIONED:
        key = _SECTIONED[type(config)][1]
        _drop_other_sections(raw, type(config), overrides.get(key) or getattr(config, key))
    return _build(type(config), _set_dotted(raw, overrides, ""), "", "").validate()


def _drop_other_sections(raw: dict[str, Any], cls: type, running: str) -> None:
    """Remove the option sections of methods (or strategies) other than `running` (one chosen on the command line
    overrides the file's, and with it the file's sections for the others)."""
    known, _, names_of = _registry(cls)
    for name in set(raw) & set(known) - set(names_of(running)):
        del raw[name]


# Keys that moved, and where to: named in the error instead of a bare "unknown key".
MOVED = {"stage2": "ila (the ILA method's options live under its name)", "stage1.method": "stage1.update"}


def _build(cls: type, raw: dict[str, Any], where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise IlaError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    kind = _SECTIONED.get(cls)  # (what the sections configure, the key naming the running one, the field)
    fields = {f.name: f for f in dataclasses.fields(cls) if kind is None or f.name != kind[2]}
    sections: dict[str, Any] = {}
    known: dict[str, type | None] = {}
    if kind is not None:  # a top-level key named after a method/strategy holds that one's options
        what, key, _ = kind
        known, default, names_of = _registry(cls)
        for name in [k for k in raw if k in known and k not in fields]:
            options_cls, section = known[name], raw.pop(name) or {}
            if options_cls is None:
                if section:
                    raise IlaError(f"{where}{name}: {what} {name!r} takes no options")
                continue
            sections[name] = _build(options_cls, section, where, f"{name}.")
        running = raw.get(key, default)
        # an unknown method or strategy is named before its options are judged
        names = names_of(running) if isinstance(running, str) else [running]
        wrong = sorted(set(sections) - set(names))
        if wrong:
            raise IlaError(f"{where}{wrong[0]}: options for {what} {wrong[0]!r}, but the {key} is {running!r}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        if key in MOVED:
            raise IlaError(f"{where}'{key}' has moved to '{MOVED[key]}'")
        expected = [*fields, *sorted(known)]
        raise IlaError(f"{where}unknown key '{key}' (expected one of: {', '.join(expected)})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, where, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{prefix}{name}")
    config = cls(**kwargs)
    if sections:
        setattr(config, kind[2], sections)
    return config


# Config classes with option sections: (what a section configures, the key naming the running one, the field
# holding the sections).
_SECTIONED = {IdentifyConfig: ("method", "method", "method_options"),
              TrainConfig: ("strategy", "strategy", "strategy_options")}


def _registry(cls: type) -> tuple[dict[str, type | None], str, Any]:
    """The options class of every registered method (IdentifyConfig) or strategy (TrainConfig), the default
    name, and the names a running value stands for."""
    if cls is IdentifyConfig:
        from ila.importance.base import method_names, methods

        return {n: m.options for n, m in methods().items()}, "ila", method_names
    from ila.training.strategies.base import DEFAULT, get_strategy, strategies

    return {n: s.options for n, s in strategies().items()}, DEFAULT, lambda name: [get_strategy(name).name]


def _coerce(value: Any, hint: Any, label: str) -> Any:
    """Check/convert a YAML or CLI value to the field's type (int, float, str, bool, list, optional)."""
    args = get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise IlaError(f"{label}: a value is required")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
        args = get_args(hint)
    if get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise IlaError(f"{label}: expected a list, got {value!r}")
        return [_coerce(v, args[0], label) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise IlaError(f"{label}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise IlaError(f"{label}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise IlaError(f"{label}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise IlaError(f"{label}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise IlaError(f"{label}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise IlaError(f"{label}: expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data, as a YAML file would hold it (method options as top-level sections)."""
    data = dataclasses.asdict(config)
    sections = (data.pop("method_options", None) or {}) | (data.pop("strategy_options", None) or {})
    return data | sections
