"""Round-to-nearest on the min/max grid of each group: the baseline every other solver must beat."""
from __future__ import annotations

import torch

from ..formats import fit_params, quantize_codes
from . import register_solver


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """rows × cols → (rows · groups) × group."""
    return w.reshape(-1, group)


def finish(codes, scale, zero, rows: int):
    return codes.to(torch.uint8).view(rows, -1), scale.half().view(rows, -1), zero.to(torch.uint8).view(rows, -1)


@register_solver("rtn")
def rtn(weight, hessian, group, bits, symmetric):
    rows, cols = weight.shape
    maxq = ((1 << bits) - 1).float().repeat_interleave(cols // group).unsqueeze(1)
    wg = grouped(weight, group)
    scale, zero = fit_params(wg, maxq, symmetric)
    return finish(quantize_codes(wg, scale, zero, maxq), scale, zero, rows)
