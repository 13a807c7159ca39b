"""Shared fixtures: a tiny random-weight Llama (2 blocks, width 64) that runs in well under a second, calibration
ids without a tokenizer, and the same model saved as a Hugging Face folder with a tiny word-level tokenizer."""
from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local: never wait on a hub

# The machines that run this suite have 2 cores shared with other work: one intra-op thread avoids the
# oversubscription that made the tiny-model tests 50x slower (0.4 s against 25 s for a profile) when the
# other core was busy.
torch.set_num_threads(1)

settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

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
        "llama": lambda: tiny_config() if width == 64 else T.LlamaConfig(**llama_like, tie_word_embeddings=True),
        "mistral": lambda: T.MistralConfig(**llama_like, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**llama_like, tie_word_embeddings=True),  # biases on q, k, v
        "qwen3": lambda: T.Qwen3Config(**llama_like, head_dim=width // 4),  # q/k norms
        "gemma2": lambda: T.Gemma2Config(**llama_like, head_dim=width // 4, sliding_window=8),
        "gemma3_text": lambda: T.Gemma3TextConfig(**llama_like, head_dim=width // 4, sliding_window=8,
                                                  layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: T.Phi3Config(**llama_like),
        "gpt_neox": lambda: T.GPTNeoXConfig(**dict(common, hidden_size=width, intermediate_size=2 * width,
                                                   max_position_embeddings=512, rotary_pct=0.5)),
        "gpt2": lambda: T.GPT2Config(n_embd=width, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512,
                                     bos_token_id=1, eos_token_id=2),
    }
    return make[family]()


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2")


def make_family_model(family: str, seed: int = 0, width: int = 64):
    """A tiny random-weight model of `family` (float32, eval mode, seeded), its linears given random biases where
    the family has them (zero at init) and its norms random scales, so that folding them is tested."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, width)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm scales and shifts, biases: away from their init
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def make_tiny_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).float().eval()
    return model


@pytest.fixture(scope="session")
def _tiny_model_pristine():
    return make_tiny_model()


@pytest.fixture
def tiny_model(_tiny_model_pristine):
    """A fresh copy of the tiny random Llama (float32, eval mode, seeded): tests may modify it in place."""
    return copy.deepcopy(_tiny_model_pristine)


def first_block_capture(model, ids: torch.Tensor):
    """Run capture on block 0 next to the full model: (hidden states, block-0 inputs, stats, block-0 outputs,
    block 0); the callers check capture against the model's own hidden states."""
    from mixq.capture import block_inputs, hessians, run_block
    from mixq.models import adapter_for

    adapter = adapter_for(model)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    x, calls = block_inputs(model, adapter, ids)
    block = adapter.block_list(model)[0]
    with hessians(block, adapter) as stats:
        y = run_block(block, x, calls[0])
    return hidden, x, stats, y, block


def apply_uniform(model, ids: torch.Tensor, solver: str, spec) -> dict:
    """Every block linear of a copy of `model` quantized to `spec` by `solver`, packed: {layer: QuantizedTensor}."""
    from mixq.models import adapter_for
    from mixq.apply import apply_plan, pack_model
    from mixq.plan import Candidate, Plan

    model = copy.deepcopy(model)
    qt = apply_plan(model, ids, Plan({n: Candidate(spec, solver) for n in adapter_for(model).layer_names(model)}))
    pack_model(model, qt)
    return qt


def random_ids(windows: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (windows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def calib_ids() -> torch.Tensor:
    """8 windows × 32 tokens of random ids: calibration without a tokenizer."""
    return random_ids(8, 32, seed=1)


@pytest.fixture
def eval_ids() -> torch.Tensor:
    return random_ids(4, 32, seed=2)


def word_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(0, n_words, 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + " .")
    return "\n".join(lines) + "\n"


def make_tokenizer():
    """A word-level tokenizer over WORDS (fewer ids than the tiny model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
    tk.train_from_iterator([" ".join(WORDS) + " ."], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert len(tok) <= VOCAB
    return tok


def make_byte_tokenizer():
    """A byte-level tokenizer: id b is byte b (GPT-2's byte-to-character table, no merges), so every family's own
    tokenizer class reads it back from a folder as it is (Qwen2's rebuilds a word-level one into nothing), and any
    text tokenizes; the bos and eos tokens are bytes 1 and 2, as the tiny configs say."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=chars[1], eos_token=chars[2])


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, _tiny_model_pristine, tiny_tokenizer):
    """The tiny model saved as a Hugging Face folder (safetensors) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-hf")
    _tiny_model_pristine.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """~600 words of text the tiny tokenizer knows: for --calib and --text."""
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(word_text(600, seed=3), encoding="utf-8")
    return path


def write_tiny_gguf(model, path) -> None:
    """The tiny model as a llama GGUF (F32 tensors, q/k rows in ggml's rotary order) with a byte-level tokenizer:
    ids 0–254 are one byte each, 255 two spaces, so any text without byte 255 tokenizes."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from mixq.models.adapters import rotary_rows

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
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
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for hf, p in model.named_parameters():
        name = names.get_name(hf, try_suffixes=(".weight",))
        data = p.detach().numpy()
        if name.split(".")[-2] in heads:
            data = data[rotary_rows(data.shape[0], heads[name.split(".")[-2]])]
        w.add_tensor(name, np.ascontiguousarray(data.astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, _tiny_model_pristine):
    """The tiny model as a GGUF file (a byte-level tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    write_tiny_gguf(_tiny_model_pristine, path)
    return path
