"""Clipping search: per group, the shrink of the min/max range that minimises the output error of that group.

The error of a group is weighted by diag(H) = E[x_j²] (the layer-output error if inputs were uncorrelated), not
the plain weight MSE: a column that sees large inputs matters more (as llama.cpp's importance matrix, AWQ).
"""
from __future__ import annotations

import torch

from ..formats import DoubleQuant, fit_params, quantize_codes
from ..grids import grid_of
from . import Solver, register
from .rtn import finish, grouped, row_maxq

SHRINKS = torch.linspace(1.0, 0.5, 11).tolist()  # steps of 0.05


def search(wg: torch.Tensor, importance: torch.Tensor, maxq: torch.Tensor, grid: str, refit: bool = True,
           snap=None, shrinks=None):
    """Best (scale, zero) per row of wg ((rows·groups) × group) under weights `importance` (same shape): every
    shrink of the min/max range (`shrinks`, default SHRINKS), each also with its least-squares scale (`refit`);
    every grid first `snap`ped to what double quantization can store."""
    best_err = best_scale = best_zero = None
    for s in SHRINKS if shrinks is None else shrinks:
        fitted = fit_params(wg, maxq, grid, s)
        for scale, zero in (fitted, _refit(wg, importance, *fitted, maxq, grid)) if refit else (fitted,):
            if snap is not None:
                scale, zero = snap(scale, zero)
            q = grid_of(grid).value(quantize_codes(wg, scale, zero, maxq, grid), scale, zero, maxq)
            err = ((q - wg) ** 2 * importance).sum(1, keepdim=True)
            if best_err is None:
                best_err, best_scale, best_zero = err, scale, zero
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _refit(wg, importance, scale, zero, maxq, grid):
    """The weighted least-squares grid for the codes that (scale, zero) gives, as llama.cpp's make_qkx quantizers
    refit theirs: min Σ imp·(w − (level(q) − z)·s)² over s with the zero kept, or over s and m = −z·s jointly
    for "min" grids."""
    q = quantize_codes(wg, scale, zero, maxq, grid)
    a = importance
    if grid_of(grid).zero == "float":
        sa, sq, sqq = a.sum(1, keepdim=True), (a * q).sum(1, keepdim=True), (a * q * q).sum(1, keepdim=True)
        sw, swq = (a * wg).sum(1, keepdim=True), (a * wg * q).sum(1, keepdim=True)
        det = sqq * sa - sq * sq
        ok = det > 1e-12 * sqq * sa
        s = torch.where(ok, (swq * sa - sw * sq) / det.where(ok, 1.0), scale)
        m = torch.where(ok, (sqq * sw - sq * swq) / det.where(ok, 1.0), -zero * scale)
        s = torch.where(s.abs() < 1e-6, scale, s).half().float()
        return s, -m.half().float() / s
    q = grid_of(grid).level(q, maxq) - zero
    num, den = (a * wg * q).sum(1, keepdim=True), (a * q * q).sum(1, keepdim=True)
    s = torch.where(den > 0, num / den.clamp(min=1e-30), scale)
    return torch.where(s.abs() < 1e-6, scale, s).half().float(), zero


def column_importance(hessian: torch.Tensor, rows: int, group: int) -> torch.Tensor:
    """diag(H) laid out like grouped(weight): (rows · groups) × group."""
    d = torch.diagonal(hessian).clamp(min=0)
    d = d / d.mean().clamp(min=1e-12)
    return d.reshape(1, -1, group).expand(rows, -1, -1).reshape(-1, group)


def clip(weight, hessian, group, bits, grid, scale_bits=16, super_block=0):
    """The clipping search on every group of rows × cols `weight` (`bits` per row), weighted by diag(`hessian`)."""
    rows, cols = weight.shape
    maxq = row_maxq(bits).repeat_interleave(cols // group, 0)
    wg = grouped(weight, group)
    dq = DoubleQuant.of(weight, group, row_maxq(bits), grid, scale_bits, super_block)
    scale, zero = search(wg, column_importance(hessian, rows, group), maxq, grid, snap=dq and dq.snap)
    return finish(quantize_codes(wg, scale, zero, maxq, grid), scale, zero, rows, grid, dq)


@register
class Clip(Solver):
    name = "clip"
    summary = "per group, the clipped range (and its least-squares scale) of least input-weighted error"

    def rows(self, weight, stats, fmt):
        return clip(weight, stats.hessian, fmt.group, fmt.bits, fmt.grid, fmt.scale_bits, fmt.super_block)
