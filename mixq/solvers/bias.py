"""Bias compensation (Gong et al. 2024, arXiv 2404.01892).

A quantized layer's output error ΔW x has mean ΔW μ (μ = E[x], captured with H). Adding ΔW μ to the bias removes
it, which leaves E‖ΔW (x − μ)‖² = tr(ΔW Σ ΔWᵀ), Σ = H − μμᵀ the input covariance. So a solver chained with
"+bias" (`gptq-act+bias`) solves on Σ instead of H, the error that remains, and the pipeline adds
`compensation` to the layer's bias. A layer without a bias gets one, and its bits are counted
(`Candidate.storage_bits`): the allocation gives it only where it pays.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..capture import LayerStats
from . import register_refiner


def solve_stats(stats: LayerStats, bias: bool) -> LayerStats:
    """The statistics a solver is given and judged on: with bias compensation, the input covariance in place
    of H (the error that remains once the bias absorbs the mean)."""
    return replace(stats, hessian=stats.covariance()) if bias else stats


def compensation(weight: torch.Tensor, deq: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The bias change that cancels the mean output error: (W − Ŵ) μ."""
    return (weight.float() - deq.float()) @ mean.float()


@register_refiner("bias")
def bias(weight, hessian, group, bits, grid, scale_bits, super_block, out):
    """The codes stay as solved (on Σ, which the caller passes as `hessian`): the bias is the pipeline's part."""
    return out
