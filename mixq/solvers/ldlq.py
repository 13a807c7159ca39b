"""The solver of lattice-codebook formats (grids.lattice): LDLQ (QuIP#, Tseng et al. 2024), GPTQ's error feedback
over runs of 8 (or 4) columns. Columns in their order (a run's columns must stay together); at each group's first
column its scale is fitted (weighted by diag H) on the weights as updated so far, as GPTQ does; each run of a row
goes to its nearest codebook point, and the run's error is spread over the columns after it through the Cholesky
factor of H⁻¹ (e · U_FF⁻¹ · U_F,rest; solvers.gptq.error_feedback). Rows of several widths are solved width by
width."""
from __future__ import annotations

import torch

from ..formats import QuantizedTensor, QuantSpec
from ..grids.lattice import RUN, coded, fit_scale
from . import Solver, register
from .gptq import error_feedback, factor, live_columns


def ldlq_rows(weight: torch.Tensor, hessian: torch.Tensor, group: int, bits: int, damp: float,
              memo: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes rows × cols, scales rows × groups float32 holding fp16) of one width."""
    rows, cols = weight.shape
    run = RUN[bits]
    w, h = live_columns(weight, hessian)
    importance = torch.diagonal(h).clamp_min(0)
    scales = torch.zeros(rows, cols // group)

    def columns(j, col, synced):
        if j % group == 0:  # the group's scale, on its weights as updated so far
            g = j // group
            scales[:, g:g + 1] = fit_scale(synced()[:, j:j + group], importance[j:j + group].expand(rows, group),
                                           bits)
        s = scales[:, j // group:j // group + 1]
        codes, v = coded(col / s, bits)
        return codes.float(), v * s

    out = error_feedback(w, factor(h, damp, False, memo), columns, run)  # (gptq's factor: natural order, same H)
    return out.to(torch.uint8), scales


def reference_rows(weight: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) with no Hessian: every group's scale fitted, every run to its nearest point."""
    rows, cols = weight.shape
    w = weight.float().reshape(-1, group)
    s = fit_scale(w, torch.ones_like(w), bits)
    codes, _ = coded((w / s).reshape(-1, RUN[bits]), bits)
    return codes.view(rows, cols).to(torch.uint8), s.view(rows, -1)


@register
class LDLQ(Solver):
    name = "ldlq"
    summary = ("lattice codebooks' own (iq): GPTQ's error feedback over runs of 8 or 4 columns, each run to its "
               "nearest codebook point (QuIP#'s LDLQ)")

    def rows(self, weight, stats, fmt):
        rows, cols = weight.shape
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        scales = torch.zeros(rows, cols // fmt.group, dtype=torch.float16)
        for b in fmt.bits.unique().tolist():
            sel = fmt.bits == b
            c, s = ldlq_rows(weight[sel], stats.hessian, fmt.group, int(b), self.damp, stats.memo)
            codes[sel], scales[sel] = c, s.half()
        return codes, scales, torch.zeros(rows, cols // fmt.group, dtype=torch.uint8), None

    @staticmethod
    def reference(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
        """formats.quantize's reference: nearest points, every weight alike."""
        rows, cols = weight.shape
        g = spec.group(cols)
        codes, s = reference_rows(weight, g, spec.bits)
        return QuantizedTensor(codes, s.half(), torch.zeros(rows, cols // g, dtype=torch.uint8), spec)
