"""Damage estimators, registered by name: how much a layer's quantization hurts, comparable across layers.

    estimator(weight rows × cols, dequantized rows × cols, stats: LayerStats, fisher: rows or None) -> float

`fisher` is the diagonal Fisher of the layer's output (capture.output_fisher), for estimators that need it.
"""
from __future__ import annotations

from ..registry import Registry

ESTIMATORS = Registry("sensitivity estimator")
NEEDS_FISHER = {"fisher"}
register_estimator = ESTIMATORS.register
get_estimator = ESTIMATORS.lookup


from . import fisher, hessian  # noqa: E402,F401  (register)
