"""HQQ, half-quadratic quantization (Badri & Shaji 2023, mobiusml/hqq): data-free, it needs no calibration.

Each group's grid is fitted to its own weights under a sparsity-promoting loss ‖W − Ŵ‖_p^p, p = 0.7 < 1, so that
a few weights far off the grid (outliers) may keep a large error instead of dragging the whole grid towards them.
Half-quadratic splitting makes that loss a few easy steps, alternated ITERS times from the min/max grid:

    W_e ← shrink_p(W − Ŵ, β)                          the error the loss lets go (a generalised soft threshold)
    z   ← mean over the group of (q − (W − W_e) / s)  the offset, in closed form, for the codes q of now
    s   ← Σ (q − z)(W − W_e) / Σ (q − z)²              the scale, in closed form, for those codes and offset

with β growing by κ each step (HQQ's p = 0.7, β = 10, κ = 1.01, 20 steps). HQQ itself moves the offset alone and
keeps the min/max scale; the scale step is mixq's: on SmolLM2's layers it lowers the weight error of HQQ's fit by
another 10–15 % at 3 and 4 bits and 40 % at 2 bits (benchmarks/results/peers.md compares both). A grid without an
offset ("sym") fits its scale alone; an integer zero ("int") is rounded at every step; an fp16 minimum ("min") is
kept at fp16. Each group keeps the grid of least p-loss it met (HQQ stops the whole tensor at the first step that
does not improve), and double-quantized scales are then snapped to their row's steps, as every solver's are.
"""
from __future__ import annotations

import torch

from ..formats import DoubleQuant, fit_params, quantize_codes
from . import Rows, Solver, register
from .rtn import finish, grouped, row_maxq

P, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20


def shrink(x: torch.Tensor, beta: float, p: float = P) -> torch.Tensor:
    """The proximal step of |x|^p / β: sign(x) · max(|x| − |x|^(p−1) / β, 0)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp(min=1e-12).pow(p - 1) / beta)


def _loss(wg, scale, zero, maxq, p: float = P) -> torch.Tensor:
    """Σ |W − Ŵ|^p of each group (a row of `wg`) on the grid (scale, zero)."""
    return ((quantize_codes(wg, scale, zero, maxq) - zero) * scale - wg).abs().pow(p).sum(1, keepdim=True)


def half_quadratic(wg: torch.Tensor, maxq: torch.Tensor, grid: str, iters: int = ITERS):
    """(scale, zero) of each group of wg ((rows · groups) × group; maxq (rows · groups) × 1), value (q − z) · s:
    the half-quadratic alternation from the min/max grid, the best grid of each group kept."""
    scale, zero = fit_params(wg, maxq, grid)
    best_s, best_z, best = scale, zero, _loss(wg, scale, zero, maxq)
    beta = BETA
    for _ in range(iters):
        q = quantize_codes(wg, scale, zero, maxq)
        target = wg - shrink(wg - (q - zero) * scale, beta)
        if grid != "sym":
            zero = (q - target / scale).mean(1, keepdim=True)
            if grid == "int":
                zero = torch.minimum(zero.round().clamp(min=0), maxq)
        u = q - zero
        num, den = (u * target).sum(1, keepdim=True), (u * u).sum(1, keepdim=True)
        fitted = torch.where(den > 0, num / den.clamp(min=1e-30), scale)
        scale = torch.where(fitted.abs() < 1e-6, scale, fitted).half().float()  # stored in fp16
        if grid == "min":  # so is the minimum m = −z·s
            zero = -(-zero * scale).half().float() / scale
        beta *= KAPPA
        loss = _loss(wg, scale, zero, maxq)
        better = loss < best
        best_s, best_z, best = (torch.where(better, scale, best_s), torch.where(better, zero, best_z),
                                torch.where(better, loss, best))
    return best_s, best_z


@register
class HQQ(Solver):
    name = "hqq"
    summary = "half-quadratic fit (after HQQ) of each group's scale and offset to its weights, l0.7 loss; data-free"
    needs = frozenset()

    def rows(self, weight: torch.Tensor, stats, fmt: Rows):
        rows, cols = weight.shape
        maxq = row_maxq(fmt.bits).repeat_interleave(cols // fmt.group, 0)
        wg = grouped(weight, fmt.group)
        scale, zero = half_quadratic(wg, maxq, fmt.grid)
        dq = DoubleQuant.of(weight, fmt.group, row_maxq(fmt.bits), fmt.grid, fmt.scale_bits, fmt.super_block)
        if dq is not None:
            scale, zero = dq.snap(scale, zero)
        return finish(quantize_codes(wg, scale, zero, maxq), scale, zero, rows, fmt.grid, dq)
