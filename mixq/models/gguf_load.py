"""Load a GGUF whose architecture transformers' GGUF reader does not know (GPT-NeoX): the config from the file's
hyper-parameters (the adapter's `gguf_hparams`, read back by models.gguf_meta), each tensor dequantized by gguf-py
and put back in Hugging Face's name, row order and norm convention (models.stream.GGUFSource), and the tokenizer
from the file's vocabulary, as transformers builds it for any GGUF."""
from __future__ import annotations

from pathlib import Path

from .adapters import Adapter
from .gguf_meta import config_kwargs


def gguf_config(reader, adapter: Adapter):
    """The transformers config a GGUF file of `adapter`'s architecture describes."""
    from transformers import AutoConfig

    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(adapter.gguf_arch + ".")}
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("the file has no token_embd.weight tensor")
    kw = config_kwargs(adapter, fields)
    kw["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])  # ggml lists the fastest dimension first
    kw["tie_word_embeddings"] = "output.weight" not in tensors
    for name in ("bos", "eos"):
        if (f := reader.fields.get(f"tokenizer.ggml.{name}_token_id")) is not None:
            kw[f"{name}_token_id"] = int(f.contents())
    return AutoConfig.for_model(adapter.family, **kw)


def gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF's vocabulary (transformers' builder, which needs no architecture)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf(path: Path, adapter: Adapter, reader=None):
    """(float32 model in eval mode, tokenizer) of GGUF file `path` of `adapter`'s architecture; ValueError naming
    the first tensor that is missing or left over."""
    import gguf

    from .stream import GGUFSource, fill, meta_model

    reader = reader or gguf.GGUFReader(path)
    model = meta_model(gguf_config(reader, adapter), adapter)
    source = GGUFSource(path, model, adapter, reader)
    left = sorted(set(t.name for t in reader.tensors) - {t.name for t in source.where.values()})
    if left:
        raise ValueError(f"{path} holds tensor {left[0]}, which a {adapter.family} model has no place for")
    fill(model, source, [n for n, _ in model.named_parameters()])
    if adapter.head is not None and model.config.tie_word_embeddings:
        model.tie_weights()
    return model.float().eval(), gguf_tokenizer(path)
