"""Load a GGUF whose architecture transformers' GGUF reader does not know (GPT-NeoX): the config from the file's
hyper-parameters (the adapter's `gguf_hparams`, read back by models.gguf_meta), each tensor dequantized by gguf-py
and put back in Hugging Face's name (gguf-py's tables), row order (the inverse of the adapter's `gguf_rows`) and
norm convention, and the tokenizer from the file's vocabulary, as transformers builds it for any GGUF."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .adapters import Adapter
from .gguf_meta import config_kwargs


def load_gguf(path: Path, adapter: Adapter, reader=None):
    """(float32 model in eval mode, tokenizer) of GGUF file `path` of `adapter`'s architecture; ValueError naming
    the first tensor that is missing, left over or of the wrong shape."""
    import gguf
    from transformers import AutoConfig, PreTrainedTokenizerFast

    reader = reader or gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(adapter.gguf_arch + ".")}
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path} has no token_embd.weight tensor")
    kw = config_kwargs(adapter, fields)
    kw["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])  # ggml lists the fastest dimension first
    kw["tie_word_embeddings"] = "output.weight" not in tensors
    for name in ("bos", "eos"):
        if (f := reader.fields.get(f"tokenizer.ggml.{name}_token_id")) is not None:
            kw[f"{name}_token_id"] = int(f.contents())
    config = AutoConfig.for_model(adapter.family, **kw)
    model = adapter.prepare(adapter.job.model_class.from_config(config))  # (its rotary tables are built here)
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == adapter.gguf_arch)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    state, used = {}, set()
    tied = adapter.head is not None and config.tie_word_embeddings
    for hf, p in model.state_dict(keep_vars=True).items():
        if tied and hf == f"{adapter.head}.weight":
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name not in tensors:
            raise ValueError(f"{path} has no tensor for the model's {hf} (GGUF name {name})")
        t = tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(p.shape)
        perm = adapter.gguf_rows(model, hf, len(data))
        if perm is not None:
            data = data[np.argsort(perm)]
        if name.endswith("norm.weight"):
            data = data - adapter.gguf_norm_offset
        state[hf] = torch.from_numpy(np.ascontiguousarray(data))
        used.add(name)
    left = sorted(set(tensors) - used)
    if left:
        raise ValueError(f"{path} holds tensor {left[0]}, which a {adapter.family} model has no place for")
    model.load_state_dict(state, strict=not tied)
    if tied:
        model.tie_weights()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    return model.float().eval(), tokenizer
