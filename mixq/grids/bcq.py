"""Binary-coding quantization ("bcq": Xu et al. 2018; BiQGEMM, Jeon et al. 2020; LUT-GEMM, Park et al. 2022): each
group's weights as a sum of `bits` binary planes, w ≈ Σ_i α_i · b_i with b_i ∈ {−1, +1} and `bits` fp16 α of the
group's own (stored: `bits` bits a weight + 16 · bits a group). A weight's code q holds its signs, bit i of q set
where b_i = +1, so that its value is Σ_i α_i · (2 · bit_i(q) − 1): the 2^bits levels of a group are all the signed
sums of its α, evenly spaced only where α_i = 2^i · α_0.

The planes make a look-up-table product cheap (BiQGEMM): for every 8 inputs, the 256 signed sums ±x_0 ± … ± x_7 are
formed once per call and each plane's byte of 8 signs picks one (runtime.bcq).

A group is fitted (`fit_group`) by importance-weighted alternating least squares: a greedy start (each plane the
signs of what the planes before it leave, α the weighted mean of its magnitude), then, in turn, every weight to its
nearest level and the α of each group to the weighted least-squares solution for those signs. The grid is solved
by its own solver (solvers.bcq, `Grid.solver`): the others fit one scale a group.
"""
from __future__ import annotations

import torch

from . import Grid, register

ITERS = 8  # alternations after the greedy start; the error stops falling after a few
CHUNK = 1 << 20  # weights fitted (and coded) at a time: the levels of every weight are 2^bits floats each
RIDGE = 1e-6  # relative ridge on each group's normal equations (planes that agree everywhere)


@register
class BinaryCoding(Grid):
    name = "bcq"
    summary = "binary coding: w = Σ α_i · (±1), one fp16 α a bit a group (BiQGEMM's look-up-table product)"
    bits = (2, 3, 4)
    zero = "none"
    uniform = False
    solver = "bcq"
    row_multiple = 8  # BCQLinear's planes: a byte holds 8 columns

    def scales_per_group(self, bits: int) -> int:
        return bits

    def label(self, bits: int) -> str:
        return f"bcq{bits}"

    def fit(self, *args, **kwargs):
        raise ValueError("bcq groups have one α a bit: the bcq solver fits them (grids.bcq.fit_group), not the "
                         "solvers of one scale a group")

    encode = level = fit

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, group: int, bits: int) -> torch.Tensor:
        """The reference: rows × cols codes and rows × (groups · bits) α (plane i of group g at g · bits + i) →
        float32 weights."""
        rows, cols = codes.shape
        alpha = scales.float().view(rows, cols // group, 1, bits)
        return (signs(codes, bits).view(rows, cols // group, group, bits) * alpha).sum(-1).view(rows, cols)


def signs(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(…, bits) of ±1: plane i's sign of each code."""
    planes = (codes.long().unsqueeze(-1) >> torch.arange(bits)) & 1
    return planes.float() * 2 - 1


def levels_of(alpha: torch.Tensor) -> torch.Tensor:
    """Every group's 2^bits levels (…, 2^bits), level q = Σ_i α_i · (2 · bit_i(q) − 1)."""
    bits = alpha.shape[-1]
    return alpha @ signs(torch.arange(1 << bits), bits).T


def nearest(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The code of each weight's nearest level: w (n × g), alpha (n × bits) → n × g codes (int64)."""
    step = max(1, CHUNK // w.shape[1])
    return torch.cat([(w[i:i + step].unsqueeze(-1) - levels_of(alpha[i:i + step]).unsqueeze(1)).abs().argmin(-1)
                      for i in range(0, w.shape[0], step)])


def fit_group(w: torch.Tensor, importance: torch.Tensor, bits: int, iters: int = ITERS):
    """(codes n × g, α n × bits as fp16 values in float32) of n groups `w` (n × g), each weight weighed by
    `importance` (n × g, ≥ 0), by the alternating least squares of the module's note; CHUNK weights at a time."""
    step = max(1, CHUNK // w.shape[1])
    if w.shape[0] > step:
        parts = [_fit(w[i:i + step], importance[i:i + step], bits, iters) for i in range(0, w.shape[0], step)]
        return torch.cat([c for c, _ in parts]), torch.cat([a for _, a in parts])
    return _fit(w, importance, bits, iters)


def _fit(w: torch.Tensor, importance: torch.Tensor, bits: int, iters: int):
    imp = importance.float().clamp_min(0) + 1e-12
    r, alpha = w.float().clone(), []
    for _ in range(bits):  # greedy: each plane the signs of the residual, α its weighted mean magnitude
        a = (imp * r.abs()).sum(1, keepdim=True) / imp.sum(1, keepdim=True)
        alpha.append(a)
        r = r - a * torch.where(r >= 0, 1.0, -1.0)
    alpha = torch.cat(alpha, 1).half().float()
    codes = nearest(w, alpha)
    best = _error(w, imp, codes, alpha)
    for _ in range(iters):
        b = signs(codes, bits)  # n × g × bits
        gram = torch.einsum("ngi,ng,ngj->nij", b, imp, b)
        gram = gram + RIDGE * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(bits)
        rhs = torch.einsum("ngi,ng->ni", b, imp * w)
        new = torch.linalg.solve(gram.double(), rhs.double().unsqueeze(-1)).squeeze(-1).float().half().float()
        new = torch.where(torch.isfinite(new), new, alpha)
        c = nearest(w, new)
        err = _error(w, imp, c, new)
        better = (err < best).unsqueeze(-1)  # a group keeps its best fit so far
        alpha, codes, best = torch.where(better, new, alpha), torch.where(better, c, codes), torch.minimum(err, best)
    return codes, alpha


def _error(w, imp, codes, alpha) -> torch.Tensor:
    deq = (signs(codes, alpha.shape[-1]) * alpha.unsqueeze(1)).sum(-1)
    return (imp * (w - deq) ** 2).sum(1)
