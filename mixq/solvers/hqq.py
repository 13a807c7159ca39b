"""HQQ, half-quadratic quantization (Badri & Shaji 2023, mobiusml/hqq): data-free, it needs no calibration.

Each group's grid is fitted to its own weights under a sparsity-promoting loss ‖W − Ŵ‖_p^p, p = 0.7 < 1, so that
a few weights far off the grid (outliers) may keep a large error instead of dragging the whole grid towards them.
Half-quadratic splitting makes that loss two easy steps, alternated ITERS times from the min/max grid:

    W_e ← shrink_p(W − Ŵ, β)                          the error the loss lets go (a generalised soft threshold)
    z   ← mean over the group of (q − (W − W_e) / s)  the offset, in closed form, for the codes q of now

with β growing by κ each step (HQQ's p = 0.7, β = 10, κ = 1.01, 20 steps). As in HQQ the scale stays the min/max
one, so that the largest weights keep a level; a grid without an offset ("sym": its zero is fixed at 2^(bits−1))
moves its scale instead, s ← Σ (q − z)(W − W_e) / Σ (q − z)². An integer zero ("int") is rounded at every step
(HQQ's offset moves by less than a step, so on that grid hqq is rtn), an fp16 minimum ("min", HQQ's own format)
kept at fp16. Each group keeps the grid of least absolute error Σ|W − Ŵ| it
met (HQQ's measure; HQQ stops the whole tensor at its first step that does not lower it), and double-quantized
scales are then snapped to their row's steps, as every solver's are.
"""
from __future__ import annotations

import torch

from ..formats import DoubleQuant, fit_params, quantize_codes
from ..grids import grid_of
from . import Rows, Solver, register
from .rtn import finish, grouped, row_maxq

P, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20  # HQQ's


def shrink(x: torch.Tensor, beta: float, p: float = P) -> torch.Tensor:
    """The proximal step of |x|^p / β: sign(x) · max(|x| − |x|^(p−1) / β, 0)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp(min=1e-12).pow(p - 1) / beta)


def _error(wg, scale, zero, maxq, grid: str) -> torch.Tensor:
    """Σ |W − Ŵ| of each group (a row of `wg`) on the grid (scale, zero)."""
    q = quantize_codes(wg, scale, zero, maxq, grid)
    return (grid_of(grid).value(q, scale, zero, maxq) - wg).abs().sum(1, keepdim=True)


def half_quadratic(wg: torch.Tensor, maxq: torch.Tensor, grid: str, iters: int = ITERS):
    """(scale, zero) of each group of wg ((rows · groups) × group; maxq (rows · groups) × 1), value (q − z) · s:
    the half-quadratic alternation from the min/max grid, the best grid of each group kept."""
    scale, zero = fit_params(wg, maxq, grid)
    best_s, best_z, best = scale, zero, _error(wg, scale, zero, maxq, grid)
    g = grid_of(grid)
    beta = BETA
    for _ in range(iters):
        q = quantize_codes(wg, scale, zero, maxq, grid)
        target = wg - shrink(wg - g.value(q, scale, zero, maxq), beta)
        if g.zero == "none":  # the scale alone
            u = g.level(q, maxq) - zero
            num, den = (u * target).sum(1, keepdim=True), (u * u).sum(1, keepdim=True)
            fitted = torch.where(den > 0, num / den.clamp(min=1e-30), scale)
            scale = torch.where(fitted.abs() < 1e-6, scale, fitted).half().float()  # stored in fp16
        else:
            zero = (q - target / scale).mean(1, keepdim=True)
            if g.zero == "int":
                zero = torch.minimum(zero.round().clamp(min=0), maxq)
            else:  # the stored minimum m = −z·s is fp16
                zero = -(-zero * scale).half().float() / scale
        beta *= KAPPA
        error = _error(wg, scale, zero, maxq, grid)
        better = error < best
        best_s, best_z, best = (torch.where(better, scale, best_s), torch.where(better, zero, best_z),
                                torch.where(better, error, best))
    return best_s, best_z


@register
class HQQ(Solver):
    name = "hqq"
    summary = "HQQ's half-quadratic fit of each group's offset to its weights under an l0.7 loss; data-free"
    needs = frozenset()

    def rows(self, weight: torch.Tensor, stats, fmt: Rows):
        rows, cols = weight.shape
        maxq = row_maxq(fmt.bits).repeat_interleave(cols // fmt.group, 0)
        wg = grouped(weight, fmt.group)
        scale, zero = half_quadratic(wg, maxq, fmt.grid)
        dq = DoubleQuant.of(weight, fmt.group, row_maxq(fmt.bits), fmt.grid, fmt.scale_bits, fmt.super_block)
        if dq is not None:
            scale, zero = dq.snap(scale, zero)
        return finish(quantize_codes(wg, scale, zero, maxq, fmt.grid), scale, zero, rows, fmt.grid, dq)
