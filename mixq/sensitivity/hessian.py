"""Hessian-weighted output error, relative to the layer's output energy:

    damage = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ),   H = E[x xᵀ]

the relative error of the layer's output on the calibration inputs (ExLlamaV2's measure), so a layer with small
outputs is not judged harmless just because its absolute error is small.
"""
from __future__ import annotations

import torch

from ..capture import LayerStats
from ..solvers import output_error
from . import register_estimator


def output_energy(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """tr(W H Wᵀ), at least 1e-12."""
    return ((weight.float() @ stats.hessian) * weight.float()).sum().clamp(min=1e-12)


@register_estimator("hessian", energy=output_energy)
def hessian_damage(weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats, fisher=None) -> float:
    return float(output_error(weight, deq, stats.hessian).sum() / output_energy(weight, stats))
