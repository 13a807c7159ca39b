"""Attention-aware quantization of the value projection (after aespa, Kim et al. 2024, arXiv 2402.08958).

A change ΔW of the value projection's rows for key-value head g moves head h's attention output by
ΔW_g Σ_s A_hts x_s = ΔW_g x̄_ht, not by ΔW_g x_t: what the next layer sees is the input averaged by the attention
probabilities. So the value rows of head g are solved on H_g = E[x̄ x̄ᵀ] over the query heads that read g
(capture.attention_hessians) instead of the layer's own E[x xᵀ], each head's rows on its own Hessian
(`solve_heads`). aespa's objectives for the query and key projections (the attention scores) weigh the rows of
W_q, W_k by the keys and queries but keep E[x xᵀ] on the columns; a solver that treats rows independently (GPTQ,
comq) gets the same solution from them, so every layer but the value projection is solved as `gptq-act`.

The solver `aespa` is GPTQ in act order; the pipeline gives it the attention-aware Hessians of the value rows.
It chains like any other (`aespa+comq`: coordinate descent on the same Hessians). Profiling judges it as
`gptq-act` (profile.PROFILE_AS).
"""
from __future__ import annotations

import torch

from ..formats import QuantizedTensor, QuantSpec
from . import register_solver, solve
from .gptq import gptq_act

register_solver("aespa")(gptq_act)  # the attention-aware part is the Hessians the pipeline gives it


def solve_heads(solver: str, weight: torch.Tensor, hessians: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """`solve` for a value projection whose rows split evenly into len(hessians) heads, each head's rows on its
    own Hessian (heads × cols × cols); the parts stacked back in row order."""
    heads = hessians.shape[0]
    if weight.shape[0] % heads:
        raise ValueError(f"{weight.shape[0]} rows do not split into {heads} heads")
    parts = [solve(solver, w, h, spec) for w, h in zip(weight.chunk(heads), hessians)]
    return QuantizedTensor.stack(parts)
