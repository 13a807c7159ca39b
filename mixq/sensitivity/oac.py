"""Output-adaptive damage: the loss increase the OAC Hessian predicts (Edalati et al. 2024, "output-adaptive
calibration"), token by token:

    ΔL ≈ ½ E_t[‖g_t‖² ‖ΔW x_t‖²] / rows = ½ tr(ΔW H_oac ΔWᵀ) / rows,   H_oac = E_t[‖g_t‖² x_t x_tᵀ]

g_t = ∂L/∂y_t the loss gradient at the layer's output for token t (capture.output_energy). `fisher` weighs each
output row by its average squared gradient and each token by the input Hessian apart (F ⊗ H: gradients assumed
independent of the inputs); this keeps them together per token, so the tokens whose output moves the loss (and
their inputs) weigh what they weigh, and assumes instead that a token's gradient spreads evenly over the rows. In
loss units, so damages add across layers. On SmolLM2's 35 benchmark plans at 3 bpw it ranks real perplexity with
Spearman ρ 0.95 against fisher's 0.80 (benchmarks/results/sensitivity.md).
"""
from __future__ import annotations

import torch

from ..capture import OUTPUT_ENERGY, LayerStats
from ..solvers import output_error
from . import register_estimator


def oac_stats(inputs: torch.Tensor, energy: torch.Tensor, mean: torch.Tensor) -> dict[bool, LayerStats]:
    """The statistics a layer's candidates are judged on, from the first inputs (tokens × cols) and the loss
    gradient energy ‖g_t‖² of those tokens at this layer's output: {False: H_oac, True: the same about the input
    mean `mean`, the error left once a bias absorbs the mean error (solvers.bias)}."""
    n = min(len(inputs), len(energy))
    x, w = inputs[:n].float(), energy[:n].float()[:, None]
    centred = x - mean.float()
    return {False: LayerStats((x * w).T @ x / n, n), True: LayerStats((centred * w).T @ centred / n, n)}


@register_estimator("oac", needs={OUTPUT_ENERGY}, tables_as="fisher", judged=oac_stats)
def oac_damage(weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats, row_weight: torch.Tensor | None) -> float:
    """`stats` from oac_stats; `row_weight`: the layer rows each profiled row stands for (their sum: its rows)."""
    err = output_error(weight, deq, stats.hessian)
    if row_weight is None:
        return float(0.5 * err.mean())
    return float(0.5 * (row_weight * err).sum() / row_weight.sum())
