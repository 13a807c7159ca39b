"""The uniform grids: level(q) = q, codes 0 … 2^bits − 1 evenly spaced by the group's scale.

- "int" (asymmetric): an integer zero z is stored, `bits` wide; the range [min, max] (with 0 in it) is covered.
- "sym": no zero is stored: z is the constant 2^(bits-1), and the scale is signed so that the weight of largest
  magnitude lands on code 0, the longer side of the grid (as llama.cpp's Q4_0: no level is wasted).
- "min": an fp16 minimum m instead of an integer zero, w ≈ q · s + m (llama.cpp's Q4_1 / Q5_1; HQQ's float
  zero): the grid's offset is free, not a multiple of the step. Here z = −m/s, so (q − z) · s is the value.
"""
from __future__ import annotations

import torch

from . import Grid, register


class Uniform(Grid):
    def encode(self, w, scale, zero, maxq):
        return torch.minimum((w / scale).add_(zero).round_().clamp_(min=0), maxq)


@register
class Int(Uniform):
    name = "int"
    summary = "uniform, with an integer zero of `bits` bits a group"
    zero = "int"

    def fit(self, w, maxq, shrink=1.0):
        lo = w.amin(1, keepdim=True).clamp(max=0) * shrink
        hi = w.amax(1, keepdim=True).clamp(min=0) * shrink
        scale = ((hi - lo) / maxq).clamp(min=1e-6).half().float()
        zero = torch.minimum(torch.round(-lo / scale).clamp(min=0), maxq)
        return scale, zero


@register
class Sym(Uniform):
    name = "sym"
    summary = "uniform and symmetric: no zero stored, the largest weight on the longer side"
    signed_scale = True

    def fixed_zero(self, bits):
        return 1 << (bits - 1)

    def fit(self, w, maxq, shrink=1.0):
        zero = torch.floor((maxq + 1) / 2)
        extreme = w.gather(1, w.abs().argmax(1, keepdim=True))  # signed: it lands on code 0, the longer side
        scale = -extreme * shrink / zero
        scale = torch.where(scale.abs() < 1e-6, torch.full_like(scale, 1e-6), scale).half().float()
        return scale, zero.expand_as(scale)


@register
class Min(Uniform):
    name = "min"
    summary = "uniform, with an fp16 minimum a group (w = q·s + m)"
    zero = "float"

    def fit(self, w, maxq, shrink=1.0):
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)  # no need to include 0: shrink to the middle
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * shrink
        scale = (2 * half / maxq).clamp(min=1e-6).half().float()
        return scale, -(mid - half).half().float() / scale


@register
class KMin(Min):
    """llama.cpp's k-quant minimum (Q2_K, Q4_K, Q5_K): as "min", but the minimum is never above 0 and its
    double-quantized code is unsigned and subtracted, m = −Δm · c, so the grid always reaches down to 0 or below."""

    name = "kmin"
    summary = "uniform, with a minimum ≤ 0 a group (llama.cpp's Q2_K / Q4_K / Q5_K)"
    negative_min = True
    double_only = True

    def fit(self, w, maxq, shrink=1.0):
        lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * shrink
        low = (mid - half).clamp(max=0)
        scale = ((mid + half - low) / maxq).clamp(min=1e-6).half().float()
        return scale, -low.half().float() / scale
