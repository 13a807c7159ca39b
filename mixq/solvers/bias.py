"""Bias compensation (Gong et al. 2024, arXiv 2404.01892).

A quantized layer's output error ΔW x has mean ΔW μ (μ = E[x], captured with H). Adding ΔW μ to the bias removes
it, which leaves E‖ΔW (x − μ)‖² = tr(ΔW Σ ΔWᵀ), Σ = H − μμᵀ the input covariance. So a chain that ends in "+bias"
(`gptq-act+bias`) solves on Σ instead of H, the error that remains, and the layer's bias gets `compensation`. A
layer without a bias gets one, and its bits are counted (`Candidate.storage_bits`): the allocation gives it only
where it pays.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..capture import LayerStats
from . import Solver, register


def compensation(weight: torch.Tensor, deq: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The bias change that cancels the mean output error: (W − Ŵ) μ."""
    return (weight.float() - deq.float()) @ mean.float()


@register
class Bias(Solver):
    name = "bias"
    summary = "bias compensation: solved on the input covariance, the layer's bias absorbs the mean error (W − Ŵ)μ"
    starts = False
    refines = True
    adds_bias = True

    def prepare(self, stats: LayerStats) -> LayerStats:
        return replace(stats, hessian=stats.covariance())

    def refine(self, weight, stats, fmt, out):
        return out  # the codes stay as solved (on Σ): the bias is this step's part

    def bias(self, weight, deq, stats):
        return compensation(weight, deq, stats.mean)
