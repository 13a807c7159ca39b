"""Damage estimators, registered by name: how much a layer's quantization hurts, comparable across layers.

    estimator(weight rows × cols, dequantized rows × cols, stats: LayerStats, row_weight: rows or None) -> float

Each declares what else it reads (`needs`, capture's names): OUTPUT_FISHER, the diagonal Fisher of the layer's
output, arrives as `row_weight` times the number of layer rows each profiled row stands for (profiling samples
rows; the others get just the latter; None means every row counts once); OUTPUT_ENERGY (the loss-gradient energy of
each token at the layer's output, with the first inputs kept) arrives as the statistics it judges on. A `measured`
estimator runs the model instead: it gets every row (no sampling) and, in place of `row_weight`, a
`measure(dequantized weight) -> damage` bound to the layer (sensitivity.kl). `tables_as`: the estimator that judges
the embedding table and the head in its place (a lookup has no output error to weigh token by token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry, import_all

ESTIMATORS = Registry("sensitivity estimator")
DEFAULT_ESTIMATOR = "oac"  # ranks real perplexity best at fisher's cost (benchmarks/results/sensitivity.md)


@dataclass(frozen=True)
class Estimator:
    name: str
    damage: Callable
    needs: frozenset[str] = frozenset()
    measured: bool = False
    tables_as: str | None = None
    # with OUTPUT_ENERGY: judged(first inputs, their energy, input mean) → {bias compensated?: the LayerStats its
    # candidates are judged on}
    judged: Callable | None = None
    # a relative estimator's normaliser: damage = (a sum over rows) / energy(weight, stats); None: a plain sum over
    # rows. What combines damages of a layer's row blocks (profile._profile_rows: Σ dᵢ eᵢ / Σ eᵢ)
    energy: Callable | None = None

    def __call__(self, weight, deq, stats, row_weight=None) -> float:
        return self.damage(weight, deq, stats, row_weight)


def register_estimator(name: str, needs=(), measured: bool = False, tables_as: str | None = None,
                       judged: Callable | None = None, energy: Callable | None = None):
    def deco(fn: Callable) -> Callable:
        ESTIMATORS.register(name)(Estimator(name, fn, frozenset(needs), measured, tables_as, judged, energy))
        return fn
    return deco


def get_estimator(name: str) -> Estimator:
    return ESTIMATORS.lookup(name)


import_all(__name__, __path__)  # every module of the package registers its estimator
