"""The Llama family (Llama, Mistral, Qwen2, Qwen3 share its layout): RMSNorm before attention and MLP, q/k/v read
one norm, gate/up the other, o and down write the residual stream."""
from __future__ import annotations

from dataclasses import replace

from .adapters import ADAPTERS, Adapter

LLAMA = Adapter(
    blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)
ADAPTERS.register("llama")(LLAMA)
ADAPTERS.register("mistral")(LLAMA)  # llama.cpp writes Mistral as a llama GGUF
# llama.cpp keeps Qwen's q/k rows as Hugging Face orders them (transformers permutes llama's alone on reading)
ADAPTERS.register("qwen2")(replace(LLAMA, gguf_arch="qwen2", gguf_rotary=()))
ADAPTERS.register("qwen3")(replace(LLAMA, gguf_arch="qwen3", gguf_rotary=()))
