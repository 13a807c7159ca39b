"""transforms.resq and split rows (QuantSpec.high): the split format's bits are what QuantLinear stores, the split
solve lowers the output error where the leading columns carry the input's energy (and beats storing them at 8 bits
without moving their error into the rest), the turned model computes what the float model computes with its
stream's energy in its first channels, and a resq-quantized model saves, loads and refuses the exports that cannot
store it."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.capture import residual_covariance
from mixq.formats import HIGH, QuantizedTensor, QuantSpec, quantize
from mixq.models import adapter_for, load_model
from mixq.plan import Candidate
from mixq.runtime.qlinear import QuantLinear
from mixq.solvers import output_error, solve
from mixq.transforms import apply_transforms
from mixq.transforms.resq import high_columns, split_candidates

from conftest import random_ids

runner = CliRunner()


def test_split_spec_accounting_and_json():
    s = QuantSpec(3, 64, high=64)
    assert s.fits(576) and not s.fits(544) and not QuantSpec(3, 64, high=72).fits(576)
    assert s.storage_bits(10, 576) == HIGH.storage_bits(10, 64) + QuantSpec(3, 64).storage_bits(10, 512)
    assert s.name == "int3-g64-asym-hi64"
    assert QuantSpec.from_dict(s.to_dict()) == s and "high" not in QuantSpec(3, 64).to_dict()
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantSpec(3, 64, high=12)
    from mixq.export.compressed import ct_args
    from mixq.export.gguf import ggml_type

    for plain in (QuantSpec.of(4, 32, "sym"), QuantSpec.of(8, 32, "sym")):  # ggml and compressed-tensors types…
        assert ggml_type(plain) is not None and ct_args(plain) is not None
        split = QuantSpec(plain.bits, 32, symmetric=True, high=64)
        assert ggml_type(split) is None and ct_args(split) is None  # … but not once split


def test_high_columns_keep_groups_whole():
    cands = [Candidate(QuantSpec.of(3, g), "gptq") for g in (0, 32, 64, 96, 192)]
    assert [high_columns(576, c) for c in cands] == [72, 64, 64, 0, 0]
    split = split_candidates(cands, 576)
    assert [c.spec.high for c in split] == [72, 64, 64, 0, 0] and all(c.spec.fits(576) for c in split)


def _energetic_leading_columns(seed=0):
    """A weight and a Hessian whose first 16 of 128 input channels carry most of the energy (as after resq)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(4096, 128, generator=g) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=g))
    x[:, :16] *= 8
    return w, x.T @ x / len(x)


@pytest.mark.parametrize("solver", ["rtn", "gptq-act", "gptq-act+comq"])
def test_split_rows_lower_the_output_error(solver):
    w, h = _energetic_leading_columns()
    whole = float(output_error(w, solve(solver, w, h, QuantSpec.of(2, 0)).dequantize(), h).sum())
    split = solve(solver, w, h, QuantSpec(2, 0, high=16))
    assert split.high is not None and split.codes.shape == (32, 112)
    err = float(output_error(w, split.dequantize(), h).sum())
    assert err < 0.3 * whole, (err, whole)
    # the rest absorbs the 8-bit columns' error (GPTQ's update): better than solving it on its own weights
    hi = quantize(w[:, :16], HIGH)
    alone = solve(solver, w[:, 16:], h[16:, 16:], QuantSpec.of(2, 0))
    naive = torch.cat([hi.dequantize(), alone.dequantize()], 1)
    assert err <= float(output_error(w, naive, h).sum()) * (1 + 1e-4)


def test_split_quant_linear_matches_the_reference_and_round_trips():
    w, h = _energetic_leading_columns(1)
    qt = solve("gptq-act", w, h, QuantSpec(3, 16, high=16))
    m = QuantLinear.from_quantized(qt, torch.randn(32))
    x = torch.randn(3, 20, 128)
    ref = x @ qt.dequantize().T + m.bias
    for rows in (x[:1, :2], x):  # the kernel's qgemv (few rows) and its dequant + matmul
        torch.testing.assert_close(m(rows), ref[: rows.shape[0], : rows.shape[1]], atol=1e-4, rtol=1e-4)
    stored = sum(b.numel() * b.element_size() * 8 for b in m.buffers())
    assert stored == qt.spec.storage_bits(32, 128)
    again = QuantLinear(128, 32, qt.spec, bias=True)
    again.load_state_dict(m.state_dict())
    torch.testing.assert_close(again(x), m(x), atol=0, rtol=0)
    assert torch.equal(again.quantized(torch.tensor([3, 5])).dequantize(), qt.dequantize()[[3, 5]])
    with pytest.raises(ValueError, match="holds its high columns"):
        QuantizedTensor(qt.codes, qt.scales, qt.zeros, qt.spec)


def test_resq_keeps_the_function_and_orders_the_stream(tiny_model):
    ids = random_ids(4, 32, seed=3)
    with torch.no_grad():
        ref = tiny_model(ids).logits
    turned = copy.deepcopy(tiny_model)
    with pytest.raises(ValueError, match="needs calibration"):
        apply_transforms(turned, ["resq"])
    apply_transforms(turned, ["resq"], ids)
    with torch.no_grad():
        torch.testing.assert_close(turned(ids).logits, ref, atol=2e-5, rtol=1e-5)
    energy = torch.diagonal(residual_covariance(turned, adapter_for(turned), ids))
    # the first 8 channels hold the top principal components: the most energy; the rest is spread evenly
    assert energy[:8].min() > energy[8:].max(), energy
    before = torch.diagonal(residual_covariance(tiny_model, adapter_for(tiny_model), ids))
    assert energy[:8].sum() > before.sort(descending=True).values[:8].sum()


@pytest.fixture(scope="module")
def resq_dir(tmp_path_factory, tiny_tokenizer, text_file):
    """A tiny Llama 256 wide (its rows split for the default groups of 32: 32 | 224), quantized by the CLI."""
    from conftest import tiny_config
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("resq")
    config = tiny_config()
    config.hidden_size = config.intermediate_size = 256
    torch.manual_seed(6)
    LlamaForCausalLM(config).eval().save_pretrained(root / "m", safe_serialization=True)
    tiny_tokenizer.save_pretrained(root / "m")
    res = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", root / "m", "--bits", 3, "--solver", "resq+gptq-act", "--calib", text_file,
        "--calib-windows", 4, "--eval-windows", 0, "--float-tables", "--out", root / "q")])
    assert res.exit_code == 0, res.output
    return root


def test_resq_model_saves_loads_and_counts_its_bits(resq_dir):
    out = resq_dir / "q"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["transforms"] == ["resq"]
    highs = {n: c.get("high", 0) for n, c in plan["layers"].items()}
    readers = [n for n in highs if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    assert all(highs[n] == 0 for n in highs if n not in readers)  # only the stream's readers split
    ours = mixq.load(out)
    split = [n for n in readers if highs[n]]
    assert split, highs  # the allocation took some split candidates
    m = ours.get_submodule(split[0])
    assert isinstance(m.high, QuantLinear) and m.high.in_features == highs[split[0]]
    bpw = json.loads((out / "mixq.json").read_text())["bpw"]  # counted from the saved buffers
    assert 2.9 < bpw <= 3.0, bpw
    float_model = load_model(str(resq_dir / "m"))[0]
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        a, f = ours(ids).logits, float_model(ids).logits
    assert (a - f).abs().max() < 0.5 * f.abs().max()  # 3 bits: near the float model, in the original basis


def test_exports_refuse_split_rows(resq_dir, tmp_path):
    out = resq_dir / "q"
    res = runner.invoke(app, ["export", str(out), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert res.exit_code == 2 and "hi" in res.output and "does not store" in res.output
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("flag", [["--bits", "3", "--gguf-compatible"],
                                  ["--bits", "3", "--compressed-tensors-compatible"], ["--latency", "0.5x"]])
def test_resq_refuses_what_cannot_store_or_time_split_rows(flag, tiny_hf_dir, text_file, tmp_path):
    res = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", tiny_hf_dir, *flag, "--solver", "resq+gptq-act", "--calib", text_file,
        "--out", tmp_path / "q")])
    assert res.exit_code == 2 and "resq splits rows" in res.output, res.output
    assert not (tmp_path / "q").exists()
