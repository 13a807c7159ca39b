"""The Llama family (Llama, Mistral, Qwen2, Qwen3 share its layout): RMSNorm before attention and MLP, q/k/v read
one norm, gate/up the other, o and down write the residual stream. Qwen2's q/k/v biases are the model's own (kept,
stored and counted like any parameter); Qwen3's q/k norms sit inside attention, after the projections."""
from __future__ import annotations

from dataclasses import replace

from .adapters import Adapter, register

# GGUF hyper-parameters (models.gguf_meta): convert_hf_to_gguf's common ones and Llama's rotary width
GGUF_HPARAMS = (
    ("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"), ("feed_forward_length", "intermediate_size"),
    ("attention.head_count", "num_attention_heads"), ("attention.head_count_kv", "kv_heads"),
    ("attention.key_length", "head_dim"), ("attention.value_length", "head_dim"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"), ("rope.freq_base", "rope_theta"),
    ("rope.dimension_count", "rope_dims"), ("vocab_size", "vocab_size"))

LLAMA = register(Adapter(
    family="llama",
    blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    gguf_hparams=GGUF_HPARAMS,
))
register(replace(LLAMA, family="mistral"))  # llama.cpp writes Mistral as a llama GGUF
# llama.cpp keeps Qwen's q/k rows as Hugging Face orders them (transformers permutes llama's alone on reading)
register(replace(LLAMA, family="qwen2", gguf_arch="qwen2", gguf_rotary=()))
register(replace(LLAMA, family="qwen3", gguf_arch="qwen3", gguf_rotary=()))
