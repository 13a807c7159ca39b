"""The solver of binary-coding formats (grids.bcq): each group's α fitted by alternating least squares on the
original weights, weighted by diag H, then GPTQ's pass with those α fixed: columns in order of decreasing H_jj,
each weight to its group's nearest level Σ_i ±α_i, its error spread over the columns not yet quantized through the
Cholesky factor of H⁻¹ (as solvers.gptq with static groups). Rows of several widths are solved width by width."""
from __future__ import annotations

import torch

from ..formats import QuantizedTensor, QuantSpec
from ..grids.bcq import fit_group, levels_of
from . import Solver, register
from .gptq import error_feedback, factor, live_columns


def bcq_rows(weight: torch.Tensor, hessian: torch.Tensor, group: int, bits: int, damp: float,
             feedback: bool = True, memo: dict | None = None):
    """(codes rows × cols, α rows × groups × bits) of one width."""
    rows, cols = weight.shape
    w, h = live_columns(weight, hessian)
    importance = torch.diagonal(h).expand(rows, cols).reshape(-1, group)
    codes, alpha = fit_group(w.reshape(-1, group), importance, bits)
    alpha = alpha.view(rows, cols // group, bits)
    if not feedback:
        return codes.view(rows, cols), alpha
    levels = levels_of(alpha)  # rows × groups × 2^bits
    perm = torch.argsort(torch.diagonal(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]

    def column(j, col, synced):
        lv = levels[:, int(perm[j]) // group]  # rows × 2^bits
        q = (col - lv).abs().argmin(1, keepdim=True)
        return q, lv.gather(1, q)

    out = error_feedback(w, factor(h, damp, True, memo), column).long()  # (gptq-act's factor: same order, same H)
    return out[:, torch.argsort(perm)], alpha


@register
class BCQ(Solver):
    name = "bcq"
    summary = ("binary coding's own: α by weighted alternating least squares, then GPTQ's error feedback with them "
               "fixed")
    feedback = True

    def rows(self, weight, stats, fmt):
        rows, cols = weight.shape
        widest = int(fmt.bits.max())
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        scales = torch.zeros(rows, cols // fmt.group, widest, dtype=torch.float16)  # (padded to the widest)
        for b in fmt.bits.unique().tolist():
            sel = fmt.bits == b
            c, a = bcq_rows(weight[sel], stats.hessian, fmt.group, int(b), self.damp, self.feedback, stats.memo)
            codes[sel], scales[sel, :, :int(b)] = c.to(torch.uint8), a.half()
        return codes, scales.view(rows, -1), torch.zeros(rows, cols // fmt.group, dtype=torch.uint8), None

    @staticmethod
    def reference(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
        """formats.quantize's reference: the alternating least squares alone, every weight alike."""
        rows, cols = weight.shape
        g = spec.group(cols)
        codes, alpha = fit_group(weight.reshape(-1, g), torch.ones(rows * cols // g, g), spec.bits)
        return QuantizedTensor(codes.view(rows, cols).to(torch.uint8), alpha.half().view(rows, -1),
                               torch.zeros(rows, cols // g, dtype=torch.uint8), spec)
