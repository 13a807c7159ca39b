"""Clipping judged by the task (after Q-Rater): the clipping that a layer's own error prefers is not the one that
serves the model best, and the error that matters is non-convex in it, so it is searched, not solved for.

The solver `taskclip` is GPTQ in act order whose per-group clipping search (solvers.clip) runs over the shrinks
scaled by a ratio r of RATIOS: r < 1 clips every group harder than its own input-weighted error would. With block
context (pipeline.apply_plan) every ratio is solved (the whole chain: `taskclip+comq` refines each) and the one
whose block output on the first JUDGE_WINDOWS calibration windows lies nearest the float block's is kept, layer
after layer in the block's order, each frozen before the next is judged. Without it (profiling, `solve`) it is
ratio 1: `gptq-act`. Cost: len(RATIOS) solves and block runs per layer.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..formats import QuantizedTensor, QuantSpec
from . import register_solver, solve
from .clip import SHRINKS
from .gptq import gptq_quantize

RATIOS = (1.0, 0.95, 0.9, 0.85)
JUDGE_WINDOWS = 8


def at_ratio(ratio: float):
    """GPTQ (act order) with every clipping shrink scaled by `ratio`: a solver function."""
    shrinks = [s * ratio for s in SHRINKS]

    def solver(weight, hessian, group, bits, grid, scale_bits=16, super_block=0):
        return gptq_quantize(weight, hessian, group, bits, grid, act_order=True, scale_bits=scale_bits,
                             super_block=super_block, shrinks=shrinks)
    return solver


register_solver("taskclip")(at_ratio(1.0))


def search(name: str, weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
           loss: Callable[[torch.Tensor], float]) -> tuple[QuantizedTensor, float]:
    """The chain `name` solved at every ratio of RATIOS; the result whose dequantized weight has the least
    `loss` (the block's output error with this layer set to it), and its ratio."""
    best = None
    for ratio in RATIOS:
        qt = solve(name, weight, hessian, spec, base=at_ratio(ratio))
        err = loss(qt.dequantize())
        if best is None or err < best[0]:
            best = (err, qt, ratio)
    return best[1], best[2]
