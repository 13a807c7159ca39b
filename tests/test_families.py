"""Every model family on a tiny random-weight config from transformers' own config class: the whole flow from a
Hugging Face folder (profile → allocate → apply → save → load gives the packed model's logits exactly), the
tables, rotate where it is exact and a one-line refusal where it is not, and the statistics each family can give."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.config import Calibration, QuantizeConfig
from mixq.models import ADAPTERS, adapter_for, load_model
from mixq.plan import Budget
from mixq.transforms import apply_transforms

from mixq.testing import FAMILIES, family_config, make_byte_tokenizer, make_family_model, write_tiny_gguf

from conftest import random_ids

runner = CliRunner()
ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def test_every_family_has_an_adapter():
    assert set(FAMILIES) <= set(ADAPTERS)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, byte_tokenizer):
    """Each family's tiny model saved as a Hugging Face folder with a byte-level tokenizer."""
    def make(family: str):
        path = tmp_path_factory.mktemp(family)
        make_family_model(family).save_pretrained(path, safe_serialization=True)
        byte_tokenizer.save_pretrained(path)
        return path
    return make


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_the_whole_flow_from_a_folder(family, family_dirs, text_file, tmp_path):
    """Quantize a family's folder at 4 bits (its tables too), save, load: the loaded model computes the packed
    model's very logits; eval, generate and report read the folder."""
    folder = family_dirs(family)
    float_model, _, _ = load_model(str(folder))
    config = QuantizeConfig(budget=Budget(bits=4.5), tables=True, calibration=Calibration(str(text_file), 4),
                            eval_windows=0)
    result = mixq.quantize(str(folder), None, config, out=tmp_path / "q")
    adapter = adapter_for(float_model)
    assert set(result.plan.layers) == set(adapter.layer_names(float_model) + adapter.tables(float_model))
    ids = random_ids(3, 32, seed=10)
    packed, loaded = _logits(result.model, ids), _logits(mixq.load(tmp_path / "q"), ids)
    assert torch.equal(loaded, packed)
    assert (packed - _logits(float_model, ids)).abs().max() > 1e-4  # quantized, and not by nothing
    meta = json.loads((tmp_path / "q" / "mixq.json").read_text())
    assert 3.0 < meta["bpw"] <= 4.5
    for args in (["eval", tmp_path / "q", "--text", text_file, "--windows", 1],
                 ["generate", tmp_path / "q", "--prompt", "the model", "--max-new-tokens", 3],
                 ["report", tmp_path / "q"]):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, (args[0], res.output)


@pytest.mark.parametrize("family", ROTATABLE)
def test_rotate_keeps_the_float_model(family):
    model = make_family_model(family)
    ids = random_ids(2, 32)
    want = _logits(model, ids)
    apply_transforms(model, ("rotate",))
    got = _logits(model, ids)
    assert (model.get_submodule(adapter_for(model).embed).weight - make_family_model(family).get_submodule(
        adapter_for(model).embed).weight).abs().max() > 1e-2  # turned
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(ROTATABLE)))
@pytest.mark.parametrize("transform", ["rotate", "resq"])
def test_a_transform_that_cannot_be_exact_is_refused_in_one_line(family, transform, byte_tokenizer, text_file):
    model = make_family_model(family)
    config = QuantizeConfig(budget=Budget(bits=4), transforms=(transform,), calibration=Calibration(str(text_file), 2),
                            eval_windows=0)
    with pytest.raises(ValueError, match=f"{transform} is not exact for {family}") as e:
        mixq.quantize(model, byte_tokenizer, config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_statistics_where_the_family_has_a_value_projection(family, byte_tokenizer, text_file):
    """aespa takes the attention Hessians through the family's own attention function (Gemma's soft cap and
    sliding windows included); a family that fuses the values with q and k refuses it in one line."""
    from mixq.chain import Chain

    model = make_family_model(family)
    config = QuantizeConfig(budget=Budget(bits=4), solvers=(Chain.parse("aespa"),),
                            calibration=Calibration(str(text_file), 2), eval_windows=0)
    if adapter_for(model).value is None:
        with pytest.raises(ValueError, match=f"{family} fuses its value projection") as e:
            mixq.quantize(model, byte_tokenizer, config)
        assert "\n" not in str(e.value)
        return
    from mixq.capture import ATTENTION, block_inputs, capture_block

    adapter = adapter_for(model)
    x, calls = block_inputs(model, adapter, random_ids(2, 32))
    value = f"{adapter.blocks}.1.{adapter.value}"
    _, stats = capture_block(adapter.block_list(model)[1], adapter, f"{adapter.blocks}.1", x, calls[1],
                             {value: frozenset({ATTENTION})})
    heads = stats[value].attention
    assert heads.shape[0] == model.config.num_key_value_heads and torch.isfinite(heads).all()
    assert mixq.quantize(model, byte_tokenizer, config).plan.layers


def _quantize_cli(model, out, text_file):
    return runner.invoke(app, [str(a) for a in ("quantize", "--model", model, "--bits", 4, "--out", out,
                                               "--eval-windows", 0, "--calib", text_file, "--calib-windows", 2)])


def _one_line_refusal(res, phrase: str, out) -> None:
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert phrase in text, text
    assert not out.exists()


def test_an_unsupported_architecture_is_named_with_the_supported_ones(tmp_path, text_file, byte_tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=256)).save_pretrained(tmp_path / "m")
    byte_tokenizer.save_pretrained(tmp_path / "m")
    res = _quantize_cli(tmp_path / "m", tmp_path / "q", text_file)
    _one_line_refusal(res, "unsupported architecture 'bloom'", tmp_path / "q")
    assert "gemma3_text, gpt2, gpt_neox" in " ".join(res.output.split())


def test_weights_that_do_not_match_the_config_are_refused(family_dirs, tmp_path, text_file):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(family_dirs("gpt2"), folder)
    state = load_file(folder / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _one_line_refusal(_quantize_cli(folder, tmp_path / "q", text_file), "do not match its config.json",
                      tmp_path / "q")
    cfg = json.loads((folder / "config.json").read_text())
    shutil.copy(family_dirs("gpt2") / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    _one_line_refusal(_quantize_cli(folder, tmp_path / "q", text_file), "cannot load model", tmp_path / "q")


def test_a_folder_without_its_tokenizer_is_refused(family_dirs, tmp_path, text_file):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(family_dirs("phi3"), folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    _one_line_refusal(_quantize_cli(folder, tmp_path / "q", text_file), "cannot load model", tmp_path / "q")


def _write_gguf(path, arch: str, fill) -> None:
    """A GGUF of `arch` at `path` holding what fill(writer) adds."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_of_an_unmapped_architecture_is_refused(tmp_path, text_file):
    import numpy as np

    def fill(w):
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _write_gguf(tmp_path / "m.gguf", "mamba", fill)
    res = _quantize_cli(tmp_path / "m.gguf", tmp_path / "q", text_file)
    _one_line_refusal(res, "architecture 'mamba', which mixq does not map", tmp_path / "q")


def _quantize_and_export_gguf(model, tmp_path, text_file):
    """Quantize `model` at 5 bits among ggml types into tmp_path/q and export it to tmp_path/q.gguf."""
    out = tmp_path / "q"
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", model, "--bits", 5, "--out", out,
                                               "--compatible", "gguf", "--eval-windows", 0, "--calib", text_file,
                                               "--calib-windows", 2)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(out), "--to", "gguf", str(tmp_path / "q.gguf")])
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_gguf_quantizes_and_exports_back_to_the_same_logits(family, text_file, tmp_path):
    """A GGUF of the family loads as the float model; quantized among the ggml types it exports as a GGUF of its
    architecture that reads back to the saved model's logits (in transformers; GPT-NeoX's, which transformers does
    not read, in mixq's own reader)."""
    source = tmp_path / f"{family}.gguf"
    write_tiny_gguf(make_family_model(family), source)
    float_model, _, _ = load_model(str(source))
    assert adapter_for(float_model).family in (family, "llama")  # transformers reads Mistral GGUFs as Llama
    out = _quantize_and_export_gguf(source, tmp_path, text_file)
    theirs, _, _ = load_model(str(tmp_path / "q.gguf"))
    ids = random_ids(2, 24)
    a, b, f = _logits(mixq.load(out), ids), _logits(theirs, ids), _logits(float_model, ids)
    assert (a - f).abs().max() > 1e-3  # really quantized
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_folder_exports_to_gguf_with_the_same_logits(family, tmp_path, text_file):
    """Quantized from a Hugging Face folder, a family exports as a GGUF of its architecture whose hyper-parameters
    come from the config and tokenizer from tokenizer.json: it reads back to the saved model's logits, and its
    tokenizer to the folder's ids."""
    folder = tmp_path / "m"
    make_family_model(family).save_pretrained(folder)
    tokenizer = make_byte_tokenizer(merge=True)
    tokenizer.pad_token = tokenizer.eos_token  # (transformers gives a Phi-3 GGUF without one id 32000)
    tokenizer.save_pretrained(folder)
    out = _quantize_and_export_gguf(folder, tmp_path, text_file)
    theirs, their_tokenizer, _ = load_model(str(tmp_path / "q.gguf"))
    ids = random_ids(2, 24)
    torch.testing.assert_close(_logits(theirs, ids), _logits(mixq.load(out), ids), atol=1e-4, rtol=1e-4)
    text = "the model  of the budget, 42 bits"
    assert their_tokenizer(text).input_ids == tokenizer(text).input_ids


def test_a_sentencepiece_tokenizer_exports_to_gguf_as_llama_cpp_s_llama_model(tmp_path, text_file):
    """A byte-fallback BPE (Llama 2's kind of tokenizer.json) is written as llama.cpp's "llama" tokenizer, padded
    to the model's rows with unused tokens: read back, it gives the folder's ids and the model its logits."""
    import gguf

    from mixq.testing import make_sentencepiece_tokenizer

    folder = tmp_path / "m"
    config = family_config("llama")
    config.vocab_size = 320  # the tokenizer's 291 tokens and 29 unused rows
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = make_sentencepiece_tokenizer()
    tokenizer.save_pretrained(folder)
    out = _quantize_and_export_gguf(folder, tmp_path, text_file)
    fields = gguf.GGUFReader(tmp_path / "q.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == 320 and types[291:] == [gguf.TokenType.UNUSED] * 29 and types[3] == gguf.TokenType.BYTE
    theirs, their_tokenizer, _ = load_model(str(tmp_path / "q.gguf"))
    text = "the of 42 Zeta"
    assert their_tokenizer(text).input_ids == tokenizer(text).input_ids
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(theirs, ids), _logits(mixq.load(out), ids), atol=1e-4, rtol=1e-4)


def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from mixq.models.gguf_meta import pre_tokenizer

    def split(regex):
        return {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": regex}},
                                                       {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]}}) == "smollm"  # SmolLM's
    assert pre_tokenizer({"pre_tokenizer": split(GGUF_PRE_TOKENIZER_SPLITS["llama3"])}) == "llama-bpe"
    assert pre_tokenizer({"pre_tokenizer": split(GGUF_PRE_TOKENIZER_SPLITS["qwen2"])}) == "qwen2"
    assert pre_tokenizer({"pre_tokenizer": split(r"\p{L}+")}) is None  # unknown: none named, llama.cpp's default


def test_gguf_export_refuses_a_tokenizer_it_cannot_write_before_any_work(tmp_path, text_file):
    from mixq.testing import make_wordpiece_tokenizer

    folder = tmp_path / "m"
    make_family_model("llama").save_pretrained(folder)
    make_wordpiece_tokenizer().save_pretrained(folder)
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", folder, "--bits", 5, "--out", tmp_path / "q",
                                               "--compatible", "gguf", "--calib", text_file)])
    _one_line_refusal(res, "holds a WordPiece tokenizer: GGUF export writes byte-level BPE", tmp_path / "q")
    from mixq.models.gguf_meta import GGUFMetaError, check_tokenizer

    make_byte_tokenizer().save_pretrained(tmp_path / "bytes")  # a BPE without merges
    with pytest.raises(GGUFMetaError, match="without merges, which llama.cpp does not read"):
        check_tokenizer(tmp_path / "bytes")


def test_gguf_export_writes_llama3_rotary_factors_and_refuses_scalings_it_cannot(tmp_path):
    """Llama 3's scaled rotary frequencies are llama.cpp's base frequencies divided by `rope_freqs`: the factors
    mixq writes give back the frequencies transformers' model uses."""
    from mixq.models.gguf_meta import GGUFMetaError, rope_tensors

    config = family_config("llama")
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = LlamaForCausalLM(config)
    factors = torch.from_numpy(rope_tensors(ADAPTERS["llama"], config)["rope_freqs.weight"]).double()
    dim = config.hidden_size // config.num_attention_heads
    base = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    assert (factors > 1).any() and (factors == 1).any()  # the scaling reaches some frequencies, not all
    torch.testing.assert_close(base / factors, model.model.rotary_emb.inv_freq.double(), rtol=1e-6, atol=0)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 64}
    with pytest.raises(GGUFMetaError, match="rotary scaling 'yarn' has no GGUF export"):
        rope_tensors(ADAPTERS["llama"], config)


def test_a_neox_gguf_with_a_missing_tensor_is_refused_in_one_line(tmp_path, text_file):
    import gguf

    source = tmp_path / "full.gguf"
    write_tiny_gguf(make_family_model("gpt_neox"), source)
    reader = gguf.GGUFReader(source)

    def fill(w):  # the same file, less one tensor
        for key, f in reader.fields.items():
            if not key.startswith("GGUF.") and key != "general.architecture":
                sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
                w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
        for t in reader.tensors:
            if t.name != "blk.1.ffn_down.weight":
                w.add_tensor(t.name, t.data)
    _write_gguf(tmp_path / "cut.gguf", "gptneox", fill)
    res = _quantize_cli(tmp_path / "cut.gguf", tmp_path / "q", text_file)
    _one_line_refusal(res, "cut.gguf: the weights hold no gpt_neox.layers.1.mlp.dense_4h_to_h.weight", tmp_path / "q")


CT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox")


@pytest.mark.parametrize("family", CT_FAMILIES)
def test_a_family_exports_to_compressed_tensors_with_the_same_logits(family, family_dirs, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", family_dirs(family), "--bits", 4, "--out", out,
                                               "--compatible", "compressed-tensors", "--eval-windows", 0, "--calib",
                                               text_file, "--calib-windows", 2)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(out), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert res.exit_code == 0, res.output
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = random_ids(2, 24)
    torch.testing.assert_close(_logits(theirs, ids), _logits(mixq.load(out), ids), atol=1e-5, rtol=1e-5)


def test_gpt2_refuses_compressed_tensors_in_one_line(family_dirs, text_file, tmp_path):
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", family_dirs("gpt2"), "--bits", 4, "--out",
                                               tmp_path / "q", "--compatible", "compressed-tensors", "--eval-windows",
                                               0, "--calib", text_file, "--calib-windows", 2)])
    _one_line_refusal(res, "Conv1D", tmp_path / "q")


def test_a_bias_that_the_family_config_cannot_declare_is_refused_by_compressed_tensors(family_dirs, text_file,
                                                                                       tmp_path):
    """Phi-3's linears have no bias flag: a bias-compensated layer loads in mixq but has no compressed-tensors
    form."""
    from mixq.formats import QuantSpec
    from mixq.plan import Candidate, Plan

    model = make_family_model("phi3")
    plan = Plan({n: Candidate(QuantSpec.of(4, 32, "sym"), "gptq+bias") for n in adapter_for(model).layer_names(model)})
    (tmp_path / "plan.json").write_text(plan.to_json())
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", family_dirs("phi3"), "--plan",
                                               tmp_path / "plan.json", "--out", tmp_path / "q", "--eval-windows", 0,
                                               "--calib", text_file, "--calib-windows", 2)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(tmp_path / "q"), "--to", "compressed-tensors", str(tmp_path / "ct")])
    _one_line_refusal(res, "that no field of its config (Phi3Config) can declare", tmp_path / "ct")


def test_a_gemma_of_640_wide_rows_keeps_the_groups_that_divide_them(byte_tokenizer, text_file):
    """Gemma 3 270M's width: the 192-weight groups of the default menu do not divide 640, so those layers do
    without them; the 1280-wide down projection keeps them only where they fit (1280 = 6·192 + 128: not)."""
    from mixq.chain import Chain

    model = make_family_model("gemma3_text", width=640)
    config = QuantizeConfig(budget=Budget(bits=4), solvers=(Chain.parse("rtn"),), estimator="hessian",
                            calibration=Calibration(str(text_file), 2), eval_windows=0)
    result = mixq.quantize(model, byte_tokenizer, config)
    groups = {lp.name: {c.spec.group_size for c in lp.candidates} for lp in result.profile.layers}
    assert groups["model.layers.0.self_attn.q_proj"] == {32, 64}
    assert groups["model.layers.0.mlp.down_proj"] == {32, 64}
    assert all(c.spec.fits(result.model.get_submodule(n).in_features) for n, c in result.plan.layers.items())


def test_the_estimator_a_run_names_none_of_is_the_model_s_own():
    from mixq.pipeline import estimator_of
    from mixq.sensitivity import DEFAULT_ESTIMATOR

    config = QuantizeConfig(budget=Budget(bits=3))
    assert estimator_of(make_family_model("llama"), config) == DEFAULT_ESTIMATOR
    assert estimator_of(make_family_model("bert"), config) == "kl"
    assert estimator_of(make_family_model("bert"), QuantizeConfig(budget=Budget(bits=3), estimator="hessian")) == \
        "hessian"
