"""Damage estimators, registered by name: how much a layer's quantization hurts, comparable across layers.

    estimator(weight rows × cols, dequantized rows × cols, stats: LayerStats, fisher: rows or None) -> float

`fisher` is the diagonal Fisher of the layer's output (capture.output_fisher), for estimators that need it.
"""
from __future__ import annotations

from typing import Callable

ESTIMATORS: dict[str, Callable] = {}
NEEDS_FISHER = {"fisher"}


def register_estimator(name: str):
    def deco(fn):
        if name in ESTIMATORS:
            raise ValueError(f"estimator {name!r} registered twice")
        ESTIMATORS[name] = fn
        return fn
    return deco


def get_estimator(name: str) -> Callable:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown sensitivity estimator {name!r}; known: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]


from . import fisher, hessian  # noqa: E402,F401  (register)
