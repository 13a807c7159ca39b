"""Coordinate-wise minimisation of the layer-output error (COMQ, Zhang et al. 2024, arXiv 2403.07134).

min ‖(W − Ŵ) X‖² = tr(ΔW H ΔWᵀ) one coordinate at a time, every other one fixed: each weight in turn (columns in
order of decreasing H_jj, all rows at once) moves to the grid point nearest w_j + (ΔW H)_j / H_jj, which is
exact for that coordinate; then each group's scale (and minimum) moves to its least-squares value for the codes it
now has, rounded to what is stored (fp16, or a code of the row's step when double-quantized); a move that would
raise the error is not taken. A few sweeps, no hyper-parameters.

As the solver `comq` it starts from the clipping search's grids. As a refiner after another solver (`gptq-act+comq`)
it starts from that solver's result, which GPTQ's single pass leaves 5–15 % above a coordinate-wise minimum.
Double-quantized scales are refitted to codes of the steps the first solver fixed for each row (or super-block).
"""
from __future__ import annotations

import torch

from ..formats import decode_scales, min_codes
from ..grids import grid_of
from . import DAMP, Solver, register
from .clip import clip
from . import gptq
from .rtn import row_maxq

SWEEPS = 4
BLOCK = 128  # columns whose error updates are batched, as GPTQ's lazy blocks


def fp16(_gi, s, z):
    return s.half().float(), z.half().float()


def coordinate_descent(w, h, codes, scale, zero, maxq, grid: str, sweeps: int = SWEEPS, refit: bool = True,
                       store=fp16):
    """Lower tr(ΔW H ΔWᵀ) over `codes` (rows × cols, float) and, with `refit`, the grids: `scale` and `zero`
    (rows × groups, float: the zeros, or the minima of "min" grids), each refitted grid made storable by
    `store(group index, scale, zero)` (fp16 values by default). Returns (codes, scale, zero)."""
    g = grid_of(grid)
    minimum = g.zero == "float"
    rows, cols = w.shape
    group = cols // scale.shape[1]
    codes, scale, zero = codes.clone(), scale.clone(), zero.clone()
    d = torch.diagonal(h)
    order = torch.argsort(d, descending=True)
    order = order[d[order] > 0]  # dead inputs: nothing to gain

    encode, value = g.coder(maxq)

    def values(q, s, z):
        return q * s + z if minimum else value(q, s, z)

    for _ in range(sweeps):
        s, z = scale.repeat_interleave(group, 1), zero.repeat_interleave(group, 1)
        wq = values(codes, s, z)
        rh = (w - wq) @ h
        for b0 in range(0, len(order), BLOCK):
            idx = order[b0:b0 + BLOCK]
            hb, rhb = h[idx][:, idx], rh[:, idx].clone()
            deltas = torch.zeros(rows, len(idx))
            for i, j in enumerate(idx.tolist()):
                target = wq[:, j:j + 1] + rhb[:, i:i + 1] / d[j]
                sj, zj = s[:, j:j + 1], z[:, j:j + 1]
                if minimum:
                    q = torch.minimum(((target - zj) / sj).round().clamp(min=0), maxq)
                else:
                    q = encode(target, sj, zj)
                new = values(q, sj, zj)
                delta = (new - wq[:, j:j + 1])[:, 0]
                codes[:, j], wq[:, j], deltas[:, i] = q[:, 0], new[:, 0], delta
                rhb -= delta[:, None] * hb[i][None, :]
            rh -= deltas @ h[idx]
        if refit:
            _refit_grids(codes, scale, zero, rh, h, group, minimum, store, lambda q: g.level(q, maxq))
    return codes, scale, zero


def _refit_grids(codes, scale, zero, rh, h, group: int, minimum: bool, store, level) -> None:
    """Each group's scale (and minimum) in turn to its least-squares value given the codes (their `level`s), in
    place, keeping rh = ΔW H current; values made storable by `store`, and a step that would not lower the error is
    not taken."""
    for gi in range(scale.shape[1]):
        sl = slice(gi * group, (gi + 1) * group)
        hg = h[sl, sl]
        u = codes[:, sl] if minimum else level(codes[:, sl]) - zero[:, gi:gi + 1]  # the change per unit of s
        uh = u @ hg
        a11, b1 = (uh * u).sum(1), (rh[:, sl] * u).sum(1)
        if minimum:  # s and m jointly: directions u and 1
            a12, a22, b2 = uh.sum(1), hg.sum(), rh[:, sl].sum(1)
            det = a11 * a22 - a12 * a12
            ok = det > 1e-9 * a11 * a22
            ds = torch.where(ok, (b1 * a22 - b2 * a12) / det.where(ok, 1.0), 0.0)
            dm = torch.where(ok, (a11 * b2 - a12 * b1) / det.where(ok, 1.0), 0.0)
        else:
            ds = torch.where(a11 > 0, b1 / a11.clamp(min=1e-30), 0.0)
            dm = torch.zeros_like(ds)
        new_s, new_z = store(gi, scale[:, gi] + ds, zero[:, gi] + dm)
        new_s = torch.where(new_s.abs() < 1e-6, scale[:, gi], new_s)
        new_z = new_z if minimum else zero[:, gi]
        delta = (new_s - scale[:, gi])[:, None] * u + (new_z - zero[:, gi])[:, None]
        gain = 2 * (rh[:, sl] * delta).sum(1) - ((delta @ hg) * delta).sum(1)  # error before − after
        keep = gain > 0
        delta = delta * keep[:, None]
        scale[:, gi] = torch.where(keep, new_s, scale[:, gi])
        zero[:, gi] = torch.where(keep, new_z, zero[:, gi])
        rh -= delta @ h[sl]


def refine_stored(weight, hessian, bits, grid: str, scale_bits: int, out, sweeps: int = SWEEPS, damp: float = DAMP):
    """A solver's stored output (codes, scales, zeros, steps) → the same after coordinate descent."""
    codes, scales, zeros, steps = out
    rows, cols = weight.shape
    h = gptq.damped(hessian.float(), damp)  # as GPTQ: damping against over-fitting
    minimum = grid_of(grid).zero == "float"
    maxq = row_maxq(bits)
    if steps is not None:  # scale (and minimum) codes on the row's (or super-block's) fixed steps
        s, z = decode_scales(scales, zeros, steps, grid, scale_bits)
        store, encode = _double_quantized(steps, scales.shape[1], grid, scale_bits)
        q, s, z = coordinate_descent(weight, h, codes.float(), s.float(), z.float(), maxq, grid, sweeps,
                                     store=store)
        sc, zc = encode(s, z)
        return q.to(torch.uint8), sc, zc if minimum else zeros, steps
    s, z = scales.float(), zeros.float()
    if minimum:
        q, s, z = coordinate_descent(weight, h, codes.float(), s, z, maxq, grid, sweeps)
        return q.to(torch.uint8), s.half(), z.half(), None
    q, s, _ = coordinate_descent(weight, h, codes.float(), s, z, maxq, grid, sweeps)
    return q.to(torch.uint8), s.half(), zeros, None


def _double_quantized(steps, groups: int, grid: str, scale_bits: int):
    """(store, encode) for double-quantized grids: `store` snaps a group's scale (and minimum) to the nearest code
    of its row's step, `encode` turns every group's values into the stored codes (formats.decode_scales'
    inverse)."""
    minimum, half = grid_of(grid).zero == "float", 1 << (scale_bits - 1)
    m_lo, m_hi, sign = min_codes(grid, scale_bits)
    k = steps.shape[1] // (2 if minimum else 1)  # steps per row
    st = steps.float().view(steps.shape[0], k, -1).repeat_interleave(groups // k, 1)  # rows × groups × (1 or 2)
    ds, dm = st[..., 0], st[..., -1]
    s_lo, s_hi = (1, (1 << scale_bits) - 1) if minimum else (-half, half - 1)

    def store(gi, s, z):
        c = (s / ds[:, gi]).round().clamp(s_lo, s_hi)
        c = torch.where(c == 0, torch.ones_like(c), c)
        m = sign * dm[:, gi] * (sign * z / dm[:, gi]).round().clamp(m_lo, m_hi) if minimum else z
        return ds[:, gi] * c, m

    def encode(s, z):
        if minimum:
            return (s / ds).round().to(torch.uint8), ((sign * z / dm).round() - m_lo).to(torch.uint8)
        return ((s / ds).round() + half).to(torch.uint8), None
    return store, encode


@register
class Comq(Solver):
    """As a refiner, the descent from the solver before it; alone, the descent from clip's grids. The profile
    leaves the descent out (it lowers every format's error by a similar share, 8–12 % on SmolLM2's layers, at 2–3 ×
    the time of the solve) and judges comq alone as the clip it starts from: profiled with its descent, comq beat
    every chain profiled without theirs and took 132 of SmolLM2's 210 layers in an all-solver 3.0 bpw allocation,
    which ended worse than gptq-act+comq alone (benchmarks/results/solvers.md)."""

    name = "comq"
    summary = "coordinate descent on tr(ΔW H ΔWᵀ), codes then each group's least-squares grid, 4 sweeps"
    refines = True
    profiled = False
    profile_as = "clip"

    def rows(self, weight, stats, fmt):
        out = clip(weight, stats.hessian, fmt.group, fmt.bits, fmt.grid, fmt.scale_bits, fmt.super_block)
        return self.refine(weight, stats, fmt, out)

    def refine(self, weight, stats, fmt, out):
        return refine_stored(weight, stats.hessian, fmt.bits, fmt.grid, fmt.scale_bits, out, damp=self.damp)
