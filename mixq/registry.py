"""Registries by name: a plain dict where a duplicate name raises and an unknown one lists the known names; and
`import_all`, which imports every module of a plug-in package (solvers, estimators, transforms, exporters, model
adapters), so that a new part is one new file that registers itself, with no list to edit."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def deco(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = fn
            return fn
        return deco

    def lookup(self, name: str) -> Callable:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]


def import_all(package: str, path) -> None:
    """Import every module of `package` (its `__path__`), in name order."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{info.name}")
