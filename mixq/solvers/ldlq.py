"""The solver of lattice-codebook formats (grids.lattice): LDLQ (QuIP#, Tseng et al. 2024), GPTQ's error feedback
over runs of 8 (or 4) columns. Columns in their order (a run's columns must stay together); at each group's first
column its scale is fitted (weighted by diag H) on the weights as updated so far, as GPTQ does; each run of a row
goes to its nearest codebook point, and the run's error is spread over the columns after it through the Cholesky
factor of H⁻¹ (e · U_FF⁻¹ · U_F,rest; solvers.gptq.error_feedback). Rows of several widths are solved width by
width."""
from __future__ import annotations

import torch

from ..formats import SCALE_BITS, QuantizedTensor, QuantSpec
from ..grids.lattice import RUN, coded, fit_code, fit_scale, super_steps
from . import Solver, register
from .gptq import error_feedback, factor, live_columns


def ldlq_rows(weight: torch.Tensor, hessian: torch.Tensor, group: int, bits: int, damp: float,
              memo: dict | None = None, scale_bits: int = 16, super_block: int = 0):
    """(codes rows × cols, scales rows × groups: float32 holding fp16, or scale codes, steps rows × k or None) of
    one width. Double-quantized (`scale_bits` < 16): every super-block's step fixed first from the original
    weights (`super_steps`), then each group's code chosen as its scale is."""
    rows, cols = weight.shape
    run = RUN[bits]
    w, h = live_columns(weight, hessian)
    importance = torch.diagonal(h).clamp_min(0)
    scales, codes = torch.zeros(rows, cols // group), torch.zeros(rows, cols // group)
    double = scale_bits != SCALE_BITS
    steps = super_steps(w, importance, group, bits, scale_bits, super_block) if double else None
    per_step = cols // group // steps.shape[1] if double else 0

    def columns(j, col, synced):
        if j % group == 0:  # the group's scale, on its weights as updated so far
            g = j // group
            part, imp = synced()[:, j:j + group], importance[j:j + group].expand(rows, group)
            if double:
                codes[:, g:g + 1], scales[:, g:g + 1] = fit_code(part, imp, bits, steps[:, g // per_step, None],
                                                                 scale_bits)
            else:
                scales[:, g:g + 1] = fit_scale(part, imp, bits)
        s = scales[:, j // group:j // group + 1]
        q, v = coded(col / s, bits)
        return q.float(), v * s

    out = error_feedback(w, factor(h, damp, False, memo), columns, run)  # (gptq's factor: natural order, same H)
    return out.to(torch.uint8), (codes.to(torch.uint8) if double else scales), steps




@register
class LDLQ(Solver):
    name = "ldlq"
    summary = ("lattice codebooks' own (iq): GPTQ's error feedback over runs of 8 or 4 columns, each run to its "
               "nearest codebook point (QuIP#'s LDLQ)")

    def rows(self, weight, stats, fmt):
        rows, cols = weight.shape
        double = fmt.scale_bits != SCALE_BITS
        codes = torch.zeros(rows, cols, dtype=torch.uint8)
        scales = torch.zeros(rows, cols // fmt.group, dtype=torch.uint8 if double else torch.float16)
        steps = torch.zeros(rows, cols // (fmt.super_block or cols), dtype=torch.float16) if double else None
        for b in fmt.bits.unique().tolist():
            sel = fmt.bits == b
            c, s, st = ldlq_rows(weight[sel], stats.hessian, fmt.group, int(b), self.damp, stats.memo,
                                 fmt.scale_bits, fmt.super_block)
            codes[sel], scales[sel] = c, s.to(scales.dtype)
            if double:
                steps[sel] = st.half()
        return codes, scales, torch.zeros(rows, cols // fmt.group, dtype=torch.uint8), steps

    @staticmethod
    def reference(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
        """formats.quantize's reference: every group's scale fitted and every run to its nearest point, every weight
        alike, no error feedback."""
        rows, cols = weight.shape
        g = spec.group(cols)
        w = weight.float().reshape(-1, g)
        ones = torch.ones_like(w)
        if spec.double:
            steps = super_steps(weight.float(), torch.ones(cols), g, spec.bits, spec.scale_bits, spec.super_block)
            sc, s = fit_code(w, ones, spec.bits, steps.repeat_interleave(w.shape[0] // steps.numel(), 0).view(-1, 1),
                             spec.scale_bits)
        else:
            s = fit_scale(w, ones, spec.bits)
        codes, _ = coded((w / s).reshape(-1, RUN[spec.bits]), spec.bits)
        scales = sc.to(torch.uint8).view(rows, -1) if spec.double else s.half().view(rows, -1)
        return QuantizedTensor(codes.view(rows, cols).to(torch.uint8), scales,
                               torch.zeros(rows, cols // g, dtype=torch.uint8), spec,
                               steps.half() if spec.double else None)
