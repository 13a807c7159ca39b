"""The whole flow on the tiny Llama: capture, profile + allocate under a budget, apply, pack, save, load."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import mixq
import mixq.io
import mixq.apply
import mixq.pipeline
import mixq.profile
from mixq.capture import block_inputs, hessians, run_block
from mixq.config import QuantizeConfig
from mixq.formats import QuantSpec
from mixq.io import MARKER, SavedModelError, check_out_dir, save_quantized
from mixq.models import adapter_for
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.pipeline import check_plan, run
from mixq.plan import Budget, Candidate, Plan
from mixq.config import default_candidates, default_specs
from mixq.runtime.qlinear import QuantLinear

from conftest import first_block_capture, make_tiny_model, random_ids

BUDGET = Budget(bits=3.5)
SOURCE = "tiny-random-llama"


FORMATS = tuple(default_specs(groups=(32, 0)))


def _candidates():
    return default_candidates(groups=(32, 0))  # both fit rows of 64 and 128


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def quantized():
    """(float model, packed model, Result, calibration ids), quantized once for the whole module."""
    torch.manual_seed(0)
    float_model = make_tiny_model()
    model = copy.deepcopy(float_model)
    calib = random_ids(8, 32, seed=1)
    result = run(model, calib, QuantizeConfig(budget=BUDGET, formats=FORMATS, tables=False))  # (test_embeddings)
    return float_model, model, result, calib


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory, tiny_tokenizer):
    _, model, result, _ = quantized
    out = tmp_path_factory.mktemp("saved") / "q"
    save_quantized(model, tiny_tokenizer, result.plan, out, {"version": 1, "source": SOURCE},
                   {"profile.json": result.profile.to_json()})
    return out


# --- capture -------------------------------------------------------------------------------------------------

def test_capture_matches_the_model(tiny_model):
    ids = random_ids(10, 32, seed=4)  # 10 windows: the last batch of 8 is short
    adapter = adapter_for(tiny_model)
    hidden, x, stats, y, block = first_block_capture(tiny_model, ids)
    assert torch.equal(x, hidden[0])
    assert torch.allclose(y, hidden[1], atol=1e-5)

    assert set(stats) == {g[0] for g in adapter.groups}
    # H of the attention input: E[x xᵀ] of the normed hidden states, over every token
    with torch.no_grad():
        xn = block.input_layernorm(x).reshape(-1, 64)
    s = stats["self_attn.q_proj"]
    assert s.tokens == 10 * 32
    assert s.hessian.shape == (64, 64)
    assert torch.allclose(s.hessian, xn.T @ xn / xn.shape[0], rtol=1e-4, atol=1e-6)
    assert stats["mlp.down_proj"].hessian.shape == (128, 128)
    assert torch.allclose(s.hessian, s.hessian.T)


def test_layer_names(tiny_model):
    names = adapter_for(tiny_model).layer_names(tiny_model)
    assert len(names) == 14
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"
    for n in names:
        assert isinstance(tiny_model.get_submodule(n), torch.nn.Linear)


def test_unknown_architecture_is_an_error_listing_the_supported(tiny_model):
    tiny_model.config.model_type = "bloom"
    with pytest.raises(ValueError, match="unsupported architecture 'bloom'; supported: .*llama"):
        adapter_for(tiny_model)


# --- quantize under a budget ---------------------------------------------------------------------------------

def test_plan_covers_every_layer_within_budget(quantized):
    _, model, result, _ = quantized
    names = adapter_for(model).layer_names(model)
    assert set(result.plan.layers) == set(names)
    bits, weights = block_linear_bits(model)
    assert bits / weights <= BUDGET.bits
    # exact bit accounting: what the allocation paid for is what was packed
    assert bits == result.allocation.bits
    assert result.allocation.bits_per_weight(result.profile) == bits / weights
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        assert layer.spec == result.plan.layers[name].spec


def test_mixed_precision_is_actually_mixed(quantized):
    _, _, result, _ = quantized
    # uniform int3-row (3.30 bpw) fits 3.5 but leaves budget unused: the optimum spends it on some layers
    assert len(set(result.plan.layers.values())) > 1
    assert result.allocation.bits / result.profile.weights > BUDGET.bits - 0.15


def test_profile_damage_falls_with_bits(quantized):
    _, _, result, _ = quantized
    for lp in result.profile.layers:
        by = {(c.spec.bits, c.spec.group_size): d for c, d in zip(lp.candidates, lp.damage)}
        assert all(d >= 0 for d in lp.damage)
        for g in (32, 0):
            assert by[8, g] < by[2, g], lp.name
        assert lp.bits == [c.spec.storage_bits(lp.rows, lp.cols) for c in lp.candidates]


def test_packed_logits_equal_fake_quantized_logits(quantized):
    float_model, model, result, calib = quantized
    fake = copy.deepcopy(float_model)
    qtensors = apply_plan(fake, calib, result.plan)
    assert set(qtensors) == set(result.plan.layers)
    ids = random_ids(3, 32, seed=9)
    packed, faked = _logits(model, ids), _logits(fake, ids)
    assert torch.equal(packed, faked)
    # and quantization did change the model
    assert not torch.allclose(packed, _logits(float_model, ids), atol=1e-4)
    # pack_model on the fake-quantized copy gives the same packed model
    pack_model(fake, qtensors)
    assert torch.equal(_logits(fake, ids), packed)


def test_apply_feeds_each_block_the_quantized_outputs(tiny_model, calib_ids, monkeypatch):
    """Block 1 is solved with the statistics of what quantized block 0 outputs, not of the float model."""
    float_model = copy.deepcopy(tiny_model)
    adapter = adapter_for(tiny_model)
    plan = Plan({n: Candidate(QuantSpec(2, 0), "rtn") for n in adapter.layer_names(tiny_model)})
    target = "model.layers.1.self_attn.q_proj"
    target_ptr = tiny_model.get_submodule(target).weight.data_ptr()
    used = []
    real_solve = mixq.apply.solve_layer

    def recording_solve(chain, weight, stats, spec, damp):
        if weight.data_ptr() == target_ptr:
            used.append(stats.hessian.clone())
        return real_solve(chain, weight, stats, spec, damp)

    monkeypatch.setattr(mixq.apply, "solve_layer", recording_solve)
    apply_plan(tiny_model, calib_ids, plan)
    assert len(used) == 1

    def block1_hessian(model):
        x, calls = block_inputs(model, adapter, calib_ids)
        x = run_block(adapter.block_list(model)[0], x, calls[0])
        with hessians(adapter.block_list(model)[1], adapter) as stats:
            run_block(adapter.block_list(model)[1], x, calls[1])
        return stats["self_attn.q_proj"].hessian

    fed_quantized, fed_float = block1_hessian(tiny_model), block1_hessian(float_model)
    to_quantized = float((used[0] - fed_quantized).norm() / fed_quantized.norm())
    to_float = float((used[0] - fed_float).norm() / fed_float.norm())
    # (not bit-equal: the float parameters are rounded to fp16 only after the last block)
    assert to_quantized < 0.1 * to_float, (to_quantized, to_float)


def test_saved_model_loads_bit_identical(quantized, saved):
    _, model, result, _ = quantized
    files = {p.name for p in saved.iterdir()}
    assert {"model.safetensors", "config.json", "plan.json", "profile.json", MARKER} <= files
    assert Plan.from_json((saved / "plan.json").read_text()) == result.plan
    loaded = mixq.load(saved)
    ids = random_ids(3, 32, seed=10)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    for name, cand in result.plan.layers.items():
        assert isinstance(loaded.get_submodule(name), QuantLinear)
        assert loaded.get_submodule(name).spec == cand.spec
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # for inference: a forward pass outside no_grad keeps no decoded weight for a backward pass
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded(ids).logits.grad_fn is None


def test_saved_tensors_are_packed(quantized, saved):
    """No float copy of a quantized weight is stored; the file holds exactly the packed bits plus fp16 floats."""
    _, model, result, _ = quantized
    with safe_open(saved / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        dtypes = {k: f.get_tensor(k).dtype for k in keys}
    for name in result.plan.layers:
        assert f"{name}.weight" not in keys
        assert f"{name}.qweight" in keys and f"{name}.scales" in keys
    floats = {k for k in keys if not k.rsplit(".", 1)[-1] in ("qweight", "scales", "qzeros")}
    assert all(dtypes[k] == torch.float16 for k in floats)
    float_bytes = sum(p.numel() * 2 for n, p in model.named_parameters()
                      if n.rsplit(".", 1)[0] not in result.plan.layers)
    assert nbytes == float_bytes + result.allocation.bits // 8


def test_generate_works_after_load(quantized, saved):
    _, model, _, _ = quantized
    loaded = mixq.load(saved)
    prompt = random_ids(1, 8, seed=11)
    with torch.no_grad():
        a = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
        b = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert a.shape == (1, 14)
    assert torch.equal(a[:, :8], prompt)
    assert int(a.max()) < 256
    assert torch.equal(a, b)


def test_size_budget_bounds_the_safetensors_file(tiny_model, calib_ids, tiny_tokenizer, tmp_path):
    """--size is the size of model.safetensors: the file written must not exceed it."""
    from mixq.profile import fixed_bytes

    names = adapter_for(tiny_model).layer_names(tiny_model)
    weights = sum(tiny_model.get_submodule(n).weight.numel() for n in names)
    size = fixed_bytes(tiny_model, names) + int(3.0 * weights / 8)
    model = copy.deepcopy(tiny_model)
    result = run(model, calib_ids, QuantizeConfig(budget=Budget(bytes=size), formats=FORMATS, estimator="hessian",
                                                  tables=False))
    save_quantized(model, tiny_tokenizer, result.plan, tmp_path / "q", {"source": SOURCE}, {})
    assert (tmp_path / "q" / "model.safetensors").stat().st_size <= size
    bits, w = block_linear_bits(model)
    assert 2.5 < bits / w <= 3.0 + 1e-9


def test_hand_written_plan_quantizes_only_its_layers(tiny_model, calib_ids):
    name = "model.layers.1.mlp.down_proj"
    other = "model.layers.0.self_attn.q_proj"
    before = tiny_model.get_submodule(other).weight.detach().clone()
    plan = Plan({name: Candidate(QuantSpec(4, 32), "rtn")})
    result = run(tiny_model, calib_ids, QuantizeConfig(plan=plan))
    assert result.profile is None and result.allocation is None
    assert isinstance(tiny_model.get_submodule(name), QuantLinear)
    kept = tiny_model.get_submodule(other)
    assert type(kept) is torch.nn.Linear
    assert torch.equal(kept.weight, before.half().float())  # stored in fp16: rounded now so saved == in memory


# --- plans that cannot work fail before calibration -------------------------------------------------------------

@pytest.fixture
def no_calibration(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("calibration started before the plan was checked")
    for module, name in ((mixq.profile, "block_inputs"), (mixq.apply, "block_inputs"), (mixq.profile, "output_fisher"),
                         (mixq.profile, "output_energy"), (mixq.apply, "model_statistics")):
        monkeypatch.setattr(module, name, boom)


def test_unknown_layer_fails_before_calibration(tiny_model, calib_ids, no_calibration):
    plan = Plan({"model.layers.0.self_attn.q_proj": Candidate(QuantSpec(4, 32), "rtn"),
                 "model.layers.7.mlp.down_proj": Candidate(QuantSpec(4, 32), "rtn")})
    with pytest.raises(ValueError, match=r"unknown layer 'model\.layers\.7\.mlp\.down_proj'"):
        run(tiny_model, calib_ids, QuantizeConfig(plan=plan))


@pytest.mark.parametrize("name, group", [("model.layers.0.self_attn.q_proj", 128),
                                         ("model.layers.1.mlp.down_proj", 96)])
def test_group_that_does_not_divide_fails_before_calibration(tiny_model, calib_ids, no_calibration, name, group):
    plan = Plan({name: Candidate(QuantSpec(3, group), "gptq")})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        run(tiny_model, calib_ids, QuantizeConfig(plan=plan))


def test_unknown_solver_fails_when_the_plan_is_read():
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: unknown solver 'awq'"):
        Plan.from_dict({"layers": {"model.layers.0.mlp.up_proj": {"solver": "awq", "bits": 4, "group_size": 32}}})


def test_check_plan_accepts_a_good_plan(tiny_model):
    check_plan(tiny_model, Plan({n: Candidate(QuantSpec(2, 0), "clip")
                                 for n in adapter_for(tiny_model).layer_names(tiny_model)}))


# --- the output folder ------------------------------------------------------------------------------------------

def test_check_out_dir(tmp_path):
    check_out_dir(tmp_path / "new", SOURCE)  # does not exist yet: fine
    empty = tmp_path / "empty"
    empty.mkdir()
    check_out_dir(empty, SOURCE)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SavedModelError, match="not empty"):
        check_out_dir(other, SOURCE)

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MARKER).write_text(json.dumps({"source": SOURCE}))
    check_out_dir(earlier, SOURCE)  # an earlier run on the same model may be replaced
    with pytest.raises(SavedModelError, match="different model"):
        check_out_dir(earlier, "another-model")

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SavedModelError, match="not a folder"):
        check_out_dir(a_file, SOURCE)
    check_out_dir(tmp_path / "missing" / "q", SOURCE)  # missing parents are created at save
    with pytest.raises(SavedModelError, match="is a file"):
        check_out_dir(a_file / "q", SOURCE)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_no_folder(quantized, tiny_tokenizer, tmp_path, monkeypatch, error):
    _, model, result, _ = quantized

    def broken_save_file(*a, **k):
        raise error
    monkeypatch.setattr(mixq.io, "save_file", broken_save_file)
    out = tmp_path / "q"
    with pytest.raises(type(error)):
        save_quantized(model, tiny_tokenizer, result.plan, out, {"source": SOURCE}, {})
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .partial folder left behind


def test_interrupted_save_keeps_the_earlier_folder(quantized, saved, tiny_tokenizer, tmp_path, monkeypatch):
    import shutil

    _, model, result, _ = quantized
    out = tmp_path / "q"
    shutil.copytree(saved, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_write(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", broken_write)  # fails after the tensors
    with pytest.raises(OSError):
        save_quantized(model, tiny_tokenizer, result.plan, out, {"source": SOURCE}, {})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_save_replaces_an_earlier_run(quantized, saved, tiny_tokenizer, tmp_path):
    import shutil

    _, model, result, _ = quantized
    out = tmp_path / "q"
    shutil.copytree(saved, out)
    (out / "profile.json").unlink()
    (out / "stale.txt").write_text("from the earlier run")
    save_quantized(model, tiny_tokenizer, result.plan, out, {"source": SOURCE, "run": 2}, {})
    assert not (out / "stale.txt").exists()
    assert json.loads((out / MARKER).read_text())["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_load_refuses_a_folder_that_is_not_mixq(tmp_path, tiny_hf_dir):
    with pytest.raises(SavedModelError, match="not a mixq model"):
        mixq.load(tiny_hf_dir)


def test_load_refuses_a_corrupt_folder(saved, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SavedModelError, match="corrupt"):
        mixq.load(bad)


def test_impossible_budget_fails_before_any_calibration(monkeypatch):
    from mixq.allocate import BudgetError

    def must_not_run(*args, **kwargs):
        raise AssertionError("profiling started despite an impossible budget")

    monkeypatch.setattr(mixq.pipeline, "profile_model", must_not_run)
    monkeypatch.setattr(mixq.profile, "block_inputs", must_not_run)
    with pytest.raises(BudgetError, match="smallest possible model"):
        run(make_tiny_model(), random_ids(), QuantizeConfig(budget=Budget(bits=1.0), formats=FORMATS))


def test_save_creates_missing_parent_folders(quantized, tiny_tokenizer, tmp_path):
    _, model, result, _ = quantized
    out = tmp_path / "not" / "yet" / "q"
    check_out_dir(out, SOURCE)
    save_quantized(model, tiny_tokenizer, result.plan, out, {"version": 1, "source": SOURCE}, {})
    assert (out / MARKER).exists() and (out / "model.safetensors").exists()


def test_loaded_float_table_stays_fp16_and_shared(tmp_path, tiny_model, calib_ids):
    """The table mixq did not quantize (--float-tables) is kept as stored (fp16, half the memory), the tied head
    computes from the very same tensor, and the logits are those of float32 copies of it, for one token (kernel)
    and for many."""
    from mixq.runtime.half import HalfEmbedding, HalfLinear
    from conftest import make_tokenizer

    result = run(tiny_model, calib_ids, QuantizeConfig(budget=Budget(bits=4.0), tables=False))
    save_quantized(tiny_model, make_tokenizer(), result.plan, tmp_path / "q", {"source": "x", "bpw": 4.0}, {})
    model = mixq.load(tmp_path / "q")
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(table, HalfEmbedding) and table.weight.dtype == torch.float16
    assert isinstance(head, HalfLinear) and head.weight is table.weight
    upcast = copy.deepcopy(model)
    plain = torch.nn.Embedding.from_pretrained(table.weight.float(), freeze=True)
    upcast.set_input_embeddings(plain)
    upcast.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    upcast.lm_head.weight = plain.weight
    with torch.no_grad():
        for ids in (calib_ids[:1, :1], calib_ids[:2]):
            torch.testing.assert_close(model(ids).logits, upcast(ids).logits, rtol=1e-5, atol=1e-5)
