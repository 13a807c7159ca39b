"""BERT sentence encoders (and the families that share its layout: RoBERTa, XLM-RoBERTa): post-norm blocks
(x → LN(x + attention(x)) → LN(· + MLP(·))), q/k/v reading the block's input, biases on every linear (the model's
own: stored and counted), no head. Judged and evaluated by the sentence embedding (models.tasks, "embedding"); the
attention is bidirectional, which the attention statistic follows (the module says it is not causal).

Its LayerNorms centre the stream, so rotate and resq refuse it; llama.cpp runs BERT, but mixq exports GGUF onto a
source GGUF, and transformers reads none of BERT's, so there is no GGUF export."""
from __future__ import annotations

from dataclasses import replace

from .adapters import Adapter, register
from .gpt import CENTRED

BERT = register(Adapter(
    family="bert",
    blocks="encoder.layer",
    groups=(("attention.self.query", "attention.self.key", "attention.self.value"), ("attention.output.dense",),
            ("intermediate.dense",), ("output.dense",)),
    norm=None, head=None, embed="embeddings.word_embeddings",
    value="attention.self.value", attn_out="attention.output.dense",
    reads=(), writes=(), norm_kind="layer", rotation=CENTRED, bias_flags=(),
    gguf_arch=None, gguf_rotary=(), task="embedding",
))
register(replace(BERT, family="roberta"))
register(replace(BERT, family="xlm-roberta"))
