"""transforms.rotate: the rotated model computes what the float model computes, its block linears quantize with
less damage where a few input channels dominate, and a rotated, quantized model saves, loads and exports to GGUF
as a plain (untied) Llama."""
from __future__ import annotations

import copy
import json

import gguf
import pytest
import torch
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.formats import QuantSpec
from mixq.models import adapter_for, load_model
from mixq.apply import apply_plan, pack_model
from mixq.chain import Chain
from mixq.plan import Candidate, Plan
from mixq.transforms import apply_transforms
from mixq.transforms.rotate import hadamard, random_rotation

from conftest import make_tiny_model, random_ids

runner = CliRunner()


@pytest.mark.parametrize("n", [2, 12, 24, 64, 576, 1536])
def test_hadamard_is_orthogonal(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), atol=0, rtol=0)


def test_random_rotation_is_orthogonal_with_or_without_a_hadamard_matrix():
    assert hadamard(40) is None and hadamard(9) is None
    for n in (64, 40):
        q = random_rotation(n, torch.Generator().manual_seed(0))
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    a, b = (random_rotation(64, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.equal(a, b)  # the signs are random


def _with_norm_scales_and_biases():
    """The tiny Llama with biases on every block linear and norm scales far from 1 (what folding must carry)."""
    from conftest import tiny_config
    from transformers import LlamaForCausalLM

    config = tiny_config()
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(0.3, 2.0)
    return model


@pytest.mark.parametrize("make", [make_tiny_model, _with_norm_scales_and_biases])
def test_rotation_keeps_the_function(make):
    model = make()
    ids = random_ids(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
        rotated = copy.deepcopy(model)
        apply_transforms(rotated, ["rotate"])
        out = rotated(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert not rotated.config.tie_word_embeddings
    for name, p in rotated.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p))  # every norm's scale folded into its readers
    moved = model.model.layers[0].self_attn.q_proj.weight
    assert (rotated.model.layers[0].self_attn.q_proj.weight - moved).abs().max() > 0.01  # really rotated


def _with_outlier_channels():
    """The tiny Llama whose linears that read the residual stream weigh 4 of its 64 channels 12 × more: the
    outliers that a rotation spreads across all channels."""
    model = make_tiny_model()
    with torch.no_grad():
        for block in model.model.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.mlp.gate_proj,
                        block.mlp.up_proj):
                lin.weight[:, :4] *= 12
    return model


def test_rotation_lowers_the_damage_of_outlier_channels():
    model = _with_outlier_channels()
    ids, evals = random_ids(8, 32, seed=1), random_ids(4, 32, seed=2)
    with torch.no_grad():
        ref = model(evals).logits
    errors = {}
    for transforms in ((), ("rotate",)):
        q = copy.deepcopy(model)
        apply_transforms(q, transforms)
        pack_model(q, apply_plan(q, ids, Plan({n: Candidate(QuantSpec.of(3, 64), "rtn")
                                               for n in adapter_for(q).layer_names(q)})))
        with torch.no_grad():
            errors[transforms] = float(((q(evals).logits - ref) ** 2).mean())
    assert errors[("rotate",)] < 0.75 * errors[()], errors  # 0.61 ×


def test_chain_transforms_come_first():
    assert Chain.parse("rotate+gptq-act+comq") == Chain("gptq-act", ("comq",), ("rotate",))
    assert Chain.parse("gptq") == Chain("gptq")
    with pytest.raises(ValueError, match="names no solver"):
        Chain.parse("rotate")
    with pytest.raises(ValueError, match="comes first"):
        Chain.parse("gptq+rotate")


@pytest.fixture(scope="module")
def rotated_dir(tmp_path_factory, text_file):
    """The tiny GGUF Llama (tied head), rotated and quantized to ggml types by the CLI."""
    from conftest import tiny_config, write_tiny_gguf
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("rot")
    torch.manual_seed(4)
    write_tiny_gguf(LlamaForCausalLM(tiny_config()).eval(), root / "m.gguf")
    res = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", root / "m.gguf", "--bits", 6, "--gguf-compatible", "--solver", "rotate+gptq-act",
        "--calib", text_file, "--calib-windows", 2, "--eval-windows", 0, "--out", root / "q")])
    assert res.exit_code == 0, res.output
    return root


def test_rotated_model_saves_loads_and_exports(rotated_dir):
    out, source = rotated_dir / "q", rotated_dir / "m.gguf"
    plan = json.loads((out / "plan.json").read_text())
    tables = {n: plan["layers"].pop(n)["solver"] for n in ("model.embed_tokens", "lm_head")}  # untied by rotate
    assert tables == {"model.embed_tokens": "rtn", "lm_head": "rtn"}
    assert plan["transforms"] == ["rotate"] and {c["solver"] for c in plan["layers"].values()} == {"gptq-act"}
    ours = mixq.load(out)
    assert not ours.config.tie_word_embeddings
    assert ours.lm_head.qweight.data_ptr() != ours.model.embed_tokens.qweight.data_ptr()  # (quantized, ggml types)
    float_model, _, _ = load_model(str(source))
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        a, f = ours(ids).logits, float_model(ids).logits
    assert (a - f).abs().max() < 0.1 * f.abs().max()  # 6 bits: close to the float model, in the original basis
    res = runner.invoke(app, ["export", str(out), "--to", "gguf", str(rotated_dir / "q.gguf")])
    assert res.exit_code == 0, res.output
    assert "output.weight" in {t.name for t in gguf.GGUFReader(rotated_dir / "q.gguf").tensors}
    theirs, _, _ = load_model(str(rotated_dir / "q.gguf"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, a, atol=1e-3, rtol=1e-3)


def test_transforms_and_a_plan_conflict(rotated_dir, tmp_path, text_file):
    res = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", rotated_dir / "m.gguf", "--plan", rotated_dir / "q" / "plan.json", "--solver",
        "rotate+gptq", "--calib", text_file, "--out", tmp_path / "x")])
    assert res.exit_code == 2 and "transforms the plan names" in res.output
    bad = json.loads((rotated_dir / "q" / "plan.json").read_text()) | {"transforms": ["spin"]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", rotated_dir / "m.gguf", "--plan", tmp_path / "bad.json", "--calib", text_file,
        "--out", tmp_path / "y")])
    assert res.exit_code == 2 and "unknown transform 'spin'" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_rotated_profile_allocates_rotated_plans(rotated_dir, tmp_path):
    """The saved profile was measured on the rotated model: a plan allocated from it again names the rotation."""
    assert json.loads((rotated_dir / "q" / "profile.json").read_text())["transforms"] == ["rotate"]
    res = runner.invoke(app, ["allocate", str(rotated_dir / "q" / "profile.json"), "--bits", "5",
                              "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p.json").read_text())["transforms"] == ["rotate"]


def test_a_profile_naming_an_unknown_transform_fails_cleanly(rotated_dir, tmp_path):
    prof = json.loads((rotated_dir / "q" / "profile.json").read_text()) | {"transforms": ["spin"]}
    (tmp_path / "prof.json").write_text(json.dumps(prof))
    res = runner.invoke(app, ["allocate", str(tmp_path / "prof.json"), "--bits", "5", "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 2 and "unknown transform 'spin'" in res.output
    assert not (tmp_path / "p.json").exists()
