"""hqq, the half-quadratic solver: registered and chained like any other, data-free (it runs on a layer with no
statistics: the tables may take it), HQQ's own step, and every group's absolute error no higher than on the min/max
grid it starts from."""
from __future__ import annotations

import copy

import pytest
import torch

from mixq.capture import LayerStats
from mixq.chain import Chain
from mixq.config import QuantizeConfig
from mixq.formats import QuantSpec, fit_params, grids_for, quantize_codes
from mixq.grids import grid_of
from mixq.pipeline import check_plan, run
from mixq.plan import Budget, Candidate, Plan
from mixq.solvers import SOLVERS, solve
from mixq.solvers.hqq import BETA, ITERS, KAPPA, _error, half_quadratic, shrink
from mixq.solvers.rtn import grouped

EMPTY = LayerStats(torch.empty(0, 0), 0)  # a layer no calibration reached


def heavy_tailed(rows=64, cols=256, seed=0) -> torch.Tensor:
    """Weights as in trained layers: mostly small, a few large (a normal over the root of a uniform)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02 / torch.rand(rows, cols, generator=g).clamp(min=0.05).sqrt()


def hqq_offset_only(wg, maxq, iters=ITERS):
    """HQQ's own loop, as mobiusml/hqq's optimize_weights_proximal_legacy runs it (fp32, on the CPU): the offset
    alone moves, the min/max scale stays, and the whole tensor stops at the first step that does not lower the
    mean absolute error (keeping that step's offset, as HQQ does)."""
    scale, zero = fit_params(wg, maxq, "min")
    beta, best = BETA, float("inf")
    for _ in range(iters):
        q = quantize_codes(wg, scale, zero, maxq, "min")
        zero = (q - (wg - shrink(wg - (q - zero) * scale, beta)) / scale).mean(1, keepdim=True)
        beta *= KAPPA
        err = float(((quantize_codes(wg, scale, zero, maxq, "min") - zero) * scale - wg).abs().mean())
        if err >= best:
            break
        best = err
    return scale, -(-zero * scale).half().float() / scale  # stored as fp16, as mixq's "min" grid stores it


def test_hqq_is_a_data_free_registered_solver_that_chains():
    assert SOLVERS["hqq"].needs == frozenset() and SOLVERS["hqq"].starts
    assert Chain.parse("hqq+comq+bias").profiled() == Chain("hqq", ("bias",))
    w = heavy_tailed()
    qt = solve("hqq", w, EMPTY, QuantSpec.of(3, 64, "min", 6))  # no Hessian, no mean: nothing needed
    assert torch.isfinite(qt.dequantize()).all()


def test_shrink_keeps_large_errors_and_drops_small_ones():
    x = torch.tensor([-1.0, -0.01, 0.0, 0.01, 1.0])
    out = shrink(x, BETA)
    assert torch.equal(out[1:4], torch.zeros(3))  # inside the threshold: the loss pulls these to the grid
    assert torch.all(out[[0, 4]].abs() > 0.8) and torch.all(out[[0, 4]].abs() < 1)  # outliers keep most
    assert torch.equal(shrink(-x, BETA), -out)


@pytest.mark.parametrize("grid,bits", [(g, b) for b in (2, 3, 4) for g in grids_for(b) if not grid_of(g).learned])
def test_hqq_lowers_the_absolute_error_of_every_group_below_its_start(grid, bits):  # (lk: the layer's own levels)
    w = heavy_tailed(seed=bits)
    wg, maxq = grouped(w, 64), torch.full((w.numel() // 64, 1), float((1 << bits) - 1))
    start = _error(wg, *fit_params(wg, maxq, grid), maxq, grid)
    scale, zero = half_quadratic(wg, maxq, grid)
    fitted = _error(wg, scale, zero, maxq, grid)
    assert torch.all(fitted <= start)
    if grid == "int":  # HQQ's offset moves by less than a step: an integer zero stays where rtn puts it
        assert torch.equal(zero, fit_params(wg, maxq, grid)[1]) and torch.equal(fitted, start)
    else:
        assert fitted.sum() < 0.99 * start.sum()  # 4–18 % lower here
    if grid_of(grid).zero != "none":  # HQQ moves the offset alone: the scale stays the min/max one
        assert torch.equal(scale, fit_params(wg, maxq, grid)[0])
    deq = solve("hqq", w, EMPTY, QuantSpec.of(bits, 64, grid)).dequantize()
    value = grid_of(grid).value(quantize_codes(wg, scale, zero, maxq, grid), scale, zero, maxq)
    torch.testing.assert_close(deq, value.view_as(w))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_is_hqqs_step_with_a_stop_per_group(bits):
    """With one step, hqq's grid is HQQ's own first step wherever that lowers a group's error; over the whole
    run, keeping each group's best leaves less error in all than HQQ's whole-tensor stop."""
    w = heavy_tailed(seed=10 + bits)
    wg, maxq = grouped(w, 64), torch.full((w.numel() // 64, 1), float((1 << bits) - 1))
    s1, z1 = half_quadratic(wg, maxq, "min", iters=1)
    hs, hz = hqq_offset_only(wg, maxq, iters=1)
    moved = _error(wg, hs, hz, maxq, "min") < _error(wg, *fit_params(wg, maxq, "min"), maxq, "min")
    assert moved.any()
    torch.testing.assert_close(z1[moved], hz[moved])
    ours = _error(wg, *half_quadratic(wg, maxq, "min"), maxq, "min").sum()
    theirs = _error(wg, *hqq_offset_only(wg, maxq), maxq, "min").sum()
    assert ours < theirs  # (a group may differ either way: mixq keeps each step's minimum at fp16, HQQ only the last)


def test_hqq_profiles_applies_and_may_quantize_the_tables(tiny_model, calib_ids):
    config = QuantizeConfig(budget=Budget(bits=3.5), solvers=("hqq",), tables=True,
                            formats=tuple(QuantSpec.of(b, 32, "min") for b in (2, 3, 4, 8)))
    model = copy.deepcopy(tiny_model)
    result = run(model, calib_ids, config)
    assert {str(c.solver) for n, c in result.plan.layers.items() if "layers" in n} == {"hqq"}
    check_plan(tiny_model, Plan({"model.embed_tokens": Candidate(QuantSpec(4, 32), "hqq")}))  # data-free: allowed
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:1]).logits).all()
