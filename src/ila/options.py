"""One declaration per option: its type (the annotation), default, bounds and help are written once, on the field.

Job configs are dataclasses whose fields are declared with `option(...)`. From those declarations come the
config checks (`check_fields`, one-line errors naming the dotted key), the command-line flags (`add_flags`, with
the field's help) and the API keywords (`flag_paths`: keyword → dotted key). An importance method's options join
the same way from the method's own file (see `ila.importance.base`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, get_args, get_origin, get_type_hints

from ila.errors import IlaError

Check = Callable[[Any], "str | None"]  # returns what is wrong with a value, or None


def option(default: Any = dataclasses.MISSING, help: str = "", *, check: Check | None = None,
           flag: str | bool = False, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its help, its check and (optionally) a command-line flag.

    `flag=True` derives the flag from the field name (`max_steps` → `--max-steps`); a string names it.
    `factory` builds a mutable default (a list).
    """
    metadata = {"help": help, "check": check, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# -- checks -------------------------------------------------------------------------------------------------


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "is not a fraction in (0, 1]"


def fraction_or_zero(value: float) -> str | None:
    return None if 0 <= value <= 1 else "is not a fraction in [0, 1]"


def below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else "is not in [0, 1)"


def seed(value: int) -> str | None:
    return None if 0 <= value < 2**32 else "is not in [0, 2**32)"


def finite(value: float) -> str | None:
    return None if math.isfinite(value) else "is not a finite number"


def one_of(*choices: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in choices else f"is not one of {', '.join(map(repr, choices))}"

    check.choices = choices  # type: ignore[attr-defined]
    return check


def each(inner: Check) -> Check:
    """Apply `inner` to every element of a list."""

    def check(values: list) -> str | None:
        for v in values:
            problem = inner(v)
            if problem:
                return f"element {v!r} {problem}"
        return None

    return check


def regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression ({exc})"
    return None


# -- uses of the declarations ----------------------------------------------------------------------------------


def check_fields(config: Any, prefix: str = "") -> None:
    """Run every field's check (recursing into nested configs); raise `IlaError` naming the first bad key."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
            continue
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise IlaError(f"{prefix}{f.name}: {value!r} {problem}")


def flag_name(f: dataclasses.Field) -> str | None:
    flag = f.metadata.get("flag")
    if not flag:
        return None
    return flag if isinstance(flag, str) else "--" + f.name.replace("_", "-")


def _flagged(cls: type, prefix: str) -> list[tuple[str, str, dataclasses.Field, Any]]:
    """(flag, dotted key, field, type) of every flagged field of `cls`, nested configs included."""
    hints = get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            found += _flagged(hint, f"{prefix}{f.name}.")
        elif flag_name(f):
            found.append((flag_name(f), f"{prefix}{f.name}", f, hint))
    return found


def flag_paths(cls: type, prefix: str = "") -> dict[str, str]:
    """API keyword (the flag's Python name) → dotted config key, for every flagged field."""
    return {flag[2:].replace("-", "_"): dotted for flag, dotted, _, _ in _flagged(cls, prefix)}


def add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> dict[str, str]:
    """Add a flag for every flagged field of `cls` (help from the field); returns `flag_paths`."""
    for flag, _dotted, f, hint in _flagged(cls, prefix):
        kind = _plain(hint)
        kwargs: dict[str, Any] = {"help": _help(f, kind), "dest": flag[2:].replace("-", "_")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind if kind in (int, float) else str
            choices = getattr(f.metadata.get("check"), "choices", None)
            if choices:
                kwargs["choices"] = list(choices)
        parser.add_argument(flag, **kwargs)
    return flag_paths(cls, prefix)


def _plain(hint: Any) -> Any:
    """int | None → int; list[float] → list."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if type(None) in get_args(hint) and len(args) == 1:
        hint = args[0]
    return get_origin(hint) or hint


def _help(f: dataclasses.Field, kind: Any) -> str:
    """The field's help, its default, and how a list is written on the command line (`kind`: `_plain` type)."""
    text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is not None and default != "" and not isinstance(default, bool):
        text += f" (default {default})"
    if kind is list:
        text += "; comma-separated"
    return text.replace("%", "%%")
