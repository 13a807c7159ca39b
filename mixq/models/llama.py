"""The Llama family (Llama, Mistral, Qwen2, Qwen3 share its layout): RMSNorm before attention and MLP, q/k/v read
one norm, gate/up the other, o and down write the residual stream. Qwen2's q/k/v biases are the model's own (kept,
stored and counted like any parameter); Qwen3's q/k norms sit inside attention, after the projections."""
from __future__ import annotations

from dataclasses import replace

from .adapters import Adapter, register

LLAMA = register(Adapter(
    family="llama",
    blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
))
register(replace(LLAMA, family="mistral"))  # llama.cpp writes Mistral as a llama GGUF
# llama.cpp keeps Qwen's q/k rows as Hugging Face orders them (transformers permutes llama's alone on reading)
register(replace(LLAMA, family="qwen2", gguf_arch="qwen2", gguf_rotary=()))
register(replace(LLAMA, family="qwen3", gguf_arch="qwen3", gguf_rotary=()))
