"""A learned grid per layer ("lk", as the k-means grids of SqueezeLLM, Kim et al. 2023, arXiv 2306.07629, here under
a signed group scale): 2^bits levels of its own for each layer, fitted by importance-weighted k-means (Lloyd's
iterations) on the layer's weights, each group normalised by its largest-magnitude weight, and stored as fp16 beside
the layer (`LEVEL_BITS` each; QuantSpec counts them).

A group's weight w_j = e · x_j, with e its signed extreme (so x ∈ [−1, 1] and the extreme is +1), is stored as
s · L[q] with s = e / L_end (Levels.fit); its error in the layer's output is about H_jj · e² · (x_j − L[q])², so the
k-means weighs each x_j by H_jj · e². The level of largest magnitude is pinned at +1, where every group's extreme
lies, and the others move to the weighted mean of the weights nearest them, starting from the normal-float levels
of the same width.

The registered grid (`grid_of("lk")`) holds the normal-float start; `Learned.fit_layer` fits a layer's own grid, an
instance the solvers take in place of a grid's name (`Rows.grid`), whose levels the QuantizedTensor keeps (`table`).
"""
from __future__ import annotations

import torch

from . import Levels, register
from .normal import normal_levels

LEVEL_BITS = 16  # each stored level is fp16
ITERS = 16  # Lloyd's iterations; the levels move by less than an fp16 step well before


@register
class Learned(Levels):
    name = "lk"
    summary = "levels learned per layer (weighted k-means, 2^bits fp16 levels stored), one signed fp16 scale a group"
    bits = (2, 3, 4)
    learned = True

    def __init__(self, tables: dict[int, torch.Tensor] | None = None):
        self._fitted = tables or {}

    @classmethod
    def fitted(cls, tables: dict[int, torch.Tensor]) -> "Learned":
        """A layer's grid: its levels (increasing, fp16 values) for each width."""
        return cls({b: t.float() for b, t in tables.items()})

    @classmethod
    def fit_layer(cls, weight: torch.Tensor, importance: torch.Tensor, group: int, bits) -> "Learned":
        """A layer's grid for each width of `bits`, fitted on its rows × cols `weight` in groups of `group` columns;
        `importance`: each column's weight (diag H), cols."""
        return cls.fitted({int(b): fit_levels(weight, importance, group, int(b)) for b in bits})

    def for_layer(self, weight, importance, group, bits):
        return Learned.fit_layer(weight, importance, group, bits)

    def table(self, bits):
        return self._fitted[bits] if bits in self._fitted else normal_levels(bits)


def fit_levels(weight: torch.Tensor, importance: torch.Tensor, group: int, bits: int,
               iters: int = ITERS) -> torch.Tensor:
    """2^bits increasing levels (float32 holding fp16 values) in [−1, 1], the largest pinned at 1: weighted k-means
    of the layer's group-normalised weights, each weighed by H_jj · e² (see the module's note)."""
    rows, cols = weight.shape
    w = weight.float().reshape(-1, group)
    extreme = w.gather(1, w.abs().argmax(1, keepdim=True))
    extreme = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    x = (w / extreme).reshape(-1)
    imp = importance.float().clamp_min(0).expand(rows, cols).reshape(-1, group)
    mass = (imp * extreme.square()).reshape(-1) + 1e-12
    levels = normal_levels(bits).half().double()
    top = len(levels) - 1  # +1, where each group's extreme lies
    for _ in range(iters):
        codes = torch.bucketize(x, ((levels[1:] + levels[:-1]) / 2).float())
        total = torch.zeros_like(levels).index_add_(0, codes, mass.double())
        moment = torch.zeros_like(levels).index_add_(0, codes, (mass * x).double())
        new = torch.where(total > 0, moment / total.clamp_min(1e-300), levels)
        new[top] = 1.0
        new = new.half().double()
        if not bool((new[1:] > new[:-1]).all()):  # two levels met: keep the last increasing set
            break
        if torch.equal(new, levels):
            break
        levels = new
    return levels.float()
