"""Job configuration: dataclasses, YAML loading and validation with one-line errors.

A YAML file mirrors `IdentifyConfig` (top-level keys `model`, `data`, …, and sections `lora`, `stage1`,
`stage2`). CLI options override the file. Defaults cite the paper (seeds/000) where one applies.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ila.errors import IlaError


@dataclass
class LoraConfig:
    """Stage-1 LoRA adapter (seeds/000 App. B: r = 32, dropout 0.1)."""

    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.1
    target_roles: list[str] | None = None  # None: every linear layer inside the decoder blocks


@dataclass
class Stage1Config:
    """Stage 1: train until the loss is ε-stable (Def. 1), `max_steps` always caps it."""

    method: str = "lora"  # "lora" or "full" (ΔW = θ_t − θ₀, Obs. 2)
    max_steps: int = 200
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4  # full fine-tuning wants ~1e-5 (App. B search range)
    weight_decay: float = 0.1  # App. B
    warmup_ratio: float = 0.01  # App. B
    epsilon: float = 1e-3  # per-step change of the expected loss below which training is ε-stable
    interval: int = 10  # steps between two estimates of the expected loss
    probe_examples: int = 32  # held-out examples whose mean loss estimates E_z[L] (0: EMA of the train loss)
    smoothing: float = 0.9  # EMA factor of the train-loss estimate (used without a probe set)
    patience: int = 2  # consecutive ε-stable checks required
    min_steps: int = 20  # never stop before this step
    milestones: list[float] = field(default_factory=list)  # fractions of max_steps to rank at (Table 4)
    save_steps: int = 50  # checkpoint interval (resume with --resume)


@dataclass
class Stage2Config:
    """Stage 2: learn one score per layer, gate σ(s) on its update (Eq. 5–7), under the budget H (Def. 2)."""

    steps: int = 64
    batch_size: int = 4
    learning_rate: float = 0.1
    init_score: float = 4.0  # s₀ (App. C.4 compares 4, 2, 1)
    budget: float = 0.75  # H as a fraction of the layer count: Σσ(sᵢ) ≤ budget·N
    budget_weight: float = 0.01  # λ of the hinge penalty λ·max(0, Σσ(sᵢ) − H)


@dataclass
class IdentifyConfig:
    """Everything `ila identify` needs."""

    model: str | None = None  # None: the embedded default (smollm2-135m)
    data: str | None = None  # None: the embedded natural_instructions subset
    adapter: str | None = None  # run stage 2 alone on this PEFT LoRA adapter
    seed: int = 0
    max_length: int = 256
    max_examples: int | None = 2000
    heldout_fraction: float = 0.1
    dtype: str = "float32"  # "float32" or "bfloat16"
    report_to: str = "none"  # any TrainingArguments.report_to value (e.g. "tensorboard", "wandb")
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def validate(self) -> IdentifyConfig:
        """Raise `IlaError` naming the first invalid field."""
        s1, s2 = self.stage1, self.stage2
        _seed(self.seed)
        _regexes("lora.target_roles", self.lora.target_roles)
        _positive("stage1.max_steps", s1.max_steps)
        _positive("stage1.batch_size", s1.batch_size)
        _positive("stage1.gradient_accumulation_steps", s1.gradient_accumulation_steps)
        _positive("stage1.learning_rate", s1.learning_rate)
        _positive("stage1.epsilon", s1.epsilon)
        _positive("stage1.interval", s1.interval)
        _non_negative("stage1.probe_examples", s1.probe_examples)
        if not 0 <= s1.smoothing < 1:
            raise IlaError(f"stage1.smoothing: {s1.smoothing!r} is not in [0, 1)")
        _positive("stage1.patience", s1.patience)
        _positive("stage1.save_steps", s1.save_steps)
        _non_negative("stage1.min_steps", s1.min_steps)
        _non_negative("stage1.weight_decay", s1.weight_decay)
        _fraction("stage1.warmup_ratio", s1.warmup_ratio, allow_zero=True)
        for m in s1.milestones:
            _fraction("stage1.milestones", m)
        if s1.method not in ("lora", "full"):
            raise IlaError(f"stage1.method: {s1.method!r} is not one of 'lora', 'full'")
        _positive("stage2.steps", s2.steps)
        _positive("stage2.batch_size", s2.batch_size)
        _positive("stage2.learning_rate", s2.learning_rate)
        _fraction("stage2.budget", s2.budget)
        _non_negative("stage2.budget_weight", s2.budget_weight)
        if not math.isfinite(s2.init_score):
            raise IlaError(f"stage2.init_score: {s2.init_score!r} is not a finite number")
        _positive("lora.r", self.lora.r)
        _positive("lora.alpha", self.lora.alpha)
        if not 0 <= self.lora.dropout < 1:
            raise IlaError(f"lora.dropout: {self.lora.dropout!r} is not in [0, 1)")
        _positive("max_length", self.max_length)
        if self.max_examples is not None:
            _positive("max_examples", self.max_examples)
        if not 0 <= self.heldout_fraction < 1:
            raise IlaError(f"heldout_fraction: {self.heldout_fraction!r} is not in [0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise IlaError(f"dtype: {self.dtype!r} is not one of 'float32', 'bfloat16'")
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
    save_steps: int = 50
    dtype: str = "float32"  # float32 | bfloat16 (autocast; QLoRA compute dtype)
    report_to: str = "none"
    # full only: also train what lies outside the blocks' linear layers (embeddings, norms, LM head).
    # None: yes when select freezes layers (all, freeze-bottom, random, first, last, intersect), no when it
    # names the layers to train (top, names): "top:0.3" then trains those 30 % and nothing else
    train_other: bool | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    adalora: AdaLoraSettings = field(default_factory=AdaLoraSettings)

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise IlaError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        _seed(self.seed)
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_steps", "max_length"):
            _positive(name, getattr(self, name))
        if self.learning_rate is not None:
            _positive("learning_rate", self.learning_rate)
        if self.max_examples is not None:
            _positive("max_examples", self.max_examples)
        for name in ("select_seed", "data_seed"):
            if getattr(self, name) is not None:
                _seed(getattr(self, name), name)
        if self.train_other is not None and self.method != "full":
            raise IlaError(f"train_other: applies to method full only, not {self.method!r} (adapters train only "
                           "the selected layers)")
        _non_negative("weight_decay", self.weight_decay)
        _fraction("warmup_ratio", self.warmup_ratio, allow_zero=True)
        if not 0 <= self.heldout_fraction < 1:
            raise IlaError(f"heldout_fraction: {self.heldout_fraction!r} is not in [0, 1)")
        if self.dtype not in ("float32", "bfloat16"):
            raise IlaError(f"dtype: {self.dtype!r} is not one of 'float32', 'bfloat16'")
        _positive("lora.r", self.lora.r)
        _positive("lora.alpha", self.lora.alpha)
        if not 0 <= self.lora.dropout < 1:
            raise IlaError(f"lora.dropout: {self.lora.dropout!r} is not in [0, 1)")
        a = self.adalora
        _positive("adalora.init_r", a.init_r)
        _positive("adalora.target_r", a.target_r)
        _positive("adalora.delta_t", a.delta_t)
        if not (0 <= a.tinit < 1 and 0 <= a.tfinal < 1 and a.tinit + a.tfinal < 1):
            raise IlaError(f"adalora.tinit + adalora.tfinal: {a.tinit} + {a.tfinal} must be fractions summing below 1")
        from ila.selection import parse_select

        parse_select(self.select)
        return self


def _seed(value: int, name: str = "seed") -> None:
    if not 0 <= value < 2**32:
        raise IlaError(f"{name}: {value!r} is not in [0, 2**32)")


def _regexes(name: str, patterns: list[str] | None) -> None:
    for pattern in patterns or []:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise IlaError(f"{name}: {pattern!r} is not a valid regular expression ({exc})") from None


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise IlaError(f"{name}: {value!r} must be > 0")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise IlaError(f"{name}: {value!r} must be >= 0")


def _fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        raise IlaError(f"{name}: {value!r} is not a fraction in {'[0' if allow_zero else '(0'}, 1]")


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
    _set_dotted(raw, overrides or {}, where)
    return _build(cls or IdentifyConfig, raw, where, "").validate()


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
    return _build(type(config), _set_dotted(dataclasses.asdict(config), overrides, ""), "", "").validate()


def _build(cls: type, raw: dict[str, Any], where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise IlaError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise IlaError(f"{where}unknown key '{prefix}{unknown[0]}' (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, where, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{prefix}{name}")
    return cls(**kwargs)


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
    """The config as plain data (for run metadata)."""
    return dataclasses.asdict(config)
