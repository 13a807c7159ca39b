"""Coordinate descent (comq) and bias compensation: each lowers the error it claims to lower, chains parse, and a
bias-compensated model is counted, saved and loaded back exactly."""
from __future__ import annotations

import copy

import pytest
import torch

import mixq
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.capture import LayerStats
from mixq.chain import Chain
from mixq.config import QuantizeConfig
from mixq.formats import QuantSpec
from mixq.io import save_quantized
from mixq.models import adapter_for
from mixq.pipeline import run
from mixq.plan import Budget, Candidate, Plan
from mixq.profile import layer_costs
from mixq.solvers import output_error, solve
from mixq.solvers.bias import compensation
from mixq.solvers.comq import coordinate_descent
from mixq.solvers.gptq import damped

from conftest import random_ids
from test_solvers import correlated_hessian, weight

SPECS = [QuantSpec.of(3, 64), QuantSpec.of(2, 32, "min"), QuantSpec.of(3, 64, "sym"), QuantSpec.of(3, 32, "min", 6),
         QuantSpec.of(3, 16, "sym", 6, 256)]


def _err(name, w, h, spec):
    return float(output_error(w, solve(name, w, h, spec).dequantize(), h).sum())


@pytest.fixture(scope="module")
def hessian():
    return correlated_hessian(512)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_comq_lowers_gptqs_output_error(hessian, spec):
    """GPTQ's one pass stops short of a coordinate-wise minimum: the chained descent must find a lower error,
    and comq on its own must beat the clipping search it starts from."""
    w = weight(16, 512)
    assert _err("gptq-act+comq", w, hessian, spec) < 0.97 * _err("gptq-act", w, hessian, spec)
    assert _err("comq", w, hessian, spec) < 0.9 * _err("clip", w, hessian, spec)


def test_coordinate_descent_never_raises_the_error(hessian):
    """Every sweep (codes, then the least-squares grids) can only lower tr(ΔW H ΔWᵀ)."""
    w = weight(16, 512)
    qt = solve("rtn", w, hessian, QuantSpec.of(3, 64, "min"))
    s, z = qt.grid_values()
    errs = []
    for sweeps in range(0, 4):
        q, s1, z1 = coordinate_descent(w, hessian, qt.codes.float(), s.float(), z.float(),
                                       torch.full((16, 1), 7.0), "min", sweeps)
        deq = (q.view(16, 8, 64) * s1.unsqueeze(-1) + z1.unsqueeze(-1)).view(16, 512)
        errs.append(float(output_error(w, deq, hessian).sum()))
    assert errs[1] < 0.8 * errs[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs


def test_chains_parse_and_unknown_parts_are_named():
    assert Chain.parse("gptq-act+comq+bias") == Chain("gptq-act", ("comq", "bias"))
    with pytest.raises(ValueError, match="unknown refiner 'nope'; known: .*comq"):
        Chain.parse("gptq+nope")
    with pytest.raises(ValueError, match="unknown solver 'nope'"):
        Chain.parse("nope+comq")
    assert Candidate(QuantSpec(3), "gptq+comq+bias").bias and not Candidate(QuantSpec(3), "gptq+comq").bias


def _samples(cols=256, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    return x + 2 * torch.rand(cols, generator=g)  # inputs with a clear mean, as after a norm or an activation


def test_bias_compensation_cancels_the_mean_error_and_lowers_the_output_error():
    x = _samples()
    stats = LayerStats(x.T @ x / len(x), len(x), x.mean(0))
    w = weight(32, 256)
    spec = QuantSpec.of(2, 64)
    plain = solve("gptq", w, stats.hessian, spec).dequantize()
    comp = solve("gptq+bias", w, stats, spec).dequantize()  # solved on the covariance
    delta = compensation(w, comp, stats.mean)
    err_plain = ((x @ (w - plain).T) ** 2).mean()
    out = x @ (w - comp).T - delta
    assert out.mean(0).abs().max() < 1e-4  # no mean error left
    assert (out ** 2).mean() < 0.95 * err_plain  # 8 % lower here: GPTQ on H already weighs the mean


def test_bias_bits_are_counted():
    plain, biased = Candidate(QuantSpec(3, 64), "gptq"), Candidate(QuantSpec(3, 64), "gptq+bias")
    assert biased.storage_bits(10, 128) == plain.storage_bits(10, 128) + 10 * 16
    assert plain.storage_bits(10, 128, has_bias=True) == biased.storage_bits(10, 128, has_bias=True)
    lp = layer_costs("l", 10, 128, [plain, biased])
    assert lp.bits[1] - lp.bits[0] == 160


def test_bias_compensated_model_saves_and_loads_exactly(tiny_model, calib_ids, tiny_tokenizer, tmp_path):
    names = adapter_for(tiny_model).layer_names(tiny_model)
    spec = QuantSpec.of(2, 32)
    plan = Plan({n: Candidate(spec, "gptq+bias" if "mlp" in n else "gptq") for n in names})
    model = copy.deepcopy(tiny_model)
    pack_model(model, apply_plan(model, calib_ids, plan))
    for n in names:
        assert (model.get_submodule(n).bias is not None) == ("mlp" in n)
    bits, weights = block_linear_bits(model)
    shapes = {n: tuple(tiny_model.get_submodule(n).weight.shape) for n in names}
    assert bits == sum(plan.layers[n].storage_bits(*shapes[n]) for n in names)
    save_quantized(model, tiny_tokenizer, plan, tmp_path / "q", {"source": "tiny"}, {})
    loaded = mixq.load(tmp_path / "q")
    ids = random_ids(2, 32, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bias_lowers_the_models_error_at_low_bits(tiny_model, calib_ids):
    """On the tiny model's own calibration windows, the compensated model's logits are closer to the float's."""
    names = adapter_for(tiny_model).layer_names(tiny_model)
    with torch.no_grad():
        ref = tiny_model(calib_ids).logits
    errs = {}
    for solver in ("gptq", "gptq+bias"):
        model = copy.deepcopy(tiny_model)
        apply_plan(model, calib_ids, Plan({n: Candidate(QuantSpec.of(2, 64), solver) for n in names}))
        with torch.no_grad():
            errs[solver] = float(((model(calib_ids).logits - ref) ** 2).mean())
    assert errs["gptq+bias"] < errs["gptq"], errs


@pytest.mark.parametrize("estimator", ["fisher", "kl"])
def test_allocation_takes_bias_candidates_and_stays_within_budget(tiny_model, calib_ids, estimator):
    """Bias candidates are profiled on the error they leave (the measured estimator runs the model with the
    compensated bias), cost their bias's bits, and the allocation keeps the budget."""
    model = copy.deepcopy(tiny_model)
    result = run(model, calib_ids, QuantizeConfig(budget=Budget(bits=3.0), solvers=("gptq", "gptq+bias"),
                                                  formats=tuple(QuantSpec.of(b, 32) for b in (2, 3, 4)),
                                                  estimator=estimator, tables=False))
    bits, weights = block_linear_bits(model)
    assert bits / weights <= 3.0 + 1e-9
    for lp in result.profile.layers:  # the bias candidates are profiled, on the error they leave, and cost more
        k = {c.name: i for i, c in enumerate(lp.candidates)}
        assert lp.bits[k["gptq+bias:int2-g32-asym"]] == lp.bits[k["gptq:int2-g32-asym"]] + 16 * lp.rows
    plain = sum(lp.damage[[c.name for c in lp.candidates].index("gptq:int2-g32-asym")] for lp in result.profile.layers)
    comp = sum(lp.damage[[c.name for c in lp.candidates].index("gptq+bias:int2-g32-asym")]
               for lp in result.profile.layers)
    assert comp < plain


def test_profiling_judges_a_chain_without_its_descent_and_the_apply_runs_it(tiny_model, calib_ids):
    """comq is left out of profiling (Chain.profiled): a comq chain's damages equal its base solver's; applying
    the chain still runs it, so the applied weights differ from the base solver's."""
    from mixq.profile import profile_model

    assert Chain.parse("gptq-act+comq+bias").profiled() == Chain.parse("gptq-act+bias")
    assert Chain.parse("comq").profiled() == Chain("clip")
    names = adapter_for(tiny_model).layer_names(tiny_model)
    spec = QuantSpec.of(2, 32)
    damages = {}
    for solver in ("gptq-act", "gptq-act+comq"):
        prof = profile_model(copy.deepcopy(tiny_model), calib_ids, [Candidate(spec, solver)])
        damages[solver] = [lp.damage[0] for lp in prof.layers]
    assert damages["gptq-act"] == damages["gptq-act+comq"]
    weights = {}
    for solver in ("gptq-act", "gptq-act+comq"):
        model = copy.deepcopy(tiny_model)
        apply_plan(model, calib_ids, Plan({n: Candidate(spec, solver) for n in names}))
        weights[solver] = model.get_submodule(names[0]).weight
    assert not torch.equal(weights["gptq-act"], weights["gptq-act+comq"])


@pytest.mark.parametrize("spec", [QuantSpec.of(2, 32, "min", 6), QuantSpec.of(3, 16, "sym", 6, 256)],
                         ids=lambda s: s.name)
def test_double_quantized_grids_are_refitted_on_their_steps(hessian, spec):
    """Scale (and minimum) codes move too, on the steps the first solver fixed: less error than moving the
    weights' codes alone, and the steps are unchanged."""
    from mixq.formats import QuantizedTensor, decode_scales

    w = weight(16, 512)
    base = solve("gptq-act", w, hessian, spec)
    refined = solve("gptq-act+comq", w, hessian, spec)
    assert torch.equal(refined.steps, base.steps) and not torch.equal(refined.scales, base.scales)
    h = damped(hessian)  # as refine_stored
    s, z = decode_scales(base.scales, base.zeros, base.steps, spec.grid, spec.scale_bits)
    q, _, _ = coordinate_descent(w, h, base.codes.float(), s.float(), z.float(),
                                 torch.full((16, 1), float(spec.maxq)), spec.grid, refit=False)
    codes_only = QuantizedTensor(q.to(torch.uint8), base.scales, base.zeros, spec, base.steps).dequantize()
    assert float(output_error(w, refined.dequantize(), hessian).sum()) < \
        0.99 * float(output_error(w, codes_only, hessian).sum())
