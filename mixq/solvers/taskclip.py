"""Clipping judged by the task (after Q-Rater): the clipping that a layer's own error prefers is not the one that
serves the model best, and the error that matters is non-convex in it, so it is searched, not solved for.

The solver `taskclip` is GPTQ in act order whose per-group clipping search (solvers.clip) runs over the shrinks
scaled by a ratio r of RATIOS: r < 1 clips every group harder than its own input-weighted error would. With a block
judge (the JUDGE statistic: the block's output error with this layer set to a candidate weight) every ratio is
solved (the whole chain: `taskclip+comq` refines each) and the one whose block output on the first
capture.JUDGE_WINDOWS calibration windows lies nearest the float block's is kept, layer after layer in the block's
order, each frozen before the next is judged. Without one (profiling, a solve on its own) it is ratio 1:
`gptq-act`, as which the profile judges it. Cost: len(RATIOS) solves and block runs per layer.
"""
from __future__ import annotations

from ..capture import INPUT, JUDGE
from . import register
from .clip import SHRINKS
from .gptq import GPTQAct, gptq_quantize

RATIOS = (1.0, 0.95, 0.9, 0.85)


@register
class TaskClip(GPTQAct):
    name = "taskclip"
    summary = ("GPTQ (act order) with each group's clipping scaled by 1, 0.95, 0.9, 0.85, the ratio whose block "
               "output is nearest the float one kept (4 × the solves)")
    needs = frozenset({INPUT, JUDGE})
    profile_as = "gptq-act"
    ratio = 1.0

    def rows(self, weight, stats, fmt):
        return gptq_quantize(weight, stats.hessian, fmt.group, fmt.bits, fmt.grid, act_order=True, damp=self.damp,
                             scale_bits=fmt.scale_bits, super_block=fmt.super_block,
                             shrinks=[s * self.ratio for s in SHRINKS], memo=stats.memo)

    def at_ratio(self, ratio: float) -> "TaskClip":
        solver = type(self)(self.damp)
        solver.ratio = ratio
        return solver

    def solve(self, weight, stats, spec, then=()):
        """With a judge, the chain solved at every ratio and the result it judges best; without, ratio 1."""
        if stats.judge is None:
            return super().solve(weight, stats, spec, then)
        return self.search(weight, stats, spec, then)[0]

    def search(self, weight, stats, spec, then=()):
        """(the result of least stats.judge over RATIOS, its ratio)."""
        best = None
        for ratio in RATIOS:
            qt = super(TaskClip, self.at_ratio(ratio)).solve(weight, stats, spec, then)
            err = stats.judge(qt.dequantize())
            if best is None or err < best[0]:
                best = (err, qt, ratio)
        return best[1], best[2]
