"""Exports of a saved mixq folder to the formats other runtimes read, registered by name (`mixq export --to
NAME`, `mixq quantize --compatible NAME`). An exporter is an `Exporter` subclass in a file of its own: the formats
it stores exactly (`specs`: what `--compatible` allocates among; `table_specs`, those of the tables), a check of
the model before any work, and its writer."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ..registry import Registry, import_all

EXPORTERS = Registry("export format")


class ExportError(ValueError):
    pass


class Exporter:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --to's help

    def specs(self) -> list:
        """The formats it stores exactly: `--compatible` allocates among these."""
        raise NotImplementedError

    def table_specs(self) -> list:
        """The formats it stores the embedding table and the head in (none: they stay float under --compatible)."""
        return []

    def check_model(self, model, source=None) -> None:
        """Refuse, before any work, a model this format cannot hold (ExportError naming the layer); `source` is the
        model's file or folder, where known."""

    def write(self, folder: Path, out: Path) -> dict[str, int]:
        """Write the saved mixq model in `folder` to `out` (atomically); the count of tensors of each type."""
        raise NotImplementedError


def register(cls: type[Exporter]) -> type[Exporter]:
    return EXPORTERS.register(cls.name)(cls)


def help_text() -> str:
    return "; ".join(f"{n} ({e.summary})" for n, e in EXPORTERS.items())


import_all(__name__, __path__)  # every module of the package registers its exporter
