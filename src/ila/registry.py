"""A registry of named components that the files of one package add at import (importance methods, training
strategies). The package's files are imported once, on the first lookup, so a new component is a new file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from ila.errors import IlaError

T = TypeVar("T")


class Registry(Generic[T]):
    """Components by name. `kind` names them in errors ("training strategy"), `field` is the config key that
    chooses one ("strategy"); `reserved()` gives names a component may not take (config keys, whose YAML
    sections would clash); the modules of `package` other than `skip` are the component files."""

    def __init__(self, kind: str, field: str, package: str, skip: Iterable[str],
                 reserved: Callable[[], set[str]]) -> None:
        self.kind, self.field, self.package = kind, field, package
        self.skip, self.reserved = set(skip), reserved
        self._items: dict[str, T] = {}
        self._modules: dict[str, str] = {}
        self._discovered = False

    def add(self, name: str, item: T, module: str) -> T:
        """Register `item` (defined in `module`); a name registers once (its own module may re-import)."""
        if name in self.reserved():
            raise ValueError(f"{self.field} {name}: the name is taken by a config key")
        if self._modules.get(name, module) != module:
            raise ValueError(f"{self.field} {name}: already registered by {self._modules[name]}")
        self._items[name], self._modules[name] = item, module
        return item

    def remove(self, name: str) -> None:
        self._items.pop(name, None)
        self._modules.pop(name, None)

    def all(self) -> dict[str, T]:
        """Every registered component by name."""
        if not self._discovered:
            self._discovered = True
            path = importlib.import_module(self.package).__path__
            for info in pkgutil.iter_modules(list(path)):
                if info.name not in self.skip:
                    importlib.import_module(f"{self.package}.{info.name}")
        return dict(self._items)

    def get(self, name: str, hint: str = "") -> T:
        """The component called `name`; an unknown name is an `IlaError` listing the known ones."""
        known = self.all()
        if name not in known:
            raise IlaError(f"{self.field}: {name!r} is not a known {self.kind} (known: {', '.join(sorted(known))})"
                           + hint)
        return known[name]
