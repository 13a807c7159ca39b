"""Damage estimators: what each measures, and that profiling's row sampling keeps sums over rows whole."""
from __future__ import annotations

import pytest
import torch

import mixq.profile
from mixq.capture import LayerStats
from mixq.formats import QuantSpec, quantize
from mixq.plan import Candidate
from mixq.profile import profile_group
from mixq.sensitivity import ESTIMATORS, get_estimator
from mixq.sensitivity.oac import oac_stats


def _layer(rows=40, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(256, cols, generator=g) * torch.linspace(0.1, 3, cols)
    return w, LayerStats(x.T @ x / x.shape[0], x.shape[0])


def test_weight_only_estimators():
    w, stats = _layer()
    deq = quantize(w, QuantSpec(3, 32)).dequantize()
    err = float(((w - deq) ** 2).sum())
    assert get_estimator("roundoff")(w, deq, stats) == pytest.approx(err)
    assert get_estimator("sqnr")(w, deq, stats) == pytest.approx(err / float((w ** 2).sum()))
    assert get_estimator("roundoff")(w, deq, stats, torch.full((40,), 2.0)) == pytest.approx(2 * err)


@pytest.mark.parametrize("name", sorted(n for n, e in ESTIMATORS.items() if not e.measured))
def test_every_estimator_is_zero_for_no_change_and_grows_with_error(name):
    w, stats = _layer()
    fisher = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 0.5
    est = get_estimator(name)
    assert est(w, w.clone(), stats, fisher) == 0
    d3 = est(w, quantize(w, QuantSpec(3, 32)).dequantize(), stats, fisher)
    d2 = est(w, quantize(w, QuantSpec(2, 32)).dequantize(), stats, fisher)
    assert 0 < d3 < d2


@pytest.mark.parametrize("name", ["roundoff", "fisher"])
def test_sampled_rows_stand_for_the_whole_layer(monkeypatch, name):
    """Profiling estimates a sum over rows on a sample of them: scaled up, it matches the whole layer's sum."""
    w, stats = _layer(rows=400, seed=2)
    fisher = {"l": torch.ones(400)} if name == "fisher" else None
    cands = [Candidate(QuantSpec(3, 32), "rtn")]
    monkeypatch.setattr(mixq.profile, "PROFILE_ROWS", 400)
    whole = profile_group({"l": w}, stats, cands, name, fisher)[0].damage[0]
    monkeypatch.setattr(mixq.profile, "PROFILE_ROWS", 100)
    sampled = profile_group({"l": w}, stats, cands, name, fisher)[0].damage[0]
    assert sampled == pytest.approx(whole, rel=0.15)
    assert sampled > 2 * whole / 4  # not the sample's own sum (a quarter of the layer's)


def test_kl_is_measured_from_the_layer_on_and_matches_a_whole_model_run(tiny_model):
    """The probe's KL for a layer equals the KL computed by hand from two full forward passes, it is zero for the
    float weight, and the layer is left as it was."""
    import torch.nn.functional as F

    from mixq.models import adapter_for
    from mixq.sensitivity.kl import KLProbe

    from conftest import random_ids

    ids = random_ids(3, 48, seed=4)
    adapter = adapter_for(tiny_model)
    probe = KLProbe(tiny_model, adapter, ids)
    probe.advance()  # to block 1
    lin = tiny_model.model.layers[1].mlp.down_proj
    w = lin.weight.detach().clone()
    deq = quantize(w, QuantSpec(2, 32)).dequantize()
    measure = probe.layer(lin)
    assert measure(w) == pytest.approx(0, abs=1e-6)
    got = measure(deq)
    assert torch.equal(lin.weight, w)
    from mixq.sensitivity.kl import KL_LENGTH, KL_WINDOWS

    sub = ids[:KL_WINDOWS, :KL_LENGTH]
    with torch.no_grad():
        ref = F.log_softmax(tiny_model(sub).logits, -1)
        lin.weight.data = deq
        q = F.log_softmax(tiny_model(sub).logits, -1)
        lin.weight.data = w
    assert got == pytest.approx(float((ref.exp() * (ref - q)).sum(-1).mean()), rel=1e-4)
    assert got > 0


def test_kl_profile_ranks_widths_and_covers_every_layer(tiny_model):
    from mixq.profile import profile_model
    from mixq.config import default_candidates

    from conftest import random_ids

    cands = default_candidates("rtn", bits=(2, 4, 8), groups=(32,))
    prof = profile_model(tiny_model, random_ids(3, 48, seed=5), cands, "kl")
    assert len(prof.layers) == 14
    total = {b: 0.0 for b in (2, 4, 8)}
    for lp in prof.layers:
        for c, d in zip(lp.candidates, lp.damage):
            assert d >= -1e-7, lp.name  # a KL, up to float rounding
            total[c.spec.bits] += d
    assert total[2] > 3 * total[4] > 9 * total[8] > 0


def test_oac_damage_is_each_tokens_error_weighted_by_its_loss_gradient():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 16, generator=g)
    deq = quantize(w, QuantSpec(2, 16)).dequantize()
    x, energy = torch.randn(50, 16, generator=g), torch.rand(50, generator=g) * 4
    mean = x.mean(0)
    judged = oac_stats(x, energy, mean)
    by_token = energy * ((x @ (w - deq).T) ** 2).sum(1)  # ‖g_t‖² ‖ΔW x_t‖²
    est = get_estimator("oac")
    assert est(w, deq, judged[False], None) == pytest.approx(0.5 * float(by_token.mean()) / 12, rel=1e-5)
    assert est(w, deq, judged[False], torch.full((12,), 3.0)) == pytest.approx(est(w, deq, judged[False], None))
    centred = energy * (((x - mean) @ (w - deq).T) ** 2).sum(1)  # what is left once a bias takes the mean error
    assert est(w, deq, judged[True], None) == pytest.approx(0.5 * float(centred.mean()) / 12, rel=1e-5)


def test_oac_profile_pairs_each_token_with_its_own_gradient(tiny_model):
    """The profile's oac damage of a layer equals the sum over the first calibration tokens of that token's
    gradient energy times that token's output error: inputs and gradients stay in step."""
    from mixq.capture import block_inputs, hessians, output_energy, run_block
    from mixq.models import adapter_for
    from mixq.capture import FISHER_WINDOWS
    from mixq.profile import profile_model
    from mixq.solvers import solve

    from conftest import random_ids

    ids = random_ids(FISHER_WINDOWS + 2, 16, seed=4)
    cand = Candidate(QuantSpec.of(2, 32, "min", 6), "gptq-act")
    prof = profile_model(tiny_model, ids, [cand], estimator="oac")
    adapter = adapter_for(tiny_model)
    name = "model.layers.0.mlp.up_proj"
    energy = output_energy(tiny_model, adapter, ids[:FISHER_WINDOWS])[name]
    x, calls = block_inputs(tiny_model, adapter, ids)
    block = adapter.block_list(tiny_model)[0]
    with hessians(block, adapter, keep=len(energy)) as stats:
        run_block(block, x, calls[0])
    st = stats["mlp.gate_proj"]
    w = block.mlp.up_proj.weight.detach()
    deq = solve(cand.solver, w, st.hessian, cand.spec).dequantize()
    by_token = energy * ((st.inputs @ (w - deq).T) ** 2).sum(1)
    want = 0.5 * float(by_token.mean()) / w.shape[0]
    got = next(lp for lp in prof.layers if lp.name == name).damage[0]
    assert got == pytest.approx(want, rel=1e-3)
    shuffled = energy.flip(0) * ((st.inputs @ (w - deq).T) ** 2).sum(1)  # out of step: another number
    assert abs(0.5 * float(shuffled.mean()) / w.shape[0] - got) > 0.01 * got


def test_oac_judges_the_tables_as_fisher_does(tiny_model, calib_ids):
    """With the tables joining, oac's profile gives the blocks its own damages and the tables fisher's (a lookup
    has no output error to weigh token by token): both in loss units, so one allocation compares them."""
    from mixq.profile import profile_model
    from mixq.config import default_candidates

    cands = default_candidates("gptq-act")[:4]
    oac = profile_model(tiny_model, calib_ids, cands, estimator="oac", tables=True)
    fisher = profile_model(tiny_model, calib_ids, cands, estimator="fisher", tables=True)
    table = next(lp for lp in oac.layers if lp.name == "model.embed_tokens")
    assert table.damage == next(lp for lp in fisher.layers if lp.name == "model.embed_tokens").damage
    blocks = [(a.damage, b.damage) for a, b in zip(oac.layers, fisher.layers) if a.name.startswith("model.layers")]
    assert all(a != b for a, b in blocks) and all(0 < x < 10 * y for a, b in blocks for x, y in zip(a, b))


def test_profiles_of_one_solver_each_merge_into_the_profile_of_all(tiny_model, calib_ids):
    """Solvers profiled one at a time and merged (benchmarks/solvers.py's resumable parts) give the damages of
    profiling them together; profiles of another estimator refuse to merge."""
    from mixq.profile import profile_model
    from mixq.profile import merge_profiles

    cands = {s: [Candidate(QuantSpec.of(b, 32), s) for b in (2, 3)] for s in ("clip", "gptq-act+bias")}
    together = profile_model(tiny_model, calib_ids, [c for cs in cands.values() for c in cs], "fisher")
    parts = [profile_model(tiny_model, calib_ids, cs, "fisher") for cs in cands.values()]
    merged = merge_profiles(parts)
    assert len(merged.layers) == len(together.layers) > 0
    for a, b in zip(together.layers, merged.layers):
        assert (a.name, a.candidates, a.bits) == (b.name, b.candidates, b.bits) and len(b.damage) == 4
        torch.testing.assert_close(torch.tensor(b.damage), torch.tensor(a.damage))
    with pytest.raises(ValueError, match="other settings"):
        merge_profiles([parts[0], profile_model(tiny_model, calib_ids, cands["clip"], "hessian")])
