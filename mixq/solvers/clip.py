"""Clipping search: per group, the shrink of the min/max range that minimises the output error of that group.

The error of a group is weighted by diag(H) = E[x_j²] (the layer-output error if inputs were uncorrelated), not
the plain weight MSE: a column that sees large inputs matters more (as llama.cpp's importance matrix, AWQ).
"""
from __future__ import annotations

import torch

from ..formats import fit_params, quantize_codes
from . import register_solver
from .rtn import finish, grouped

SHRINKS = torch.linspace(1.0, 0.5, 11).tolist()  # steps of 0.05


def search(wg: torch.Tensor, importance: torch.Tensor, maxq: torch.Tensor, symmetric: bool):
    """Best (scale, zero) per row of wg ((rows·groups) × group) under weights `importance` (same shape)."""
    best_err = best_scale = best_zero = None
    for s in SHRINKS:
        scale, zero = fit_params(wg, maxq, symmetric, s)
        q = (quantize_codes(wg, scale, zero, maxq) - zero) * scale
        err = ((q - wg) ** 2 * importance).sum(1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def column_importance(hessian: torch.Tensor, rows: int, group: int) -> torch.Tensor:
    """diag(H) laid out like grouped(weight): (rows · groups) × group."""
    d = torch.diagonal(hessian).clamp(min=0)
    d = d / d.mean().clamp(min=1e-12)
    return d.reshape(1, -1, group).expand(rows, -1, -1).reshape(-1, group)


@register_solver("clip")
def clip(weight, hessian, group, bits, symmetric):
    rows, cols = weight.shape
    maxq = ((1 << bits) - 1).float().repeat_interleave(cols // group).unsqueeze(1)
    wg = grouped(weight, group)
    scale, zero = search(wg, column_importance(hessian, rows, group), maxq, symmetric)
    return finish(quantize_codes(wg, scale, zero, maxq), scale, zero, rows)
