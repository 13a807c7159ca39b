"""What a GGUF file says of a model besides its block tensors, for a model that came from a Hugging Face folder:
the architecture's hyper-parameters (each adapter's `gguf_hparams`: gguf-py's keys, written from the config as
llama.cpp's convert_hf_to_gguf.py writes them, and read back into a config for a family transformers cannot load
from GGUF), the rotary tables llama.cpp takes as tensors, and the tokenizer, from the folder's tokenizer.json
through gguf-py's vocabulary readers.

A value in `gguf_hparams` names a config attribute, or one of `DERIVED`: a value the config holds in another shape
(the rotary base inside `rope_parameters`, the rotated width as a fraction of a head)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from .adapters import Adapter

log = logging.getLogger(__name__)


class GGUFMetaError(ValueError):
    """A model or tokenizer that GGUF's metadata cannot describe; the message says which part."""


def _rope(config, kind: str = "full_attention") -> dict:
    """The rotary parameters of the model's (global-attention) layers."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return dict(rope.get(kind) or rope)


def _rotated(adapter: Adapter, config) -> int:
    return int(_rope(config).get("partial_rotary_factor", 1.0) * adapter.head_dim(config))


# derived value → (its value of a config, the config fields a GGUF's value of it gives back)
DERIVED: dict[str, tuple[Callable, Callable]] = {
    "head_dim": (lambda a, c: a.head_dim(c), lambda v, a, c: {"head_dim": v}),
    "kv_heads": (lambda a, c: getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                 lambda v, a, c: {"num_key_value_heads": v}),
    "rope_theta": (lambda a, c: _rope(c).get("rope_theta"), lambda v, a, c: {"rope_theta": v}),
    "rope_theta_local": (lambda a, c: _rope(c, "sliding_attention").get("rope_theta")
                         if "sliding_attention" in (getattr(c, "rope_parameters", None) or {}) else None,
                         lambda v, a, c: {}),
    "rope_dims": (_rotated, lambda v, a, c: {
        "partial_rotary_factor": v / (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])}),
    "gpt2_ffn": (lambda a, c: getattr(c, "n_inner", None) or 4 * c.n_embd, lambda v, a, c: {"n_inner": v}),
}
ROPE_KEYS = ("rope_theta", "partial_rotary_factor")  # the config fields that live in rope_parameters


def hparams(adapter: Adapter, config) -> dict[str, int | float | bool]:
    """The architecture's GGUF keys (with its prefix) and their values for `config`; a value the config leaves
    unset is left out (llama.cpp's default stands)."""
    out = {}
    for key, attr in adapter.gguf_hparams:
        value = DERIVED[attr][0](adapter, config) if attr in DERIVED else getattr(config, attr, None)
        if value is not None:
            out[f"{adapter.gguf_arch}.{key}"] = value
    return out


def config_kwargs(adapter: Adapter, fields: dict) -> dict:
    """The config fields a GGUF's hyper-parameters give (the inverse of `hparams`): plain attributes first, then
    the derived ones, which may need them (the rotated width is a fraction of the head's)."""
    kw, rope = {}, {}
    prefix = adapter.gguf_arch + "."
    given = {attr: fields[prefix + key] for key, attr in adapter.gguf_hparams if prefix + key in fields}
    kw.update((attr, v) for attr, v in given.items() if attr not in DERIVED)
    for attr in DERIVED:  # in DERIVED's order: the head width before the rotated width, a fraction of it
        if attr in given:
            for name, value in DERIVED[attr][1](given[attr], adapter, kw).items():
                (rope if name in ROPE_KEYS else kw)[name] = value
    if rope:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, **rope}
    return kw


def rope_tensors(adapter: Adapter, config) -> dict[str, np.ndarray]:
    """The rotary tables llama.cpp reads as tensors: Llama 3's frequency factors (`rope_freqs`: each rotary
    frequency divided by its scaled one, as transformers' `llama3` rope computes them). Refuse a rotary scaling
    GGUF has no exact form for here."""
    rope = _rope(config)
    kind = rope.get("rope_type", "default")
    if kind in ("default", "linear"):
        return {}
    if kind != "llama3":
        raise GGUFMetaError(f"the model's rotary scaling {kind!r} has no GGUF export in mixq (default, linear and "
                            "llama3 have)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = _rotated(adapter, config)
    base = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return {"rope_freqs.weight": (base / scaled.double().numpy()).astype(np.float32)}


def write_hparams(writer, adapter: Adapter, config) -> None:
    """The architecture's hyper-parameters and rotary scaling into a GGUFWriter."""
    import gguf

    for key, value in hparams(adapter, config).items():
        kind = (gguf.GGUFValueType.BOOL if isinstance(value, bool) else gguf.GGUFValueType.UINT32
                if isinstance(value, int) else gguf.GGUFValueType.FLOAT32)
        writer.add_key_value(key, value, kind)
    rope = _rope(config)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


# a tokenizer.json pre-tokenizer's split → llama.cpp's name for it (`tokenizer.ggml.pre`), from transformers' own
# table of the splits of the names it reads; the first name of each split is llama.cpp's usual one
PREFERRED = ("llama-bpe", "qwen2", "gpt-4o", "tekken")


def pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name of a byte-level tokenizer's pre-tokenizer, or None where mixq cannot tell it."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(splits) == 1:
        regex = (splits[0].get("pattern") or {}).get("Regex")
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex]
        return next((n for n in PREFERRED if n in names), names[0] if names else None)
    return None


def _tokenizer_kind(folder: Path) -> tuple[str, dict]:
    """("gpt2" or "llama", tokenizer.json) of a Hugging Face folder's tokenizer: llama.cpp's model for it. Refuse
    one GGUF export does not write."""
    path = folder / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GGUFMetaError(f"GGUF export writes the tokenizer from {path}, which cannot be read: "
                            f"{str(e).splitlines()[0][:200]}") from e
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama", tj
    if model.get("type") == "BPE" and (tj.get("decoder") or {}).get("type") == "ByteLevel":
        if not model.get("merges"):
            raise GGUFMetaError(f"{path} is a byte-level BPE without merges, which llama.cpp does not read")
        return "gpt2", tj
    raise GGUFMetaError(f"{path} holds a {model.get('type')} tokenizer: GGUF export writes byte-level BPE and "
                        "SentencePiece BPE (byte fallback) tokenizers only")


def check_tokenizer(folder: Path) -> None:
    """Refuse, before any work, a tokenizer GGUF export cannot write."""
    _tokenizer_kind(folder)


def write_vocab(writer, folder: Path, n_vocab: int) -> None:
    """The tokenizer of Hugging Face folder `folder` (its tokenizer.json) into a GGUFWriter, padded with unused
    tokens to the model's `n_vocab` rows, with its merges, special tokens and chat template (gguf-py's
    SpecialVocab): a byte-level BPE as llama.cpp's "gpt2" model, a SentencePiece BPE (byte fallback) as its
    "llama" model. Refuse any other."""
    import gguf

    kind, tj = _tokenizer_kind(folder)
    if kind == "gpt2":
        tokens, scores, types = _byte_level_tokens(folder, n_vocab)
        writer.add_tokenizer_model("gpt2")
        pre = pre_tokenizer(tj)
        if pre is None:
            log.warning("mixq does not know llama.cpp's name for this tokenizer's pre-tokenizer: the GGUF names none "
                        "and llama.cpp splits text with its default one")
        else:
            writer.add_tokenizer_pre(pre)
    else:
        vocab = gguf.vocab.LlamaHfVocab(folder)
        tokens, scores, types = map(list, zip(*vocab.all_tokens()))
        tokens = [t.decode("utf-8") for t in tokens]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    if len(tokens) > n_vocab:
        raise GGUFMetaError(f"the tokenizer in {folder} has {len(tokens)} tokens, more than the model's {n_vocab} "
                            "embedding rows")
    pad = n_vocab - len(tokens)
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), n_vocab)])
    if scores is not None:
        writer.add_token_scores(list(scores) + [-1000.0] * pad)
    writer.add_token_types(list(types) + [gguf.TokenType.UNUSED] * pad)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def _byte_level_tokens(folder: Path, n_vocab: int):
    """(tokens, None, types) of a byte-level BPE, id by id, as convert_hf_to_gguf lists them: added special
    tokens as control tokens, other added tokens as user-defined ones, ids the tokenizer leaves free as unused."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(min(n_vocab, max(by_id) + 1)):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, None, types  # (no scores: a BPE's merges order it)
