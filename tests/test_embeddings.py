"""Tables: the embedding table and the output head join the allocation (tied: one table, two uses),
are stored packed once, and load back bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import mixq
from mixq.allocate import BudgetError, allocate
from mixq.config import QuantizeConfig
from mixq.export import EXPORTERS
from mixq.formats import QuantSpec
from mixq.io import save_quantized
from mixq.models import adapter_for
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.pipeline import check_plan, preflight, run
from mixq.profile import fixed_bytes
from mixq.plan import TABLE_BITS, Budget, Candidate, Plan
from mixq.config import default_candidates, default_specs
from mixq.runtime.qlinear import QuantEmbedding, QuantLinear

from conftest import make_tiny_model, random_ids, tiny_config

EMBED, HEAD = "model.embed_tokens", "lm_head"


FORMATS = tuple(default_specs(groups=(32, 0)))


def _candidates():
    return default_candidates(groups=(32, 0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def untied_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    config = tiny_config()
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def tied():
    """(float model, packed model with its table quantized, Result, calibration ids)."""
    float_model = make_tiny_model()
    model = copy.deepcopy(float_model)
    calib = random_ids(8, 32, seed=1)
    result = run(model, calib, QuantizeConfig(budget=Budget(bits=4.0), formats=FORMATS, tables=True))
    return float_model, model, result, calib


def test_tables_join_by_default_but_under_a_latency_an_exporter_or_a_stream():
    default = QuantizeConfig(budget=Budget(bits=3))
    assert default.quantizes_tables() and QuantizeConfig(budget=Budget(bytes=10**6)).quantizes_tables()
    assert not default.quantizes_tables(streamed=True) and not default.table_candidates(streamed=True)
    assert QuantizeConfig(budget=Budget(bits=3), tables=True).quantizes_tables(streamed=True)  # asked for
    assert not QuantizeConfig(budget=Budget(of_float=0.5)).quantizes_tables()
    assert not QuantizeConfig(budget=Budget(bits=3), compatible="compressed-tensors").quantizes_tables()
    gguf = QuantizeConfig(budget=Budget(bits=3), compatible="gguf")  # llama.cpp's types hold tables
    assert gguf.quantizes_tables() and {c.spec for c in gguf.table_candidates()} <= set(EXPORTERS["gguf"]().specs())
    assert not QuantizeConfig(budget=Budget(bits=3), tables=False).table_candidates()
    assert Budget(bits=3).table_bits == TABLE_BITS and Budget(bits=3, table_bits=8).table_bits == 8
    assert Budget.from_dict(Budget(bits=3, table_bits=5).to_dict()) == Budget(bits=3, table_bits=5)
    for bad in ({"bytes": 10**6, "table_bits": 6}, {"of_float": 0.5, "table_bits": 6}):
        with pytest.raises(ValueError, match="--table-bits goes with --bits"):
            Budget(**bad)
    with pytest.raises(ValueError, match="--table-bits must be in"):
        Budget(bits=3, table_bits=0)


def test_under_bits_the_tables_add_their_share_and_the_whole_is_allocated(tied):
    """--bits B with the tables: the stored bits of blocks at B and tables at --table-bits, spent over both; the
    allocation's block bits are the packed model's."""
    float_model, model, result, _ = tied
    prof, alloc = result.profile, result.allocation
    assert prof.tables == (EMBED,) and prof.table_weights == float_model.model.embed_tokens.weight.numel()
    bits, weights = block_linear_bits(model)
    assert (alloc.bits, prof.weights) == (bits, weights)
    lp = next(lp for lp in prof.layers if lp.name == EMBED)
    assert alloc.table_bits == lp.bits[lp.candidates.index(result.plan.layers[EMBED])]
    assert alloc.bits + alloc.table_bits <= 4.0 * prof.weights + TABLE_BITS * prof.table_weights
    with pytest.raises(BudgetError, match="below the smallest possible model"):
        allocate(prof, Budget(bits=1.0, table_bits=3))


def test_tables_are_the_embedding_and_an_untied_head(tiny_model):
    assert adapter_for(tiny_model).tables(tiny_model) == [EMBED]
    untied = untied_model()
    assert adapter_for(untied).tables(untied) == [EMBED, HEAD]


def test_a_tied_table_is_one_allocation_unit_stored_once(tied, tmp_path, tiny_tokenizer):
    _, model, result, _ = tied
    assert EMBED in result.plan.layers and HEAD not in result.plan.layers
    assert EMBED in {lp.name for lp in result.profile.layers}
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear)
    assert all(a is b for a, b in zip(head.buffers(), table.buffers()))
    save_quantized(model, tiny_tokenizer, result.plan, tmp_path / "q", {"source": "tiny"}, {})
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"{EMBED}.qweight" in keys and f"{EMBED}.weight" not in keys
    assert not any(k.startswith(HEAD) for k in keys)
    loaded = mixq.load(tmp_path / "q")
    ids = random_ids(3, 32, seed=10)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert all(a is b for a, b in zip(loaded.lm_head.buffers(), loaded.model.embed_tokens.buffers()))


def test_packed_table_computes_what_was_applied(tiny_model, calib_ids):
    """Fake-quantized (apply) and packed (QuantEmbedding + tied head) models give the same logits."""
    spec = QuantSpec.of(4, 32, "min", 6)
    plan = Plan({EMBED: Candidate(spec, "rtn"), "model.layers.0.mlp.up_proj": Candidate(QuantSpec(3, 32), "gptq")})
    float_table = tiny_model.model.embed_tokens.weight.detach().clone()
    qt = apply_plan(tiny_model, calib_ids, plan)
    fake = copy.deepcopy(tiny_model)
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight  # still tied: both uses quantized
    assert not torch.equal(tiny_model.model.embed_tokens.weight, float_table)
    pack_model(tiny_model, qt)
    ids = random_ids(3, 32, seed=11)
    assert torch.equal(_logits(tiny_model, ids), _logits(fake, ids))


def test_untied_head_and_table_are_separate_layers(tmp_path, tiny_tokenizer):
    model = untied_model()
    calib = random_ids(8, 32, seed=1)
    result = run(model, calib, QuantizeConfig(budget=Budget(bits=4.0), formats=FORMATS, tables=True))
    assert {EMBED, HEAD} <= set(result.plan.layers)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and type(model.lm_head) is QuantLinear
    assert not any(a is b for a in model.lm_head.buffers() for b in model.model.embed_tokens.buffers())
    save_quantized(model, tiny_tokenizer, result.plan, tmp_path / "q", {"source": "tiny"}, {})
    loaded = mixq.load(tmp_path / "q")
    ids = random_ids(3, 32, seed=10)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_untied_float_head_loads_as_its_own_fp16_table(tmp_path, tiny_tokenizer):
    """With --float-tables an untied model keeps a table and a head of its own, both fp16 as stored."""
    from mixq.runtime.half import HalfEmbedding, HalfLinear

    model = untied_model()
    calib = random_ids(8, 32, seed=1)
    result = run(model, calib, QuantizeConfig(budget=Budget(bits=4.0), formats=FORMATS, tables=False))
    save_quantized(model, tiny_tokenizer, result.plan, tmp_path / "q", {"source": "tiny"}, {})
    loaded = mixq.load(tmp_path / "q")
    assert isinstance(loaded.model.embed_tokens, HalfEmbedding) and isinstance(loaded.lm_head, HalfLinear)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.half())
    ids = random_ids(3, 32, seed=10)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["fisher", "hessian", "roundoff", "kl"])
def test_table_damage_falls_with_bits(estimator):
    model = make_tiny_model()
    calib = random_ids(8, 32, seed=1)
    result = run(model, calib, QuantizeConfig(budget=Budget(bits=8.5), formats=FORMATS, estimator=estimator,
                                              tables=True))
    lp = next(lp for lp in result.profile.layers if lp.name == EMBED)
    by_bits = {}
    for c, d in zip(lp.candidates, lp.damage):
        by_bits.setdefault(c.spec.bits, []).append(d)
    assert all(d > 0 for d in lp.damage)
    assert max(by_bits[8]) < min(by_bits[4]), by_bits


def test_size_budget_that_only_a_quantized_table_meets(tiny_model, calib_ids, tiny_tokenizer, tmp_path):
    """A size below what fp16 embeddings allow fails in preflight with --float-tables, is met without, and the
    file written stays within it."""
    adapter = adapter_for(tiny_model)
    names = adapter.layer_names(tiny_model)
    weights = sum(tiny_model.get_submodule(n).weight.numel() for n in names)
    table = tiny_model.model.embed_tokens.weight.numel()
    size = fixed_bytes(tiny_model, names + [EMBED]) + int((3.0 * weights + 6 * table) / 8)
    assert size < fixed_bytes(tiny_model, names) + int(2.5 * weights / 8)  # below the smallest fp16-table model
    with pytest.raises(BudgetError, match="below the smallest possible model"):
        config = QuantizeConfig(budget=Budget(bytes=size), formats=FORMATS, tables=False)
        preflight(tiny_model, config, config.candidates())
    result = run(tiny_model, calib_ids, QuantizeConfig(budget=Budget(bytes=size), formats=FORMATS, tables=True))
    save_quantized(tiny_model, tiny_tokenizer, result.plan, tmp_path / "q", {"source": "tiny"}, {})
    assert (tmp_path / "q" / "model.safetensors").stat().st_size <= size


def test_plan_may_not_give_a_table_a_hessian_solver(tiny_model):
    with pytest.raises(ValueError, match="take a solver that needs no calibration statistics .*rtn"):
        check_plan(tiny_model, Plan({EMBED: Candidate(QuantSpec(4, 32), "gptq")}))
    check_plan(tiny_model, Plan({EMBED: Candidate(QuantSpec(4, 32), "rtn")}))


def test_tied_table_damage_is_the_sum_of_both_uses(tiny_model, calib_ids):
    """roundoff, by hand: Σ over every row of ‖ΔW‖² (the head) + Σ over tokens of how often the calibration
    reads them × ‖ΔE_token‖² (the lookup)."""
    from mixq.capture import block_inputs, run_block
    from mixq.profile import profile_tables
    from mixq.solvers import solve

    adapter = adapter_for(tiny_model)
    x, calls = block_inputs(tiny_model, adapter, calib_ids)
    for block, call in zip(adapter.block_list(tiny_model), calls):
        x = run_block(block, x, call)
    [lp] = profile_tables(tiny_model, calib_ids, x, "roundoff", None, None)
    w = tiny_model.model.embed_tokens.weight.detach()
    freq = torch.bincount(calib_ids.reshape(-1), minlength=w.shape[0]).float() / calib_ids.numel()
    for cand, damage in zip(lp.candidates, lp.damage):
        err = ((w - solve("rtn", w, torch.empty(0, 0), cand.spec).dequantize()) ** 2).sum(1)
        assert damage == pytest.approx(float(err.sum() + (freq * err).sum()), rel=1e-5)


def test_blocks_calibrate_on_the_quantized_embeddings(tiny_model, calib_ids, monkeypatch):
    import mixq.apply

    float_table = tiny_model.model.embed_tokens.weight.detach().clone()
    seen = []
    real = mixq.apply.block_inputs

    def spy(model, adapter, ids, *rest):
        seen.append(model.model.embed_tokens.weight.detach().clone())
        return real(model, adapter, ids, *rest)

    monkeypatch.setattr(mixq.apply, "block_inputs", spy)
    spec = QuantSpec.of(4, 32, "min", 6)
    plan = Plan({EMBED: Candidate(spec, "rtn"), "model.layers.0.mlp.up_proj": Candidate(QuantSpec(3, 32), "gptq")})
    qt = apply_plan(tiny_model, calib_ids, plan)
    assert torch.equal(seen[0], qt[EMBED].dequantize()) and not torch.equal(seen[0], float_table)


@pytest.mark.parametrize("estimator", ["fisher", "hessian", "roundoff", "sqnr"])
def test_a_table_profiled_and_solved_in_row_blocks_is_the_table_whole(tiny_model, calib_ids, monkeypatch, estimator):
    """Llama-3's 128k-row table is profiled and solved apply.TABLE_ROWS rows at a time: the damages (sums over rows;
    relative ones weighted by each block's energy) and the stored tensors are those of the whole table."""
    import mixq.apply as apply_module
    from mixq.capture import block_inputs, output_fisher, run_block
    from mixq.profile import profile_tables

    adapter = adapter_for(tiny_model)
    x, calls = block_inputs(tiny_model, adapter, calib_ids)
    for block, call in zip(adapter.block_list(tiny_model), calls):
        x = run_block(block, x, call)
    fisher = output_fisher(tiny_model, adapter, calib_ids, tables=True) if estimator == "fisher" else None
    spec = QuantSpec.of(4, 32, "min", 6)
    results = {}
    for rows in (10**6, 100):  # the tiny table has 256 rows: whole, then in blocks of 100, 100 and 56
        monkeypatch.setattr(apply_module, "TABLE_ROWS", rows)
        [lp] = profile_tables(tiny_model, calib_ids, x, estimator, fisher, None)
        model = copy.deepcopy(tiny_model)
        qt = apply_plan(model, calib_ids, Plan({EMBED: Candidate(spec, "rtn")}))[EMBED]
        results[rows] = lp.damage, qt, model.model.embed_tokens.weight.detach()
    (whole, qt_whole, w_whole), (parts, qt_parts, w_parts) = results.values()
    assert all(d > 0 for d in whole)
    assert parts == pytest.approx(whole, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip((qt_whole.codes, qt_whole.scales, qt_whole.zeros, qt_whole.steps),
                                                 (qt_parts.codes, qt_parts.scales, qt_parts.zeros, qt_parts.steps)))
    assert torch.equal(w_whole, w_parts)
