"""Lattice codebooks ("iq": vector quantization over runs of weights): llama.cpp's i-quant grids as codebooks.

- 2 bits: IQ2_S's 1024 points of 8 magnitudes in {8, 25, 43} (points of the E8 lattice's half-integer coset,
  (1, 3, 5)/2 scaled), each weight its own sign: a run of 8 weights is a 10-bit index and 8 signs, 2.25 bits a
  weight;
- 3 bits: IQ3_S's 512 points of 4 magnitudes in {1, 3, …, 15} (D4 lattice points), a 9-bit index and 4 signs a run
  of 4, 3.25 bits a weight.

w = s · (±c_k) with s one fp16 scale a group (rows of a multiple of 32 weights: the packing's, runtime.lattice), so
that at group 64 iq2 costs 2.5 bits a weight, as int2-g64-min and bcq2-g64 do; or, double-quantized as llama.cpp
stores them, s = step · (2c + 1) with a `scale_bits`-wide code c a group and an fp16 step a super-block:
iq2-g16-dq4-s256 is IQ2_S bit for bit (llama.cpp's d = 8 · step), iq3-g32-dq4-s256 IQ3_S (d = step). The codebooks
are the gguf package's (the same tables llama.cpp reads), so the codes are IQ2_S's and IQ3_S's own.

A weight's code (QuantizedTensor.codes, one a weight) holds its magnitude's place in the codebook's magnitudes and
its sign: q = 2 · m + (w < 0). A run's magnitudes are always one codebook point's; packing turns them into the
point's index (`index_of`). Runs are coded to the nearest point (`nearest`: signs free, so the magnitudes' nearest
point); the solver (solvers.ldlq) spreads each run's error over the columns after it (LDLQ, QuIP#).
"""
from __future__ import annotations

from functools import cache

import numpy as np
import torch

from . import Grid, register

CHUNK = 1 << 22  # runs × codebook points scored at a time (4 bytes each)
SCALE_STEPS = torch.exp(torch.linspace(np.log(0.5), np.log(1.7), 12))  # candidate scales around the rms fit
RUN = {2: 8, 3: 4}  # weights a codebook point covers
CODE_STRIDE = 4  # fit_code's first pass over scale codes of more than 4 bits
INDEX_BITS = {2: 10, 3: 9}


@cache
def codebook(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(points K × run float32 magnitudes, their magnitudes' places K × run int64, the distinct magnitudes)."""
    from gguf.quants import IQ2_S, IQ3_S

    kind = {2: IQ2_S, 3: IQ3_S}[bits]
    kind.init_grid()
    points = torch.from_numpy(np.array(kind.grid, dtype=np.float32).reshape(kind.grid_shape))
    mags = torch.tensor(kind.grid_map, dtype=torch.float32)
    places = (points.unsqueeze(-1) == mags).float().argmax(-1)
    return points, places, mags


@cache
def _index_table(bits: int) -> torch.Tensor:
    """Point index of every run of magnitude places (base-len(mags) number, place 0 first), −1 where none is."""
    points, places, mags = codebook(bits)
    n = len(mags)
    keys = (places * n ** torch.arange(RUN[bits])).sum(1)
    table = torch.full((n ** RUN[bits],), -1, dtype=torch.int64)
    table[keys] = torch.arange(len(points))
    return table


def point_of(places: torch.Tensor, bits: int) -> torch.Tensor:
    """The point index of each run of magnitude places (… × run, int64), −1 where the run is no point."""
    return _index_table(bits)[(places * len(codebook(bits)[2]) ** torch.arange(RUN[bits])).sum(-1)]


def index_of(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """rows × cols codes → rows × cols/run point indices (int64); a run whose magnitudes are no point: ValueError."""
    rows, cols = codes.shape
    idx = point_of((codes.long() >> 1).view(rows, cols // RUN[bits], RUN[bits]), bits)
    if (idx < 0).any():
        raise ValueError(f"iq{bits} codes whose runs are no codebook point")
    return idx


def nearest(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest point to each run of `t` (n × run, in units of the scale), signs free: the point nearest
    its magnitudes. Each magnitude rounded to its nearest codebook magnitude on its own is the nearest of all the
    runs of magnitudes; where that run is a point (about half the runs of Gaussian weights), it is the nearest point,
    and only the other runs are scored against every point."""
    points, _, mags = codebook(bits)
    a = t.abs()
    places = torch.bucketize(a, (mags[1:] + mags[:-1]) / 2)
    idx = point_of(places, bits)
    miss = (idx < 0).nonzero().squeeze(1)
    if len(miss):
        a, norms = a[miss], points.square().sum(1)
        step = max(1, CHUNK // len(points))
        idx[miss] = torch.cat([(norms - 2 * a[i:i + step] @ points.T).argmin(1) for i in range(0, len(a), step)])
    return idx


def coded(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes n × run, values n × run in units of the scale) of the runs `t`."""
    points, places, _ = codebook(bits)
    k = nearest(t, bits)
    negative = t < 0
    return places[k] * 2 + negative, torch.where(negative, -points[k], points[k])


def fit_scale(w: torch.Tensor, importance: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp16 scale (as float32, n × 1) of each group of `w` (n × g) of least importance-weighted error (n × g
    weights) over SCALE_STEPS around the rms fit, then one weighted least-squares step on its codes."""
    n, g = w.shape
    run = RUN[bits]
    points = codebook(bits)[0]
    base = w.square().mean(1, keepdim=True).sqrt() / points.square().mean().sqrt()
    base = torch.where(base > 0, base, torch.ones_like(base))
    best, best_err = base, torch.full((n, 1), float("inf"))
    tries = [base * f for f in SCALE_STEPS]
    for i in range(len(tries) + 1):
        if i == len(tries):  # least squares on the best one's points
            _, v = coded(w.reshape(-1, run) / best.repeat_interleave(g // run, 0), bits)
            v = v.view(n, g)
            s = (importance * w * v).sum(1, keepdim=True) / (importance * v * v).sum(1, keepdim=True).clamp_min(1e-30)
            s = torch.where(s > 0, s, best)
        else:
            s = tries[i]
        s = s.half().float()
        s = torch.where(s > 0, s, torch.full_like(s, 2 ** -24))  # (an fp16 scale never rounds to 0)
        _, v = coded(w.reshape(-1, run) / s.repeat_interleave(g // run, 0), bits)
        err = (importance * (w - s * v.view(n, g)).square()).sum(1, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def fit_code(w: torch.Tensor, importance: torch.Tensor, bits: int, step: torch.Tensor,
             scale_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale code c, scale step · (2c + 1)) of each group of `w` (n × g; `step` n × 1) of least importance-weighted
    error: the double-quantized scales of IQ2_S and IQ3_S. Up to 16 codes, every one is tried; with more, every
    CODE_STRIDE-th, then the codes around each group's best of those: 22 nearest-point searches of 64 at 6 bits,
    for groups' errors 0.2-0.8 % above the best of all 64 on SmolLM2's weights."""
    n, g = w.shape
    top = (1 << scale_bits) - 1
    best_c, best_err = torch.zeros(n, 1), torch.full((n, 1), float("inf"))

    def consider(c: torch.Tensor):
        nonlocal best_c, best_err
        s = step * (2 * c + 1)
        _, v = coded(w.reshape(-1, RUN[bits]) / s.repeat_interleave(g // RUN[bits], 0), bits)
        err = (importance * (w - s * v.view(n, g)).square()).sum(1, keepdim=True)
        better = err < best_err
        best_c, best_err = torch.where(better, c, best_c), torch.where(better, err, best_err)

    stride = 1 if top < 16 else CODE_STRIDE
    for c in range(stride // 2, top + 1, stride):
        consider(torch.full((n, 1), float(c)))
    centre = best_c
    for d in range(1, stride):
        for c in (centre - d, centre + d):
            consider(c.clamp(0, top))
    return best_c, step * (2 * best_c + 1)


def super_steps(w: torch.Tensor, importance: torch.Tensor, group: int, bits: int, scale_bits: int,
                super_block: int) -> torch.Tensor:
    """The fp16 step (as float32, rows × k) of each super-block of `w` (rows × cols, k = cols / super_block; a whole
    row without one): its groups' largest free scale (`fit_scale`) on the largest odd code."""
    rows, cols = w.shape
    free = fit_scale(w.reshape(-1, group), importance.expand(rows, cols).reshape(-1, group), bits)
    k = cols // (super_block or cols)
    top = free.view(rows, k, -1).amax(-1)
    return (top / (2 * ((1 << scale_bits) - 1) + 1)).half().float().clamp_min(2 ** -24)


@register
class Lattice(Grid):
    name = "iq"
    summary = ("lattice codebooks: runs of 8 weights on IQ2_S's 1024 E8 points (2 bits), of 4 on IQ3_S's 512 D4 "
               "points (3 bits), a sign a weight, one fp16 scale a group")
    bits = (2, 3)
    zero = "none"
    uniform = False
    solver = "ldlq"
    row_multiple = 32  # runtime.lattice packs the indices' high bits of 32 weights in a byte
    odd_scale_codes = True  # double-quantized as IQ2_S and IQ3_S: s = step · (2c + 1), a step per super-block

    def label(self, bits: int) -> str:
        return f"iq{bits}"

    def code_bits(self, weights: int, bits: int) -> int:
        return weights // RUN[bits] * (INDEX_BITS[bits] + RUN[bits])

    def fit(self, *args, **kwargs):
        raise ValueError("iq formats code runs of weights on a codebook: the ldlq solver fits them "
                         "(grids.lattice), not the solvers of one weight at a time")

    encode = level = fit

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, group: int, bits: int) -> torch.Tensor:
        """The reference: rows × cols codes and rows × groups fp16 scales → float32 weights."""
        rows, cols = codes.shape
        mags = codebook(bits)[2]
        c = codes.long()
        v = torch.where(c & 1 == 1, -mags[c >> 1], mags[c >> 1])
        return (v.view(rows, cols // group, group) * scales.float().unsqueeze(-1)).view(rows, cols)
