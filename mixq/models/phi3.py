"""Phi-3: Llama's layout with the queries, keys and values in one `qkv_proj` and the gate and up projections in one
`gate_up_proj`. The allocation unit is the fused matrix, as every runtime stores it (llama.cpp's attn_qkv and
ffn_up, transformers' and vLLM's checkpoints): one format per fused matrix, the exact storage of what is exported.
With no value projection of its own, Phi-3 gets no attention-aware statistic and rotate leaves its heads' values
in their basis."""
from __future__ import annotations

from .adapters import Adapter, register
from .llama import GGUF_HPARAMS

PHI3 = register(Adapter(
    family="phi3",
    blocks="model.layers",
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    value=None,
    reads=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    bias_flags=(),
    gguf_arch="phi3", gguf_rotary=(),
    gguf_hparams=GGUF_HPARAMS + (("rope.scaling.original_context_length", "original_max_position_embeddings"),
                                 ("attention.sliding_window", "sliding_window")),
))
