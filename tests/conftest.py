"""Shared fixtures: a tiny random-weight Llama (2 blocks, width 64) that runs in well under a second, calibration
ids without a tokenizer, and the same model saved as a Hugging Face folder with a tiny word-level tokenizer."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from mixq.testing import VOCAB, WORDS, make_byte_tokenizer, tiny_config, word_text, write_tiny_gguf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local: never wait on a hub

# The machines that run this suite have 2 cores shared with other work: one intra-op thread avoids the
# oversubscription that made the tiny-model tests 50x slower (0.4 s against 25 s for a profile) when the
# other core was busy.
torch.set_num_threads(1)

settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


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


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, _tiny_model_pristine):
    """The tiny model as a GGUF file (a byte-level tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    write_tiny_gguf(_tiny_model_pristine, path)
    return path
