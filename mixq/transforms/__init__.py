"""Whole-model transforms, registered by name: function-preserving changes of the float model (rotations, norm
folding) applied before profiling, so that every layer is then quantized in the new basis. A solver chain names
them first ("rotate+gptq-act+comq"); a plan or profile records them.

A transform is a `Transform` subclass in a file of its own: `apply(model, adapter, calib)` changes the model in
place (`calib`, calibration windows, for those that measure the model), and `layer_candidates` may change a
layer's candidates in the new basis (resq's split rows). `splits_rows`: it gives some layers formats no export
type stores and the latency cost table does not time.
"""
from __future__ import annotations

from typing import ClassVar

from ..registry import Registry, import_all

TRANSFORMS = Registry("transform")


class Transform:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    splits_rows: ClassVar[bool] = False

    def apply(self, model, adapter, calib=None) -> None:
        raise NotImplementedError

    def check(self, adapter) -> None:
        """Refuse, in one line before any work, a family this transform cannot keep the function of."""

    def layer_candidates(self, adapter, name: str, cols: int, candidates: list) -> list:
        """The candidates of block linear `name` (rows of `cols` weights) once the model is transformed."""
        return candidates


def register(cls: type[Transform]) -> type[Transform]:
    return TRANSFORMS.register(cls.name)(cls)


def parse_names(value) -> tuple[str, ...]:
    """The "transforms" list of a plan or profile file, checked: known names only."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise ValueError('"transforms" is a list of names, e.g. ["rotate"]')
    for t in value:
        TRANSFORMS.lookup(t)
    return tuple(value)


def apply_transforms(model, names, calib=None) -> None:
    from ..models import adapter_for

    adapter = adapter_for(model)
    for name in names:
        TRANSFORMS.lookup(name)().check(adapter)
    for name in names:
        TRANSFORMS.lookup(name)().apply(model, adapter, calib)


def layer_candidates(adapter, names, layer: str, cols: int, candidates: list) -> list:
    """A block linear's candidates once the transforms `names` are applied."""
    for name in names:
        candidates = TRANSFORMS.lookup(name)().layer_candidates(adapter, layer, cols, candidates)
    return candidates


def help_text() -> str:
    return "; ".join(f"{n}+ ({t.summary})" for n, t in TRANSFORMS.items())


import_all(__name__, __path__)  # every module of the package registers its transform
