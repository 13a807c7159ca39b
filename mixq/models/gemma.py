"""Gemma 2 and Gemma 3's text model: Llama's linears, with RMSNorms that scale by (1 + γ), a norm before and after
both the attention and the MLP (the outputs are normalised before they join the residual stream), embeddings
multiplied by √width (in the table's own module for Gemma 3), a tied head with a soft cap on the logits (Gemma 2),
q/k norms (Gemma 3) and sliding-window layers, whose masks and rotary tables capture catches per block. GGUF stores
each norm's weight as 1 + γ."""
from __future__ import annotations

from dataclasses import replace

from .adapters import Adapter, register
from .llama import GGUF_HPARAMS, LLAMA

GEMMA2 = register(replace(
    LLAMA, family="gemma2",
    reads=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    norm_kind="rms1p",
    rotation="its norms after the attention and the MLP scale each output channel before the residual sum",
    softcap="final_logit_softcapping",
    bias_flags=(("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),),
    gguf_arch="gemma2", gguf_rotary=(), gguf_norm_offset=1.0,
    gguf_hparams=GGUF_HPARAMS + (("attn_logit_softcapping", "attn_logit_softcapping"),
                                 ("final_logit_softcapping", "final_logit_softcapping"),
                                 ("attention.sliding_window", "sliding_window"))))
# Gemma 3's local layers turn at their own rotary base
GEMMA3: Adapter = register(replace(GEMMA2, family="gemma3_text", gguf_arch="gemma3",
                                   gguf_hparams=GEMMA2.gguf_hparams + (("rope.freq_base_swa", "rope_theta_local"),)))
