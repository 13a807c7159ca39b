"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize one column at a time and spread its error over the
columns not yet quantized, through the inverse Hessian: min ‖(W − Ŵ) X‖² with H = E[x xᵀ].

As `fasterquant` in IST-DASLab/gptq: dead columns, damping, Cholesky of H⁻¹, lazy block updates. Group grids come
from the clipping search (`clip.search`) on the already-updated weights when a group starts; with act-order the
columns go in order of decreasing H_jj and the grids are fixed beforehand from the original weights ("static
groups"), so the stored layout needs no permutation. `gptq-plain` is the published algorithm's min/max grids.
"""
from __future__ import annotations

import torch

from ..formats import DoubleQuant, fit_params, quantize_codes
from ..grids import grid_of
from . import DAMP, Solver, register
from .clip import column_importance, search
from .rtn import finish, row_maxq

PUBLISHED_DAMP = 0.01  # gptq-plain: GPTQ as published
BLOCK = 128  # columns per lazy batch


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H + damp · mean(diag H) · I in H's dtype: GPTQ's damping against over-fitting the calibration, shared by
    every solve on a Hessian."""
    return h + torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.diagonal(h).mean().clamp(min=1e-8)


def inverse_cholesky(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (damped), in float64 for stability."""
    h = damped(hessian.double(), damp)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True).float()


def live_columns(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies of (W, H) with dead inputs (H_jj = 0) made harmless: their weights 0, their H_jj 1."""
    w, h = weight.clone().float(), hessian.clone().float()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def factor(h: torch.Tensor, damp: float, act_order: bool, memo: dict | None) -> torch.Tensor:
    """`inverse_cholesky` of (the permuted) H, kept in `memo` (LayerStats.memo) for the next solve on it: H
    follows from the layer's Hessian and the order alone."""
    key = ("gptq inverse cholesky", damp, act_order)
    u = memo.get(key) if memo is not None else None
    if u is None:
        u = inverse_cholesky(h, damp)
        if memo is not None:
            memo[key] = u
    return u


def error_feedback(w: torch.Tensor, u: torch.Tensor, column, width: int = 1) -> torch.Tensor:
    """GPTQ's pass over the columns of `w` (rows × cols, updated in place) in their order, `width` at a time (a
    vector codebook's: LDLQ, QuIP#): `column(j, cols, synced)` gives the codes and values (rows × width each) of
    columns j … j + width − 1, their error is spread over the columns after them through `u` (the upper Cholesky
    factor of H⁻¹: e = (w − value) · U_FF⁻¹, then w_rest −= e · U_F,rest), lazily in blocks of BLOCK columns;
    `synced()` writes the block's updates so far into `w` and returns it (for a grid fitted on the weights updated so
    far). The codes, float rows × cols."""
    rows, cols = w.shape
    if BLOCK % width or cols % width:
        raise ValueError(f"columns of {cols} do not split into runs of {width}")
    codes = torch.zeros(rows, cols)
    for b0 in range(0, cols, BLOCK):
        b1 = min(b0 + BLOCK, cols)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)

        def synced():
            w[:, b0:b1] = w1
            return w

        for i in range(0, b1 - b0, width):
            j = b0 + i
            col = w1[:, i:i + width]
            q, value = column(j, col, synced)
            codes[:, j:j + width] = q
            if width == 1:
                e = (col - value) / u[j, j]
            else:
                e = torch.linalg.solve_triangular(u[j:j + width, j:j + width], col - value, upper=True, left=False)
            w1[:, i:] -= e @ u[j:j + width, j:b1]
            err[:, i:i + width] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes


def gptq_quantize(weight, hessian, group, bits, grid, act_order=False, damp=DAMP, scale_bits=16, super_block=0,
                  minmax=False, shrinks=None, memo: dict | None = None):
    """GPTQ on rows × cols `weight` (`bits` per row) against `hessian`; `memo`, a dict kept with the Hessian
    (LayerStats.memo), keeps the factor of H⁻¹ for the next solve on it (profiling solves every format on one H)."""
    rows, cols = weight.shape
    w, h = live_columns(weight, hessian)
    maxq = row_maxq(bits)  # rows × 1
    g = grid_of(grid)
    dq = DoubleQuant.of(w, group, maxq, grid, scale_bits, super_block)  # steps from the original weights
    ngroups = cols // group
    scales = torch.empty(rows, ngroups)
    zeros = torch.empty(rows, ngroups)
    importance = column_importance(h, rows, group).view(rows, ngroups, group)

    def fit_group(gi, source):
        sl = slice(gi * group, (gi + 1) * group)
        snap = dq and dq.column(gi, ngroups).snap
        if minmax:  # the reference algorithm's grid: the group's min/max range, no search
            s, z = fit_params(source[:, sl], maxq, grid)
            s, z = snap(s, z) if snap else (s, z)
        else:
            s, z = search(source[:, sl], importance[:, gi], maxq, grid, snap=snap, shrinks=shrinks)
        scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]

    perm = torch.arange(cols)
    if act_order:  # every grid from the original weights: one search over all groups at once
        if minmax:
            for gi in range(ngroups):
                fit_group(gi, w)
        else:
            maxq_g = maxq.repeat_interleave(ngroups, 0)
            s, z = search(w.reshape(-1, group), importance.reshape(-1, group), maxq_g, grid, snap=dq and dq.snap,
                          shrinks=shrinks)
            scales[:], zeros[:] = s.view(rows, ngroups), z.view(rows, ngroups)
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    col_group = perm // group  # group of each (permuted) column in the stored layout

    def column(j, col, synced):
        if not act_order and j % group == 0:
            fit_group(j // group, synced())  # the grid is fitted on the weights updated so far
        gi = int(col_group[j])
        s, z = scales[:, gi:gi + 1], zeros[:, gi:gi + 1]
        q = quantize_codes(col, s, z, maxq, grid)
        return q, g.value(q, s, z, maxq)

    codes = error_feedback(w, factor(h, damp, act_order, memo), column)
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return finish(codes.reshape(-1, group), scales.reshape(-1, 1), zeros.reshape(-1, 1), rows, grid, dq)


@register
class GPTQ(Solver):
    name = "gptq"
    summary = "GPTQ: columns in order, each one's error spread over the rest through H⁻¹, on clip's searched grids"
    act_order = False

    def rows(self, weight, stats, fmt):
        return gptq_quantize(weight, stats.hessian, fmt.group, fmt.bits, fmt.grid, act_order=self.act_order,
                             damp=self.damp, scale_bits=fmt.scale_bits, super_block=fmt.super_block, memo=stats.memo)


@register
class GPTQAct(GPTQ):
    name = "gptq-act"
    summary = "gptq with the columns in order of decreasing input energy (act order, static groups)"
    act_order = True


@register
class GPTQPlain(Solver):
    """GPTQ as published and as the usual packages run it: act-order with static groups, each group's grid its
    min/max range (no clipping search), GPTQ's damping: the baseline mixq's solvers are judged against."""

    name = "gptq-plain"
    summary = "GPTQ as published (act order, min/max grids, damping 0.01): the baseline"

    def rows(self, weight, stats, fmt):
        return gptq_quantize(weight, stats.hessian, fmt.group, fmt.bits, fmt.grid, act_order=True,
                             damp=PUBLISHED_DAMP, scale_bits=fmt.scale_bits, super_block=fmt.super_block,
                             minmax=True, memo=stats.memo)

