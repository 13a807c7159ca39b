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


@register_estimator("hessian")
def hessian_damage(weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats, fisher=None) -> float:
    energy = ((weight.float() @ stats.hessian) * weight.float()).sum()
    return float(output_error(weight, deq, stats.hessian).sum() / energy.clamp(min=1e-12))
