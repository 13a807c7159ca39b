"""Attention-aware quantization of the value projection (after aespa, Kim et al. 2024, arXiv 2402.08958).

A change ΔW of the value projection's rows for key-value head g moves head h's attention output by
ΔW_g Σ_s A_hts x_s = ΔW_g x̄_ht, not by ΔW_g x_t: what the next layer sees is the input averaged by the attention
probabilities. So the value rows of head g are solved on H_g = E[x̄ x̄ᵀ] over the query heads that read g
(the ATTENTION statistic, capture.attention_hessians) instead of the layer's own E[x xᵀ], each head's rows on its
own Hessian. aespa's objectives for the query and key projections (the attention scores) weigh the rows of W_q, W_k
by the keys and queries but keep E[x xᵀ] on the columns; a solver that treats rows independently (GPTQ, comq) gets
the same solution from them, so every layer but the value projection (which alone gets the statistic) is solved as
`gptq-act`.

The solver `aespa` is GPTQ in act order. It chains like any other (`aespa+comq`: coordinate descent on the same
Hessians). Profiling judges it as `gptq-act`.
"""
from __future__ import annotations

from dataclasses import replace

from ..capture import ATTENTION, INPUT
from ..formats import QuantizedTensor
from . import Rows, register
from .gptq import GPTQAct


@register
class Aespa(GPTQAct):
    name = "aespa"
    summary = ("attention-aware: the value projection's rows of each key-value head on the mean of x̄ x̄ᵀ, x̄ the "
               "input averaged by that head's attention; the other layers as gptq-act")
    needs = frozenset({INPUT, ATTENTION})
    profile_as = "gptq-act"

    def solve(self, weight, stats, spec, then=()):
        """With attention Hessians (heads × cols × cols), each head's rows on its own, stacked back in row
        order; without them, gptq-act."""
        if stats.attention is None:
            return super().solve(weight, stats, spec, then)
        heads = stats.attention.shape[0]
        if weight.shape[0] % heads:
            raise ValueError(f"{weight.shape[0]} rows do not split into {heads} heads")
        grid = Rows.of(spec, *weight.shape).for_layer(weight, stats).grid  # (a learned grid: the whole layer's)
        return QuantizedTensor.stack([super(Aespa, self).solve(w, replace(stats, hessian=h, attention=None), spec,
                                                               then, grid)
                                      for w, h in zip(weight.chunk(heads), stats.attention)])
