"""Tiny random-weight models of every family mixq supports, built from transformers' own config classes, with a
byte-level tokenizer and a GGUF writer for them: what the test suite and benchmarks/families.py run the whole flow
on (a few MB each, seconds to quantize)."""
from __future__ import annotations

import random

import torch

VOCAB = 256
WORDS = ("the of and to in is it for on with as by at from this that be are was not or an which can one all "
         "if will but has its more when there their into only other some what so than then these two may new "
         "also use each such must any way first over after most made how many where those well both while "
         "model weight layer block token bits group scale zero code budget plan profile").split()

def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def family_config(family: str, width: int = 64):
    """A tiny config of `family` from transformers' own config class: 2 blocks, `width` wide, 4 heads (2 key-value
    heads where the family has them), the tiny vocabulary."""
    import transformers as T

    common = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                  pad_token_id=None)
    llama_like = dict(common, hidden_size=width, intermediate_size=2 * width, num_key_value_heads=2,
                      max_position_embeddings=512)
    make = {
        "bert": lambda: T.BertConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128),
        "llama": lambda: tiny_config() if width == 64 else T.LlamaConfig(**llama_like, tie_word_embeddings=True),
        "mistral": lambda: T.MistralConfig(**llama_like, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**llama_like, tie_word_embeddings=True),  # biases on q, k, v
        "qwen3": lambda: T.Qwen3Config(**llama_like),  # q/k norms; heads of 128 (GGUF cannot say otherwise)
        "gemma2": lambda: T.Gemma2Config(**llama_like, head_dim=width // 4, sliding_window=8),
        "gemma3_text": lambda: T.Gemma3TextConfig(**llama_like, head_dim=width // 4, sliding_window=8),
        "phi3": lambda: T.Phi3Config(**llama_like),
        "gpt_neox": lambda: T.GPTNeoXConfig(**dict(common, hidden_size=width, intermediate_size=2 * width,
                                                   max_position_embeddings=512, rotary_pct=0.5)),
        "gpt2": lambda: T.GPT2Config(n_embd=width, n_layer=2, n_head=4, vocab_size=VOCAB,
                                     bos_token_id=1, eos_token_id=2),
    }
    return make[family]()


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2")  # decoders
ENCODERS = ("bert",)


def make_family_model(family: str, seed: int = 0, width: int = 64):
    """A tiny random-weight model of `family` (float32, eval mode, seeded), its linears given random biases where
    the family has them (zero at init) and its norms random scales, so that folding them is tested."""
    from .models import adapter_for

    config = family_config(family, width)
    torch.manual_seed(seed)
    model = adapter_for(config).job.model_class.from_config(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm scales and shifts, biases: away from their init
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def make_byte_tokenizer(merge: bool = False):
    """A byte-level tokenizer: id b is byte b (GPT-2's byte-to-character table, no merges), so every family's own
    tokenizer class reads it back from a folder as it is (Qwen2's rebuilds a word-level one into nothing), and any
    text tokenizes; the bos and eos tokens are bytes 1 and 2, as the tiny configs say. With `merge`, id 255 is two
    spaces instead, the one merge (as in write_tiny_gguf's: llama.cpp and transformers read no BPE without
    merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    if merge:
        del vocab[chars[255]]
        vocab[chars[32] * 2] = 255
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(chars[32], chars[32])] if merge else []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=chars[1], eos_token=chars[2])


def write_tiny_gguf(model, path) -> None:
    """A tiny float model of any family as a GGUF of its architecture (F32 tensors named by gguf-py's tables, rows
    in ggml's order and norms as GGUF stores them, the hyper-parameters convert_hf_to_gguf writes: the adapter's
    facts) and a byte-level tokenizer: ids 0–254 are one byte each, 255 two spaces, so any text without byte 255
    tokenizes."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from mixq.models import adapter_for
    from mixq.models.gguf_meta import write_hparams

    adapter = adapter_for(model)
    adapter.prepare(model)
    c, arch = model.config, adapter.gguf_arch
    if arch is None:
        raise ValueError(f"mixq has no GGUF form of {adapter.family}")
    w = gguf.GGUFWriter(str(path), arch)
    write_hparams(w, adapter, c)
    byte_chars = bytes_to_unicode()
    space = byte_chars[ord(" ")]
    tokens = [byte_chars[b] for b in range(255)] + [space * 2]  # byte 255 gives way to one merge (llama.cpp
    w.add_tokenizer_model("gpt2")                                 # refuses a BPE vocabulary without merges)
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([f"{space} {space}"])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.eos_token_id)  # (a family's default padding id may lie past the tiny vocabulary)
    names = adapter.gguf_names(model)
    for hf, p in model.named_parameters():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        data = p.detach().numpy()
        rows = adapter.gguf_rows(model, hf, data.shape[0])
        data = data[rows] if rows is not None else data
        if name.endswith("norm.weight"):
            data = data + adapter.gguf_norm_offset
        w.add_tensor(name, np.ascontiguousarray(data.astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_sentencepiece_tokenizer():
    """A SentencePiece-style BPE as Llama 2's tokenizer.json has it (byte fallback, "▁" for spaces, <s> first):
    <unk>, <s>, </s>, the 256 byte tokens <0x00>–<0xFF>, "▁", a–z and five merges (291 tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "o"), ("▁o", "f")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_wordpiece_tokenizer():
    """A BERT-style tokenizer over WORDS: WordPiece, [CLS] … [SEP] around every text, [PAD] to pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(WORDS)) + ["."])}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def write_sentence_folder(model, tokenizer, path, normalize: bool = True) -> None:
    """An encoder as a sentence-transformers folder: the model and tokenizer, mean pooling (1_Pooling), an L2
    normalisation (2_Normalize) where asked, sequences of at most 128 tokens."""
    import json
    from pathlib import Path

    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))


def word_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(0, n_words, 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + " .")
    return "\n".join(lines) + "\n"


def quantize_tiny(model_dir, text_file, out, bits: float, formats: str):
    """`mixq quantize` of a tiny model among `formats` alone (tables float, two calibration windows, no
    evaluation): the CLI's result, for a test to check."""
    from typer.testing import CliRunner

    from .cli import app

    return CliRunner().invoke(app, ["quantize", "--model", str(model_dir), "--calib", str(text_file), "--eval-windows",
                                    "0", "--calib-windows", "2", "--bits", str(bits), "--formats", formats,
                                    "--float-tables", "--out", str(out)])


def check_packed_layer(layer, deq, tmp_path, inputs=(1, 3, 20)) -> None:
    """A packed layer of `deq`'s reference weights (rows × cols): its products with `inputs` rows of x are x · Ŵᵀ
    (plus its bias), its state dict read back into a new layer of its spec is the same class and weights, and a
    subset of its rows dequantizes to the reference's rows (a test's check of a QuantLinear layout)."""
    import torch

    from .runtime.qlinear import QuantLinear

    rows, cols = deq.shape
    bias = 0 if layer.bias is None else layer.bias
    for n in inputs:
        x = torch.randn(n, cols)
        torch.testing.assert_close(layer(x), x @ deq.T + bias, rtol=1e-4, atol=1e-4)
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    back = QuantLinear(cols, rows, layer.spec, bias=layer.bias is not None)
    back.load_state_dict(torch.load(tmp_path / "layer.pt"))
    assert type(back) is type(layer) and torch.equal(back.weight_float(), deq)
    sub = torch.tensor([0, rows - 1])
    assert torch.equal(layer.quantized(sub).dequantize(), deq[sub])


def tiny_run_layers(model_dir, text_file, out, formats: str, layout: type):
    """`quantize_tiny` at 3.0 bits among `formats`: (its plan's layers, the loaded model's `layout` layers), each
    of those checked to compute x · Ŵᵀ."""
    import torch

    import json

    from .io import load

    res = quantize_tiny(model_dir, text_file, out, 3.0, formats)
    assert res.exit_code == 0, res.output
    layers = json.loads((out / "plan.json").read_text())["layers"]
    linears = [m for m in load(out).modules() if isinstance(m, layout)]
    for m in linears:
        x = torch.randn(2, m.in_features)
        torch.testing.assert_close(m(x), x @ m.weight_float().T, rtol=1e-4, atol=1e-4)
    return layers, linears
