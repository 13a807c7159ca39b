"""Round-to-nearest on the min/max grid of each group: the baseline every other solver must beat."""
from __future__ import annotations

import torch

from ..formats import DoubleQuant, fit_params, quantize_codes, stored_zeros
from ..capture import LayerStats
from . import Rows, Solver, register


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """rows × cols → (rows · groups) × group."""
    return w.reshape(-1, group)


def finish(codes, scale, zero, rows: int, grid: str, dq: DoubleQuant | None = None):
    """Solver output → what is stored: (codes, scales, zeros, steps) as QuantizedTensor holds them."""
    codes = codes.to(torch.uint8).view(rows, -1)
    if dq is not None:
        return (codes, *dq.encode(scale, zero))
    return codes, scale.half().view(rows, -1), stored_zeros(scale, zero, grid).view(rows, -1), None


def row_maxq(bits: torch.Tensor) -> torch.Tensor:
    return ((1 << bits) - 1).float().unsqueeze(1)


def rtn(weight, group, bits, grid, scale_bits=16, super_block=0):
    """Round to nearest on each group's min/max grid (`bits` per row): the stored tuple."""
    rows, cols = weight.shape
    maxq = row_maxq(bits).repeat_interleave(cols // group, 0)
    wg = grouped(weight, group)
    scale, zero = fit_params(wg, maxq, grid)
    dq = DoubleQuant.of(weight, group, row_maxq(bits), grid, scale_bits, super_block)
    if dq is not None:
        scale, zero = dq.snap(scale, zero)
    return finish(quantize_codes(wg, scale, zero, maxq, grid), scale, zero, rows, grid, dq)


@register
class RTN(Solver):
    name = "rtn"
    summary = "round to nearest on each group's min/max grid; needs no calibration"
    needs = frozenset()

    def rows(self, weight: torch.Tensor, stats: LayerStats, fmt: Rows):
        return rtn(weight, fmt.group, fmt.bits, fmt.grid, fmt.scale_bits, fmt.super_block)
