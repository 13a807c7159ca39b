"""Output-adaptive calibration (OAC, Edalati et al. 2024, arXiv 2405.17009): GPTQ (act-order) whose Hessian is
that of the model's output cross-entropy, E_t[‖g_t‖² x_t x_tᵀ] (capture.output_adaptive_hessians), instead of
the layer's own XᵀX: tokens whose output moves the loss weigh more.

The solver is GPTQ; what makes it OAC is the statistic it asks for (OUTPUT_HESSIAN, from backward passes over the
float model before the apply) and solves on. Profiling judges `oac` candidates as `gptq-act`: one Hessian per layer
does not stack the rows of the linears that share an input. Without that statistic (a solve outside the pipeline)
it is `gptq-act`.
"""
from __future__ import annotations

from dataclasses import replace

from ..capture import INPUT, OUTPUT_HESSIAN
from . import register
from .gptq import GPTQAct


@register
class OAC(GPTQAct):
    name = "oac"
    summary = ("GPTQ (act order) on the output-adaptive Hessian, the mean of ‖g‖² x xᵀ, g the loss gradient at "
               "the layer's output (8 backward passes)")
    needs = frozenset({INPUT, OUTPUT_HESSIAN})
    profile_as = "gptq-act"

    def prepare(self, stats):
        return stats if stats.output_hessian is None else replace(stats, hessian=stats.output_hessian)
