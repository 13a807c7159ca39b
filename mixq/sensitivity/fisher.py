"""Fisher-weighted output error: the second-order estimate of the loss increase (OBD; ModelOpt AutoQuantize;
"output-adaptive calibration", OAC):

    ΔL ≈ ½ Σ_i F_i · E_t[(ΔW x_t)_i²] = ½ Σ_i F_i · (ΔW H ΔWᵀ)_ii,   F_i = E_t[(∂L/∂y_ti)²]

assuming output gradients independent of the inputs. In loss units, so damages add across layers.
"""
from __future__ import annotations

import torch

from ..capture import OUTPUT_FISHER, LayerStats
from ..solvers import output_error
from . import register_estimator


@register_estimator("fisher", needs={OUTPUT_FISHER})
def fisher_damage(weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats, fisher: torch.Tensor | None) -> float:
    if fisher is None:
        raise ValueError("the fisher estimator needs output gradients (capture.output_fisher)")
    return float(0.5 * (fisher * output_error(weight, deq, stats.hessian)).sum())
