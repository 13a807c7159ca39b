"""Damage estimators, registered by name: how much a layer's quantization hurts, comparable across layers.

    estimator(weight rows × cols, dequantized rows × cols, stats: LayerStats, row_weight: rows or None) -> float

`row_weight` is what each row counts for: the diagonal Fisher of the layer's output (capture.output_fisher) for
estimators in NEEDS_FISHER, times the number of layer rows each profiled row stands for (profiling samples rows);
just the latter for the others. None means every row counts once. Estimators in MEASURED run the model instead:
they get every row (no sampling) and, in place of `row_weight`, a `measure(dequantized weight) -> damage` bound
to the layer (sensitivity.kl).
"""
from __future__ import annotations

from ..registry import Registry

ESTIMATORS = Registry("sensitivity estimator")
DEFAULT_ESTIMATOR = "oac"  # ranks real perplexity best at fisher's cost (benchmarks/results/sensitivity.md)
NEEDS_FISHER = {"fisher"}
NEEDS_ENERGY = {"oac"}  # judged on the output-adaptive statistics (capture.output_energy, sensitivity.oac)
MEASURED = {"kl"}
register_estimator = ESTIMATORS.register
get_estimator = ESTIMATORS.lookup


from . import fisher, hessian, kl, oac, roundoff  # noqa: E402,F401  (register)
