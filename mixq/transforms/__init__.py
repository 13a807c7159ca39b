"""Whole-model transforms, registered by name: function-preserving changes of the float model (rotations, norm
folding) applied before profiling, so that every layer is then quantized in the new basis. A transform is
transform(model, adapter, calib) -> None (in place; `calib`, calibration windows, for those that measure the
model: resq); a solver chain names them first: "rotate+gptq-act+comq"."""
from __future__ import annotations

from ..registry import Registry

TRANSFORMS = Registry("transform")
register_transform = TRANSFORMS.register


def split_chain(chain: str) -> tuple[tuple[str, ...], str]:
    """("rotate",), "gptq-act+comq" of "rotate+gptq-act+comq": the leading transform names, then the solver chain."""
    names = chain.split("+")
    k = 0
    while k < len(names) - 1 and names[k] in TRANSFORMS:
        k += 1
    if names[k] in TRANSFORMS:
        raise ValueError(f"{chain!r} names no solver after its transforms (e.g. {chain}+gptq-act)")
    return tuple(names[:k]), "+".join(names[k:])


def parse_names(value) -> tuple[str, ...]:
    """The "transforms" list of a plan or profile file, checked: known names only."""
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError('"transforms" is a list of names, e.g. ["rotate"]')
    for t in value:
        TRANSFORMS.lookup(t)
    return tuple(value)


def apply_transforms(model, names, calib=None) -> None:
    from ..models import adapter_for

    adapter = adapter_for(model)
    for name in names:
        TRANSFORMS.lookup(name)(model, adapter, calib)


from . import resq, rotate  # noqa: E402,F401  (register)
