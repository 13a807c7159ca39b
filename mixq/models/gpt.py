"""GPT-2 and GPT-NeoX (Pythia): LayerNorms with a bias before attention and MLP, fused query/key/value matrices
(one allocation unit each, as their checkpoints and llama.cpp store them), biases on every linear (the model's own:
stored and counted). GPT-2's linears are transformers' Conv1D (weights in × out), made nn.Linear when the model
loads; its head is tied to the token table (`wpe`, the position table, stays float). GPT-NeoX runs attention and
MLP side by side on the same stream (parallel residual), each through its own norm.

A LayerNorm subtracts the mean of the stream's channels, which a rotation of the stream does not commute with:
rotate and resq refuse these families."""
from __future__ import annotations

from .adapters import Adapter, register

CENTRED = "its LayerNorms subtract the channels' mean, which a rotation of the residual stream does not keep"

GPT2 = register(Adapter(
    family="gpt2",
    blocks="transformer.h",
    groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    norm="transformer.ln_f", embed="transformer.wte",
    value=None, attn_out="attn.c_proj",
    reads=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))), writes=("attn.c_proj", "mlp.c_proj"),
    norm_kind="layer", rotation=CENTRED, transposed=True, bias_flags=(),
    gguf_arch="gpt2", gguf_rotary=(),
    gguf_hparams=(("block_count", "n_layer"), ("context_length", "n_positions"), ("embedding_length", "n_embd"),
                  ("feed_forward_length", "gpt2_ffn"), ("attention.head_count", "n_head"),
                  ("attention.layer_norm_epsilon", "layer_norm_epsilon")),
))

GPT_NEOX = register(Adapter(
    family="gpt_neox",
    blocks="gpt_neox.layers",
    groups=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
    norm="gpt_neox.final_layer_norm", embed="gpt_neox.embed_in",
    value=None, attn_out="attention.dense",
    reads=(("input_layernorm", ("attention.query_key_value",)), ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    writes=("attention.dense", "mlp.dense_4h_to_h"),
    norm_kind="layer", rotation=CENTRED, bias_flags=(),
    gguf_arch="gptneox", gguf_rotary=(),
    # its fused rows are (head, q|k|v, dim) in Hugging Face's order, all q, all k, all v in GGUF's
    gguf_interleaved=(("attention.query_key_value", "num_attention_heads"),),
    gguf_hparams=(("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                  ("block_count", "num_hidden_layers"), ("feed_forward_length", "intermediate_size"),
                  ("attention.head_count", "num_attention_heads"), ("rope.dimension_count", "rope_dims"),
                  ("rope.freq_base", "rope_theta"), ("use_parallel_residual", "use_parallel_residual"),
                  ("attention.layer_norm_epsilon", "layer_norm_eps")),
))
