"""GGUF export: ggml blocks that dequantize (by the gguf package's reference) to exactly mixq's weights, and a
file that transformers' GGUF loader reads back into the very model mixq saved."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.export import ExportError
from mixq.export.gguf import encode_blocks, export_gguf, ggml_type, gguf_specs
from mixq.formats import QuantSpec, quantize
from mixq.models import load_model
from mixq.plan import Candidate, Plan

from conftest import make_tiny_model

runner = CliRunner()


@pytest.mark.parametrize("spec", gguf_specs(), ids=lambda s: ggml_type(s))
def test_blocks_dequantize_to_mixq_weights(spec):
    torch.manual_seed(0)
    cols = 512 if spec.super_block else 96
    w = torch.randn(6, cols) * torch.logspace(-2, 1, cols)  # groups of very different ranges
    qt = quantize(w, spec)
    blocks = encode_blocks(qt)
    kind = getattr(gguf.GGMLQuantizationType, ggml_type(spec))
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    assert blocks.shape == (6, cols // per_block * block_bytes)
    assert blocks.size * 8 == spec.storage_bits(6, cols)  # mixq's accounting is ggml's bytes
    theirs = gguf.quants.dequantize(blocks, kind)
    np.testing.assert_array_equal(theirs, qt.dequantize().numpy())


def test_only_32_groups_with_fp16_scales_are_ggml_types():
    assert ggml_type(QuantSpec.of(4, 32, "sym")) == "Q4_0"
    assert ggml_type(QuantSpec.of(4, 64, "sym")) is None
    assert ggml_type(QuantSpec.of(4, 32, "min", 6)) is None
    assert ggml_type(QuantSpec.of(3, 32, "sym")) is None
    assert ggml_type(QuantSpec.of(4, 32, "int")) is None
    assert ggml_type(QuantSpec.of(3, 16, "sym", 6, 256)) == "Q3_K"
    assert ggml_type(QuantSpec.of(3, 16, "sym", 6)) is None  # one step per row is not Q3_K
    assert ggml_type(QuantSpec.of(4, 32, "iq4nl")) == "IQ4_NL" and ggml_type(QuantSpec.of(4, 64, "nf")) is None
    assert ggml_type(QuantSpec.of(4, 32, "iq4nl", 6, 256)) == "IQ4_XS"
    assert ggml_type(QuantSpec.of(4, 32, "kmin", 6, 256)) == "Q4_K"
    assert ggml_type(QuantSpec.of(4, 32, "min", 6, 256)) is None  # a signed minimum code is not Q4_K's
    with pytest.raises(ExportError, match="not a ggml type"):
        encode_blocks(quantize(torch.randn(2, 64), QuantSpec.of(3, 32, "sym")))


def _quantize_with_plan(source, plan: Plan, text_file, out):
    plan_file = out.with_suffix(".plan.json")
    plan_file.write_text(plan.to_json())
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", source, "--plan", plan_file, "--out", out,
                                               "--eval-windows", 0, "--calib", text_file, "--calib-windows", 2)])
    assert res.exit_code == 0, res.output


def _every_type_plan(model, bias: bool = False, super_types: tuple[str, ...] = ()) -> Plan:
    """Every block linear, the ggml types that fit it in turn (q and k, whose rows are permuted, get several; the
    256-wide down projections the k-quants, or the ggml types `super_types` in turn); with `bias`, every other layer
    bias-compensated (q and k included; a grid with a solver of its own gets that one)."""
    from mixq.config import filled
    from mixq.models import adapter_for

    plan = Plan({})
    for i, name in enumerate(adapter_for(model).layer_names(model)):
        specs = [s for s in gguf_specs() if s.fits(model.get_submodule(name).in_features)]
        k_quants = [s for s in specs if s.super_block]
        if super_types:
            k_quants = [s for t in super_types for s in k_quants if ggml_type(s) == t]
        solver = "gptq+bias" if bias and i % 2 == 0 else "gptq"
        pick = k_quants[i // 7 * 3 % len(k_quants)] if super_types == () and k_quants else \
            k_quants[i // 7 % len(k_quants)] if k_quants else specs[i % len(specs)]
        plan.layers[name] = filled(pick, solver)
    return plan


def test_gguf_export_writes_compensated_biases_in_ggml_row_order(wide_gguf, text_file, tmp_path):
    """llama.cpp's Llama reads optional biases of every block linear: the export writes each added bias as F32,
    q and k rows in the rotary order their weights are written in."""
    from mixq.models.adapters import rotary_rows

    float_model, _, _ = load_model(str(wide_gguf))
    plan = _every_type_plan(float_model, bias=True)
    _quantize_with_plan(wide_gguf, plan, text_file, tmp_path / "q")
    ours = mixq.load(tmp_path / "q")
    export_gguf(ours, wide_gguf, tmp_path / "q.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    written = 0
    for name, cand in plan.layers.items():
        block, kind = name.split(".")[2], name.split(".", 3)[3]
        key = f"blk.{block}.{names[kind]}.bias"
        assert (key in tensors) == cand.bias
        if cand.bias:
            bias = ours.get_submodule(name).bias.detach().numpy()
            if kind in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = ours.config.num_attention_heads if "q_proj" in kind else ours.config.num_key_value_heads
                bias = bias[rotary_rows(len(bias), heads)]
            assert tensors[key].tensor_type.name == "F32"
            np.testing.assert_array_equal(np.asarray(tensors[key].data), bias)
            written += 1
    assert written == sum(c.bias for c in plan.layers.values()) > 0


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """The tiny Llama with 256-wide down-projection rows (k-quants fit them), as a GGUF."""
    from mixq.testing import tiny_config, write_tiny_gguf
    from transformers import LlamaForCausalLM

    config = tiny_config()
    config.intermediate_size = 256
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("wide") / "wide.gguf"
    write_tiny_gguf(LlamaForCausalLM(config).eval(), path)
    return path


@pytest.mark.parametrize("super_types", [(), ("IQ2_S", "IQ3_S")])
def test_exported_gguf_loads_back_as_the_saved_model(wide_gguf, text_file, tmp_path, super_types):
    float_model, _, _ = load_model(str(wide_gguf))
    out = tmp_path / "q"
    _quantize_with_plan(wide_gguf, _every_type_plan(float_model, super_types=super_types), text_file, out)
    res = runner.invoke(app, ["export", str(out), "--to", "gguf", str(tmp_path / "q.gguf")])
    assert res.exit_code == 0, res.output
    assert all(k in res.output for k in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
                                         *(super_types or ("Q2_K", "Q5_K"))))
    ours = mixq.load(out)
    theirs, _, _ = load_model(str(tmp_path / "q.gguf"))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, f = ours(ids).logits, theirs(ids).logits, float_model(ids).logits
    assert (a - f).abs().max() > 1e-3  # really quantized
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["general.quantized_by"].contents() == "mixq"
    ppl = {}
    for target in (out, tmp_path / "q.gguf"):  # `mixq eval` reads the export as it reads the folder
        res = runner.invoke(app, ["eval", str(target), "--text", str(text_file), "--windows", "2"])
        assert res.exit_code == 0, res.output
        ppl[target] = json.loads(res.stdout.strip().splitlines()[-1])["ppl"]
    assert ppl[out] == pytest.approx(ppl[tmp_path / "q.gguf"], rel=1e-4)


def test_export_names_a_missing_source(tiny_gguf, text_file, tmp_path):
    import shutil

    source = tmp_path / "moved.gguf"
    shutil.copy(tiny_gguf, source)
    float_model, _, _ = load_model(str(source))
    _quantize_with_plan(source, _every_type_plan(float_model), text_file, tmp_path / "q")
    source.unlink()
    res = runner.invoke(app, ["export", str(tmp_path / "q"), "--to", "gguf", str(tmp_path / "q.gguf")])
    assert res.exit_code == 2 and "is gone" in res.output and not (tmp_path / "q.gguf").exists()


def test_export_refuses_formats_without_a_ggml_type(tiny_gguf, text_file, tmp_path):
    float_model, _, _ = load_model(str(tiny_gguf))
    plan = _every_type_plan(float_model)
    first = next(iter(plan.layers))
    plan.layers[first] = Candidate(QuantSpec.of(3, 32, "min", 6), "gptq")
    _quantize_with_plan(tiny_gguf, plan, text_file, tmp_path / "q")
    with pytest.raises(ExportError, match=f"{first} is int3-g32-min-dq6.*--compatible gguf"):
        export_gguf(mixq.load(tmp_path / "q"), tiny_gguf, tmp_path / "q.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".q.gguf*"))


def test_export_cli_errors(tmp_path, text_file):
    from mixq.testing import make_byte_tokenizer

    res = runner.invoke(app, ["export", str(tmp_path / "missing"), "--to", "gguf", str(tmp_path / "x.gguf")])
    assert res.exit_code == 2 and "not a mixq model folder" in res.output
    folder, out = tmp_path / "m", tmp_path / "hf"
    make_tiny_model().save_pretrained(folder)
    make_byte_tokenizer(merge=True).save_pretrained(folder)
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", folder, "--bits", 5, "--out", out,
                                               "--eval-windows", 0, "--calib", text_file, "--calib-windows", 2,
                                               "--gguf-compatible")])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "mixq.json").read_text())
    assert all(ggml_type(Candidate.from_dict(c).spec) for c in json.loads((out / "plan.json").read_text())
               ["layers"].values()), meta
    res = runner.invoke(app, ["export", str(out), "--to", "gguf", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.output
    (out / "tokenizer.json").write_text("{")  # a saved folder whose tokenizer was damaged
    res = runner.invoke(app, ["export", str(out), "--to", "gguf", str(tmp_path / "x.gguf")])
    assert res.exit_code == 2 and "tokenizer.json, which cannot be read" in res.output, res.output
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
    res = runner.invoke(app, ["export", str(out), "--to", "onnx", str(tmp_path / "x.gguf")])
    assert res.exit_code == 2 and "gguf" in res.output
    assert not list(tmp_path.glob("*.gguf"))


# --- compressed-tensors ------------------------------------------------------------------------------------------

def test_compressed_tensors_export_loads_in_transformers(tiny_hf_dir, text_file, tmp_path):
    """Every width, 32 / 64 groups and whole rows, one config group per format; transformers (with the
    compressed-tensors package) computes the saved model's very logits, and `mixq eval` reads the folder."""
    from transformers import AutoModelForCausalLM

    from mixq.export.compressed import ct_args
    from mixq.models import adapter_for

    float_model, _, _ = load_model(str(tiny_hf_dir))
    specs = [QuantSpec.of(b, g, "sym") for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 0)]
    names = adapter_for(float_model).layer_names(float_model)
    plan = Plan({n: Candidate(specs[7 * i % len(specs)], "gptq+bias" if "mlp" in n and i % 2 else "gptq")
                 for i, n in enumerate(names)})  # biases on some MLP linears: the config switches them on for all
    assert all(ct_args(c.spec) is not None for c in plan.layers.values())
    assert any(c.bias for c in plan.layers.values())
    _quantize_with_plan(tiny_hf_dir, plan, text_file, tmp_path / "q")
    res = runner.invoke(app, ["export", str(tmp_path / "q"), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert res.exit_code == 0, res.output
    hf_config = json.loads((tmp_path / "ct" / "config.json").read_text())
    config = hf_config["quantization_config"]
    assert config["format"] == "pack-quantized" and len(config["config_groups"]) == len(names)
    assert hf_config["mlp_bias"] and not hf_config["attention_bias"]
    ours = mixq.load(tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, f = ours(ids).logits, theirs(ids).logits, float_model(ids).logits
    assert (a - f).abs().max() > 1e-3
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    res = runner.invoke(app, ["eval", str(tmp_path / "ct"), "--text", str(text_file), "--windows", "2"])
    assert res.exit_code == 0, res.output


def test_compressed_tensors_refuses_what_it_cannot_store(tiny_hf_dir, text_file, tmp_path):
    from mixq.export.compressed import ct_args

    assert ct_args(QuantSpec.of(4, 32, "min")) is None and ct_args(QuantSpec.of(4, 32, "sym", 6)) is None
    out = tmp_path / "q"
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", tiny_hf_dir, "--bits", 3, "--out", out,
                                               "--eval-windows", 0, "--calib", text_file, "--calib-windows", 2)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(out), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert res.exit_code == 2 and "--compatible compressed-tensors" in " ".join(res.output.split())
    assert not (tmp_path / "ct").exists() and not list(tmp_path.glob(".ct*"))
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", tiny_hf_dir, "--bits", 3, "--out", out,
                                               "--eval-windows", 0, "--calib", text_file, "--calib-windows", 2,
                                               "--compressed-tensors-compatible")])
    assert res.exit_code == 0, res.output
    specs = [Candidate.from_dict(c).spec for c in json.loads((out / "plan.json").read_text())["layers"].values()]
    assert all(ct_args(s) is not None for s in specs)
    res = runner.invoke(app, ["export", str(out), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(out), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert res.exit_code == 2 and "exists" in res.output


@pytest.mark.parametrize("super_types", [(), ("IQ2_S", "IQ3_S")])
def test_llama_cpp_runs_the_export_as_mixq_does(wide_gguf, text_file, tmp_path, super_types):
    """llama.cpp itself (the llama-cpp-python bindings, when installed: benchmarks/gguf_export.py says how) loads
    the export, compensated biases included, and scores the same tokens within 1 % of mixq's perplexity (it
    multiplies with 8-bit activations)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import math

    import torch.nn.functional as F

    float_model, _, _ = load_model(str(wide_gguf))
    _quantize_with_plan(wide_gguf, _every_type_plan(float_model, bias=True, super_types=super_types), text_file,
                        tmp_path / "q")
    export_gguf(mixq.load(tmp_path / "q"), wide_gguf, tmp_path / "q.gguf")
    ids = list(text_file.read_bytes()[:128])  # the byte-level vocabulary: one id per byte
    llm = llama_cpp.Llama(str(tmp_path / "q.gguf"), n_ctx=128, n_batch=128, logits_all=True, n_threads=1,
                          verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids) - 1], dtype=np.float32))
    with torch.no_grad():
        ours = mixq.load(tmp_path / "q")(torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(ids[1:])
    ppl = [math.exp(F.cross_entropy(z, target).item()) for z in (ours, theirs)]
    assert ppl[1] == pytest.approx(ppl[0], rel=0.01)
