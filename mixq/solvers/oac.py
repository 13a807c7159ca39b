"""Output-adaptive calibration (OAC, Edalati et al. 2024, arXiv 2405.17009): GPTQ (act-order) whose Hessian is
that of the model's output cross-entropy, E_t[‖g_t‖² x_t x_tᵀ] (capture.output_adaptive_hessians), instead of
the layer's own XᵀX: tokens whose output moves the loss weigh more.

The solver is GPTQ; what makes it OAC is the Hessian the pipeline passes to a candidate whose solver starts with
`oac` (pipeline.solve_hessian), from backward passes over the float model before the apply. Profiling judges `oac`
candidates as `gptq-act` (profile.profile_solver): one Hessian per layer does not stack the rows of the linears
that share an input.
"""
from __future__ import annotations

from . import register_solver
from .gptq import gptq_act


register_solver("oac")(gptq_act)  # the output-adaptive part is the Hessian the pipeline gives it
