"""Cheap, data-free baselines: the damage seen in the weights alone, no calibration inputs.

- `roundoff`: Σ (W − Ŵ)², the roundoff error MixQuant (Kloberdanz & Le) allocates by.
- `sqnr`: ‖W − Ŵ‖² / ‖W‖², the inverse signal-to-quantization-noise ratio of the weights, as in Qualcomm's
  mixed-precision search (Pandey et al.) in its cheapest, weight-only form.
"""
from __future__ import annotations

import torch

from ..capture import LayerStats
from . import register_estimator


def _row_errors(weight: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    return ((weight.float() - deq) ** 2).sum(1)


@register_estimator("roundoff")
def roundoff_damage(weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats, row_weight=None) -> float:
    err = _row_errors(weight, deq)
    return float(err.sum() if row_weight is None else (row_weight * err).sum())


def weight_energy(weight: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    """‖W‖², at least 1e-12."""
    return (weight.float() ** 2).sum().clamp(min=1e-12)


@register_estimator("sqnr", energy=weight_energy)
def sqnr_damage(weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats, row_weight=None) -> float:
    return float(_row_errors(weight, deq).sum() / weight_energy(weight))
