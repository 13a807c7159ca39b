"""Whole-model transforms, registered by name: function-preserving changes of the float model (rotations, norm
folding) applied before profiling, so that every layer is then quantized in the new basis. A transform is
transform(model, adapter) -> None (in place); a solver chain names them first: "rotate+gptq-act+comq"."""
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


def apply_transforms(model, names) -> None:
    from ..models import adapter_for

    adapter = adapter_for(model)
    for name in names:
        TRANSFORMS.lookup(name)(model, adapter)


from . import rotate  # noqa: E402,F401  (register)
