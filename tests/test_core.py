"""The core that solvers, models and exporters plug into: registries that name what they hold, a chain parsed once
into a typed value, one typed config that round-trips through JSON, the library entry point, and files written
before this core (tests/data/before-core: a tiny model's plan, profile and saved folder from commit fd467f5) that
still load and give the same model."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mixq
from mixq.chain import Chain, check_list, parse_list
from mixq.config import Calibration, QuantizeConfig
from mixq.export import EXPORTERS
from mixq.formats import QuantSpec
from mixq.plan import Budget, Candidate, Plan
from mixq.profile import Profile
from mixq.sensitivity import ESTIMATORS, get_estimator
from mixq.solvers import SOLVERS
from mixq.transforms import TRANSFORMS

from test_cli import _error, invoke

BEFORE = Path(__file__).parent / "data" / "before-core"


@pytest.mark.parametrize("registry, lookup", [
    (SOLVERS, lambda n: Chain.parse(n)), (TRANSFORMS, lambda n: TRANSFORMS.lookup(n)),
    (EXPORTERS, lambda n: EXPORTERS.lookup(n)), (ESTIMATORS, get_estimator)])
def test_an_unknown_name_is_a_one_line_error_listing_the_registered(registry, lookup):
    with pytest.raises(ValueError) as e:
        lookup("nope")
    message = str(e.value)
    assert "\n" not in message and "unknown" in message and "'nope'" in message
    assert all(name in message for name in registry)


@pytest.mark.parametrize("text, chain", [
    ("gptq", Chain("gptq")),
    ("gptq-act+comq+bias", Chain("gptq-act", ("comq", "bias"))),
    ("rotate+aespa+comq", Chain("aespa", ("comq",), ("rotate",))),
    ("resq+rtn+bias", Chain("rtn", ("bias",), ("resq",))),
])
def test_a_chain_parses_once_and_writes_back_the_same_text(text, chain):
    parsed = Chain.parse(text)
    assert parsed == chain and str(parsed) == text and Chain.parse(str(parsed)) == parsed
    assert parsed.layer == replace(chain, transforms=())


@pytest.mark.parametrize("text, phrase", [
    ("", "a solver chain"), ("rotate", "names no solver"), ("bias", "refines another solver's result"),
    ("gptq+rotate", "comes first"), ("gptq+clip", "a solver of its own"), ("gptq+comq+comq", "twice"),
    ("gptq+nope", "unknown refiner 'nope'"), ("nope", "unknown solver 'nope'"),
])
def test_a_bad_chain_fails_in_one_line(text, phrase):
    with pytest.raises(ValueError, match=phrase) as e:
        Chain.parse(text)
    assert "\n" not in str(e.value)


def test_what_a_chain_declares():
    chain = Chain.parse("oac+comq+bias")
    assert chain.bias and not Chain.parse("oac+comq").bias
    assert chain.profiled() == Chain("gptq-act", ("bias",))  # oac is judged as gptq-act, comq's descent left out
    assert chain.left_out() == {"comq"} and Chain.parse("comq").left_out() == {"comq"}
    assert chain.needs == {"input", "output_hessian"}
    assert Chain.parse("rtn").needs == frozenset() and Chain.parse("taskclip").needs == {"input", "judge"}


def test_a_solver_list_is_parsed_and_checked():
    assert parse_list("rotate+gptq-act,rotate+gptq-act+bias") == (
        ("rotate",), (Chain("gptq-act"), Chain("gptq-act", ("bias",))))
    with pytest.raises(ValueError, match="share one whole-model transform"):
        parse_list("rotate+gptq,gptq")
    with pytest.raises(ValueError, match=r"profiles alike \(as gptq-act\)"):
        check_list([Chain.parse("gptq-act+comq"), Chain.parse("aespa+comq")])
    with pytest.raises(ValueError, match="all end in it or none"):
        check_list([Chain.parse("gptq-act+comq"), Chain.parse("gptq")])


def test_a_candidate_holds_a_chain_and_writes_its_text():
    c = Candidate(QuantSpec.of(3, 64, "min", 6), "gptq-act+comq")
    assert c.solver == Chain("gptq-act", ("comq",)) and c.name == "gptq-act+comq:int3-g64-min-dq6"
    assert Candidate.from_dict(c.to_dict()) == c and c.to_dict()["solver"] == "gptq-act+comq"
    with pytest.raises(ValueError, match="transforms change the whole model"):
        Candidate(QuantSpec(3), "rotate+gptq")


def _config() -> QuantizeConfig:
    return QuantizeConfig.from_solver(
        "rotate+gptq-act+comq,rotate+gptq-act+comq+bias", budget=Budget(bits=2.75), tables=True, estimator="fisher",
        damp=0.05, refine=2, eval_windows=3, formats=(QuantSpec.of(3, 32, "min", 6), QuantSpec(4, 0, True)),
        calibration=Calibration("words.txt", 4, 2, seed=1))


def test_the_config_round_trips_through_json_with_a_version():
    config = _config()
    d = json.loads(config.to_json())
    assert d["version"] == 1 and d["solvers"] == ["gptq-act+comq", "gptq-act+comq+bias"]
    assert d["transforms"] == ["rotate"] and d["budget"] == {"bits": 2.75, "table_bits": 6.5}
    assert QuantizeConfig.from_json(config.to_json()) == config
    planned = QuantizeConfig(plan=Plan.from_json((BEFORE / "plan.json").read_text()))
    assert QuantizeConfig.from_dict(planned.to_dict()) == planned
    assert planned.applied_transforms == ("rotate",)
    with pytest.raises(ValueError, match="unknown config keys"):
        QuantizeConfig.from_dict({**d, "dampening": 0.1})
    with pytest.raises(ValueError, match="config version 2"):
        QuantizeConfig.from_dict({**d, "version": 2})


def test_the_config_makes_its_candidates_once_solver_after_solver():
    config = _config()
    cands = config.candidates()
    assert [str(c.solver) for c in cands] == ["gptq-act+comq"] * 2 + ["gptq-act+comq+bias"] * 2
    assert [c.spec for c in cands[:2]] == list(config.formats)
    gguf = QuantizeConfig(budget=Budget(bits=4.5), compatible="gguf")
    assert {c.spec for c in gguf.candidates()} == set(EXPORTERS["gguf"]().specs())


@pytest.mark.parametrize("kwargs, phrase", [
    ({}, "exactly one of a budget"),
    ({"budget": Budget(bits=3), "plan": Plan()}, "exactly one of a budget"),
    ({"budget": Budget(bits=3), "damp": 0}, "--damp"),
    ({"budget": Budget(bits=3), "refine": -1}, "rounds ≥ 0"),
    ({"budget": Budget(bits=3), "estimator": "nope"}, "unknown sensitivity estimator 'nope'"),
    ({"budget": Budget(bits=3), "compatible": "onnx"}, "unknown export format 'onnx'"),
    ({"budget": Budget(bits=3), "compatible": "compressed-tensors", "tables": True}, "--bits or --size only"),
    ({"budget": Budget(of_float=0.5), "tables": True}, "keeps the embedding table and the head float"),
    ({"budget": Budget(bits=3), "transforms": ("resq",), "compatible": "gguf"}, "splits rows"),
    ({"budget": Budget(bits=3), "cost_table": "c.json"}, "goes with --latency"),
    ({"budget": Budget(bits=3), "solvers": ("rotate+gptq",)}, "per-layer chains"),
    ({"plan": Plan(transforms=("rotate",)), "transforms": ("rotate",)}, "transforms the plan names"),
])
def test_a_bad_config_fails_in_one_line(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase) as e:
        QuantizeConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_a_plan_and_a_profile_written_before_the_core_load_and_write_back_the_same():
    text = (BEFORE / "plan.json").read_text()
    plan = Plan.from_json(text)
    assert plan.transforms == ("rotate",) and json.loads(plan.to_json()) == json.loads(text)
    assert {type(c.solver) for c in plan.layers.values()} == {Chain}
    profile = Profile.from_json((BEFORE / "profile.json").read_text())
    assert {str(c.solver) for lp in profile.layers for c in lp.candidates} == \
        {"gptq-act+comq", "gptq-act+comq+bias", "rtn"}
    assert json.loads(profile.to_json()) == json.loads((BEFORE / "profile.json").read_text())


def test_a_folder_saved_before_the_core_loads():
    model = mixq.load(BEFORE)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_the_library_entry_point_applies_an_old_plan_to_the_very_model_it_made(
        tiny_model, tiny_tokenizer, text_file, tmp_path):
    """mixq.quantize on a loaded model: the plan of fd467f5's run (rotate, a tied table at 4 bits, per-layer
    chains) applied again to the same model and calibration gives the same packed tensors, bit for bit."""
    from safetensors.torch import load_file

    plan = Plan.from_json((BEFORE / "plan.json").read_text())
    config = QuantizeConfig(plan=plan, calibration=Calibration(str(text_file), 4), eval_windows=0)
    result = mixq.quantize(tiny_model, tiny_tokenizer, config, out=tmp_path / "q")
    assert result.plan == plan and result.model is tiny_model
    old, new = load_file(BEFORE / "model.safetensors"), load_file(tmp_path / "q" / "model.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    meta = json.loads((tmp_path / "q" / "mixq.json").read_text())
    assert QuantizeConfig.from_dict(meta["config"]) == config


def test_the_library_entry_point_checks_its_inputs_before_loading(tiny_hf_dir, tmp_path, monkeypatch):
    import mixq.models

    def boom(*a, **k):
        raise AssertionError("the model loaded before its inputs were checked")
    monkeypatch.setattr(mixq.models, "load_model", boom)
    config = QuantizeConfig(budget=Budget(bits=3), calibration=Calibration(str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match="model not found"):
        mixq.quantize(tmp_path / "no-model", None, config)
    with pytest.raises(ValueError, match="text file not found"):
        mixq.quantize(tiny_hf_dir, None, config)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no mixq model"):
        mixq.quantize(tiny_hf_dir, None, QuantizeConfig(budget=Budget(bits=3)), out=tmp_path / "taken")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        mixq.quantize(torch.nn.Linear(2, 2), None, QuantizeConfig(budget=Budget(bits=3)))


def test_compatible_takes_an_exporter_name_and_the_old_flags_stay_aliases(tiny_gguf, text_file, tmp_path):
    common = ["--model", tiny_gguf, "--bits", 4.6, "--calib", text_file, "--calib-windows", 2, "--eval-windows", 0]
    plans = {}
    for flags in (["--compatible", "gguf"], ["--gguf-compatible"]):
        out = tmp_path / flags[0].strip("-")
        res = invoke("quantize", *common, *flags, "--out", out)
        assert res.exit_code == 0, res.output
        plans[flags[0]] = (out / "plan.json").read_text()
        assert json.loads((out / "mixq.json").read_text())["config"]["compatible"] == "gguf"
    assert plans["--compatible"] == plans["--gguf-compatible"]
    res = invoke("quantize", *common, "--compatible", "onnx", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "unknown export format 'onnx'; known: compressed-tensors, gguf" in _error(res.stderr)
    res = invoke("quantize", *common, "--compatible", "gguf", "--compressed-tensors-compatible",
                 "--out", tmp_path / "x")
    assert res.exit_code == 2 and "choose one" in _error(res.stderr)
    res = invoke("export", tmp_path / "compatible", "--to", "onnx", tmp_path / "x.onnx")
    assert res.exit_code == 2 and "known: compressed-tensors, gguf" in _error(res.stderr)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.onnx").exists()


def test_the_help_is_generated_from_the_registries():
    res = invoke("quantize", "--help")
    text = " ".join(res.stdout.split())
    for name in [*SOLVERS, *TRANSFORMS, *EXPORTERS, *ESTIMATORS]:
        assert name in text, name


def test_model_knowledge_lives_in_models_and_no_stage_names_a_solver():
    """The architecture rules as a check: no layer name or model type outside mixq/models/, and none of the files
    that order a run names a solver (they read what solvers declare)."""
    import re

    root = Path(mixq.__file__).parent
    model_names = re.compile(r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|self_attn|model_type")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "models" not in p.relative_to(root).parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if model_names.search(line)]
    assert not offenders
    quoted = re.compile("|".join(f"[\"']{re.escape(n)}[\"']" for n, s in SOLVERS.items() if s.starts))
    for stage in ("pipeline.py", "profile.py", "capture.py", "cli.py", "apply.py"):
        assert not quoted.search((root / stage).read_text()), stage


def test_the_adapter_says_what_the_exports_ask():
    from transformers import LlamaConfig, Qwen2Config

    from mixq.models import ADAPTERS

    llama, qwen = ADAPTERS["llama"], ADAPTERS["qwen2"]
    assert llama.in_block("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert llama.in_block("model.embed_tokens") is None and llama.in_block("model.layers.3") is None
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    model = type("M", (), {"config": cfg})()
    rows = llama.gguf_rows(model, "model.layers.0.self_attn.q_proj.bias", 64)
    assert sorted(rows.tolist()) == list(range(64)) and rows.tolist() != list(range(64))  # a permutation
    assert llama.gguf_rows(model, "model.layers.0.mlp.up_proj", 128) is None
    assert qwen.gguf_rows(type("M", (), {"config": Qwen2Config()})(), "model.layers.0.self_attn.q_proj", 64) is None
    assert (llama.gguf_arch, qwen.gguf_arch) == ("llama", "qwen2")
    assert llama.head_dim(model) == 16
