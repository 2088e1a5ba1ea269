"""Export a ranking's layer selection as the config of another fine-tuning tool (`ila export`).

The selection is `ila.selection.select_layers` over the ranking's own layers, so `--select` means here what it
means for `ila train`. Each format names exactly the selected modules under the tool's own matching rule:

- `peft`: `adapter_config.json` from `peft.LoraConfig(...).to_dict()`. PEFT adapts a module whose name equals a
  `target_modules` entry or ends with "." + entry (peft `tuners_utils.check_target_module_exists`).
- `axolotl`: YAML with `adapter: lora` and `lora_target_modules` (handed to `peft.LoraConfig` as is), and the
  same layers as `unfrozen_parameters` regexes for full fine-tuning, commented out (axolotl applies them after
  PEFT wraps the model, so both at once would freeze every LoRA weight).
- `llama-factory`: YAML with `finetuning_type: lora` and `lora_target: a,b,c` (split at commas, handed to PEFT).
- `spectrum`: Spectrum's `unfrozen_parameters:` list for axolotl.

Axolotl matches `unfrozen_parameters` with `re.match` after escaping every `.` not followed by `+`
(`src/axolotl/utils/freeze.py`, `LayerNamePattern`), so the regexes are `^<module name>.(weight|bias)$` with bare
dots: an escaped dot would become a backslash followed by any character.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ila.errors import IlaError
from ila.io import write_json_atomic, write_text_atomic
from ila.layers import role_order
from ila.ranking import Ranking
from ila.selection import Selection, select_layers

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["FORMATS", "DEFAULT_OUT", "export", "peft_config", "unfrozen_parameters"]

FORMATS = ("peft", "axolotl", "llama-factory", "spectrum")

DEFAULT_OUT = {"peft": "adapter_config.json", "axolotl": "axolotl.yaml", "llama-factory": "llama-factory.yaml",
               "spectrum": "spectrum.yaml"}

# LoRA settings the YAML formats write, under each tool's key names
YAML_LORA_KEYS = {
    "axolotl": {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"},
    "llama-factory": {"r": "lora_rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"},
}

# Spectrum (cognitivecomputations/spectrum, spectrum.py `generate_unfrozen_params_yaml`) always unfreezes these two
SPECTRUM_FIXED = ("^lm_head.weight$", "^model.embed_tokens.weight$")


def export(
    ranking: Ranking | str | Path,
    select: str = "top:0.3",
    format: str = "peft",
    out: str | Path | None = None,
    *,
    seed: int = 0,
    **lora_kwargs: Any,
) -> Path:
    """Write the layers that `select` picks from `ranking` as a `format` config (one of `FORMATS`) to `out`.

    `out` is a file, or an existing folder to write `DEFAULT_OUT[format]` in (default: the current folder);
    `LoraConfig.from_pretrained(folder)` reads the `peft` file as `adapter_config.json` in a folder.
    `lora_kwargs` are `peft.LoraConfig` fields (`r`, `lora_alpha`, `lora_dropout`, ...; None = not given); the
    YAML formats write only `r`, `lora_alpha` and `lora_dropout`, `spectrum` (full fine-tuning) none. `seed` is
    for `--select random:F`. Writes atomically; returns the path written.
    """
    if format not in FORMATS:
        raise IlaError(f"export: unknown format {format!r} (expected one of: {', '.join(FORMATS)})")
    lora_kwargs = {k: v for k, v in lora_kwargs.items() if v is not None}
    loaded, source = _load(ranking)
    selection = _select(loaded, source, select, seed)
    path = Path(out) if out is not None else Path(DEFAULT_OUT[format])
    if path.is_dir():
        path = path / DEFAULT_OUT[format]
    if format == "peft":
        config = _lora_config([x.name for x in selection.trained], lora_kwargs)
        return write_json_atomic(path, _config_json(config, [x.name for x in selection.trained]))
    if format == "spectrum":
        if lora_kwargs:
            raise IlaError(f"export --format spectrum: full fine-tuning takes no LoRA settings "
                           f"(got {', '.join(sorted(lora_kwargs))})")
        text = _spectrum_yaml(loaded, selection, source)
    else:
        _lora_config([x.name for x in selection.trained], lora_kwargs)  # validates the settings
        unknown = sorted(set(lora_kwargs) - set(YAML_LORA_KEYS[format]))
        if unknown:
            raise IlaError(f"export --format {format}: writes only the LoRA settings "
                           f"{', '.join(YAML_LORA_KEYS[format])} (got {', '.join(unknown)})")
        writer = _axolotl_yaml if format == "axolotl" else _llama_factory_yaml
        text = writer(loaded, selection, source, lora_kwargs)
    return write_text_atomic(path, text)


def peft_config(
    ranking: Ranking | str | Path, select: str = "top:0.3", *, seed: int = 0, **lora_kwargs: Any,
) -> LoraConfig:
    """A `peft.LoraConfig` whose `target_modules` are exactly the module names `select` picks from `ranking`;
    `lora_kwargs` (`r`, `lora_alpha`, `lora_dropout`, ...; None = not given) pass through, `task_type`
    defaults to CAUSAL_LM."""
    loaded, source = _load(ranking)
    names = [x.name for x in _select(loaded, source, select, seed).trained]
    return _lora_config(names, {k: v for k, v in lora_kwargs.items() if v is not None})


def unfrozen_parameters(names: Sequence[str]) -> list[str]:
    """Axolotl `unfrozen_parameters` regexes matching exactly the weight and bias of each named module under
    axolotl's rule (every `.` not followed by `+` escaped, then `re.match`)."""
    return ["^" + ".".join(re.escape(part) for part in name.split(".")) + ".(weight|bias)$" for name in names]


# -- selection ------------------------------------------------------------------------------------------------


def _load(ranking: Ranking | str | Path) -> tuple[Ranking, str]:
    """The ranking and how messages name it ("ranking PATH")."""
    if isinstance(ranking, Ranking):
        loaded, source = ranking, str(ranking.metadata.get("source") or "ranking (in memory)")
    else:
        loaded, source = Ranking.load(ranking), f"ranking {ranking}"
    blocks = [x.name for x in loaded.layers if x.role == "block" and x.name == f"block {x.block}"]  # by_block()
    if blocks:
        raise IlaError(f"{source}: ranks blocks ({blocks[0]}), not modules; export needs a ranking of linear layers")
    return loaded, source


def _select(ranking: Ranking, source: str, select: str, seed: int) -> Selection:
    try:
        return select_layers(select, ranking.layers, [ranking], seed=seed)
    except IlaError as exc:
        raise IlaError(f"{source}: {exc}") from None


# -- LoRA settings --------------------------------------------------------------------------------------------


def _lora_config(names: list[str], kwargs: dict[str, Any]) -> LoraConfig:
    from peft import LoraConfig

    if "target_modules" in kwargs:
        raise IlaError("LoRA settings: target_modules comes from --select; do not pass it")
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise IlaError(f"LoRA settings: {unknown[0]!r} is not a peft.LoraConfig field (e.g. r, lora_alpha, "
                       "lora_dropout)")
    _check_number(kwargs, "r", integer=True, low=1)
    _check_number(kwargs, "lora_alpha", low=0, low_open=True)
    _check_number(kwargs, "lora_dropout", low=0, high=1)
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **kwargs, "target_modules": list(names)})
    except (TypeError, ValueError) as exc:
        text = str(exc).strip().splitlines()
        raise IlaError(f"LoRA settings: {text[0] if text else type(exc).__name__}") from None


def _check_number(kwargs: dict[str, Any], key: str, *, integer: bool = False, low: float = 0,
                  low_open: bool = False, high: float | None = None) -> None:
    if key not in kwargs:
        return
    value = kwargs[key]
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        want = "an integer ≥ 1" if integer else (f"a number in [{low}, {high})" if high is not None
                                                  else f"a number > {low}")
        raise IlaError(f"LoRA settings: {key}={value!r} is not {want}")


def _config_json(config: Any, names: list[str]) -> dict[str, Any]:
    """`config.to_dict()` as JSON, as `PeftConfig.save_pretrained` writes it (sets as lists, enums as values);
    `target_modules` in model order."""
    data = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        if isinstance(value, enum.Enum):
            value = value.value
        data[key] = value
    data["target_modules"] = list(names)
    return data


# -- YAML -----------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    """A YAML scalar: plain where it reads back as the same string, else JSON-quoted (valid YAML)."""
    if isinstance(value, str):
        try:
            plain = value.strip() == value and yaml.safe_load(value) == value and "\n" not in value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    return json.dumps(value)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _header(ranking: Ranking, selection: Selection, source: str, what: str) -> list[str]:
    blocks = {x.block for x in selection.trained}
    all_blocks = {x.block for x in ranking.layers}
    method = ranking.method or "unknown"
    level = ranking.metadata.get("level", "layer")
    return [
        f"# {what}, written by `ila export`",
        f"# from {_one_line(source)} (method {_one_line(method)}, level {_one_line(level)})",
        f"# --select {_one_line(selection.strategy)}: {len(selection.trained)} of {selection.total} linear layers "
        f"({selection.fraction:.0%}) in {len(blocks)} of {len(all_blocks)} blocks",
    ]


def _lora_lines(format: str, lora_kwargs: dict[str, Any]) -> list[str]:
    keys = YAML_LORA_KEYS[format]
    return [f"{keys[k]}: {_scalar(lora_kwargs[k])}" for k in keys if k in lora_kwargs]


def _list(key: str, values: Sequence[str], prefix: str = "") -> list[str]:
    return [f"{prefix}{key}:", *(f"{prefix}- {_scalar(v)}" for v in values)]


def _axolotl_yaml(ranking: Ranking, selection: Selection, source: str, lora_kwargs: dict[str, Any]) -> str:
    names = [x.name for x in selection.trained]
    lines = [
        *_header(ranking, selection, source, "axolotl config fragment"),
        "# LoRA on exactly these modules: axolotl hands lora_target_modules to peft.LoraConfig(target_modules=...)",
        "# (src/axolotl/loaders/adapter.py); lora_target_linear: true would add every linear layer.",
        "adapter: lora",
        "lora_target_linear: false",
        *_list("lora_target_modules", names),
        *_lora_lines("axolotl", lora_kwargs),
        "# Full fine-tuning of the same layers instead: delete the adapter and lora_* keys above and uncomment",
        "# unfrozen_parameters. axolotl freezes by it after PEFT has wrapped the model (src/axolotl/train.py), so",
        "# next to `adapter: lora` these base-model names would freeze every LoRA weight. Matched with re.match",
        "# after every '.' not followed by '+' is escaped (src/axolotl/utils/freeze.py, LayerNamePattern).",
        *_list("unfrozen_parameters", unfrozen_parameters(names), prefix="# "),
    ]
    return "\n".join(lines) + "\n"


def _llama_factory_yaml(ranking: Ranking, selection: Selection, source: str, lora_kwargs: dict[str, Any]) -> str:
    names = [x.name for x in selection.trained]
    lines = [
        *_header(ranking, selection, source, "LLaMA-Factory config fragment"),
        "# LoRA on exactly these modules: LLaMA-Factory splits lora_target at commas and hands the names to PEFT as",
        "# target_modules (src/llamafactory/hparams/finetuning_args.py, src/llamafactory/model/adapter.py).",
        "# finetuning_type: freeze cannot express this selection: it trains the last (or first) N blocks",
        "# (freeze_trainable_layers) with the same sub-modules in each (freeze_trainable_modules), so it is not",
        "# written here; for full fine-tuning of exactly these layers use --format axolotl or spectrum.",
        "finetuning_type: lora",
        f"lora_target: {_scalar(','.join(names))}",
        *_lora_lines("llama-factory", lora_kwargs),
    ]
    return "\n".join(lines) + "\n"


def _spectrum_yaml(ranking: Ranking, selection: Selection, source: str) -> str:
    rank = {x.name: i for i, x in enumerate(ranking.ordered())}
    lines = [
        *_header(ranking, selection, source, "Spectrum unfrozen_parameters for axolotl"),
        "# Matched with re.match after every '.' not followed by '+' is escaped (axolotl src/axolotl/utils/freeze.py).",
        f"# The first two lines are Spectrum's own: it always trains {' and '.join(SPECTRUM_FIXED)};",
        "# delete them to train only the selected layers.",
        "unfrozen_parameters:",
        *(f"- {_scalar(p)}" for p in SPECTRUM_FIXED),
    ]
    for role in role_order(selection.trained):
        members = sorted((x for x in selection.trained if x.role == role), key=lambda x: rank[x.name])
        lines.append(f"# {role} layers")
        lines.extend(f"- {_scalar(p)}" for p in unfrozen_parameters([x.name for x in members]))
    return "\n".join(lines) + "\n"

