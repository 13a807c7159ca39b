"""Solvers on correlated inputs: GPTQ beats RTN on the layer-output error, clip never loses to RTN on its own
objective, and every registered solver returns codes, scales and zeros of the right shapes and ranges."""
from __future__ import annotations

import pytest
import torch

from mixq.capture import LayerStats
from mixq.formats import QuantizedTensor, QuantSpec, grids_for, quantize
from mixq.grids import GRIDS, grid_of
from mixq.solvers import SOLVERS, Rows, Solver, output_error, register, solve

# every solver that can start a chain on the grids of one scale a group (a grid's own solver: its own tests)
STARTERS = sorted(n for n, s in SOLVERS.items() if s.starts and n not in {g.solver for g in GRIDS.values()})

ROWS, COLS, TOKENS = 32, 320, 2048  # more columns than GPTQ's lazy block of 128: updates cross blocks


def correlated_hessian(cols: int = COLS, seed: int = 0) -> torch.Tensor:
    """H = XᵀX / n for X = Z A: strongly correlated input features, as in real layers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(TOKENS, cols, generator=g)
    a = torch.randn(cols, cols, generator=g) / cols**0.5
    a += torch.diag(torch.rand(cols, generator=g) * 3)  # uneven feature scales
    x = z @ a
    return x.T @ x / TOKENS


def weight(rows: int = ROWS, cols: int = COLS, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture(scope="module")
def hessian():
    return correlated_hessian()


def _err(name: str, w, h, spec) -> float:
    qt = solve(name, w, h, spec)
    return float(output_error(w, qt.dequantize(), h).sum())


@pytest.mark.parametrize("spec", [QuantSpec(3, 64), QuantSpec(2, 0), QuantSpec(4, 32, True),
                                  QuantSpec.of(3, 64, "min"), QuantSpec.of(3, 64, "nf"), QuantSpec.of(4, 32, "iq4nl")],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("name", ["gptq", "gptq-act"])
def test_gptq_beats_rtn_on_output_error(hessian, spec, name):
    """GPTQ fits its grids as clip does, then spreads each column's error over the rest: it must beat both."""
    w = weight()
    rtn, clip, gptq = (_err(n, w, hessian, spec) for n in ("rtn", "clip", name))
    assert gptq < 0.7 * rtn, (gptq, rtn)
    assert gptq < 0.9 * clip, (gptq, clip)


@pytest.mark.parametrize("spec", [QuantSpec(3, 64), QuantSpec.of(2, 32, "min"), QuantSpec.of(3, 32, "sym", 6)],
                         ids=lambda s: s.name)
def test_searched_grids_beat_the_published_gptqs_min_max_grids(hessian, spec):
    """gptq-plain is GPTQ as published (act-order, min/max grids): mixq's gptq-act, the same algorithm with
    searched grids, must leave less output error."""
    from mixq.solvers.gptq import PUBLISHED_DAMP, gptq_quantize

    w = weight()
    w[::3, 7] = 0.5  # outliers in a third of the rows stretch the min/max grids of their groups
    out = gptq_quantize(w, hessian, spec.group(COLS), torch.full((ROWS,), spec.bits), spec.grid, act_order=True,
                        scale_bits=spec.scale_bits, damp=PUBLISHED_DAMP)  # the damping alike: the grids alone differ
    searched = QuantizedTensor(*out[:3], spec, out[3])
    plain = solve("gptq-plain", w, hessian, spec)
    assert float(output_error(w, searched.dequantize(), hessian).sum()) < \
        0.95 * float(output_error(w, plain.dequantize(), hessian).sum())  # 0.62–0.92 here


def test_output_error_is_the_expected_squared_output_error(hessian):
    """output_error(W, Ŵ, H) = E‖(W − Ŵ) x‖² per row, checked against the samples H came from."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 16, generator=g)
    h = x.T @ x / x.shape[0]
    w = torch.randn(6, 16, generator=g)
    deq = quantize(w, QuantSpec(2, 0)).dequantize()
    direct = ((x @ (w - deq).T) ** 2).mean(0)
    assert torch.allclose(output_error(w, deq, h), direct, rtol=1e-3)


def _diag_error_per_group(w, deq, h, group):
    d = torch.diagonal(h)
    e = (w - deq) ** 2 * d
    return e.view(w.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("spec", [QuantSpec.of(b, g, k) for b in (2, 3, 4, 8) for g in (32, 0) for k in grids_for(b)],
                         ids=lambda s: s.name)
def test_clip_is_never_worse_than_rtn_under_diag_h(hessian, spec):
    w = weight(seed=2)
    w[0, 3] = 0.6  # an outlier: clipping should pay off somewhere
    group = spec.group(COLS)
    rtn = _diag_error_per_group(w, solve("rtn", w, hessian, spec).dequantize(), hessian, group)
    clip = _diag_error_per_group(w, solve("clip", w, hessian, spec).dequantize(), hessian, group)
    assert torch.all(clip <= rtn * (1 + 1e-5) + 1e-12)
    if spec.bits <= 3:
        assert clip.sum() < rtn.sum(), "at low bits clipping should help somewhere"


def test_rtn_matches_the_reference_quantize(hessian):
    w = weight()
    for spec in (QuantSpec(3, 64), QuantSpec(4, 0, True), QuantSpec(8, 32)):
        got, ref = solve("rtn", w, hessian, spec), quantize(w, spec)
        assert torch.equal(got.codes, ref.codes)
        assert torch.equal(got.scales, ref.scales)
        assert torch.equal(got.zeros, ref.zeros)


def _check(qt: QuantizedTensor, rows: int, cols: int, bits) -> None:
    spec = qt.spec
    ngroups = cols // spec.group(cols)
    assert qt.codes.shape == (rows, cols) and qt.codes.dtype == torch.uint8
    assert qt.scales.shape == (rows, ngroups) and qt.scales.dtype == (torch.uint8 if spec.double else torch.float16)
    assert qt.zeros.shape == (rows, ngroups)
    if spec.double:
        assert qt.scales.dtype == torch.uint8 and qt.zeros.dtype == torch.uint8 and qt.steps.shape[0] == rows
    else:
        assert qt.zeros.dtype == (torch.float16 if spec.minimum else torch.uint8)
    maxq = ((1 << bits) - 1).view(-1, 1) if isinstance(bits, torch.Tensor) else (1 << bits) - 1
    assert torch.all(qt.codes.int() <= maxq)
    scales, zeros = qt.grid_values()
    if spec.grid == "int":
        assert torch.all(zeros.int() <= maxq)
    if spec.symmetric:
        half = (1 << (bits - 1)).view(-1, 1) if isinstance(bits, torch.Tensor) else 1 << (bits - 1)
        assert torch.all(zeros.int() == half)
    assert torch.all(torch.isfinite(scales)) and torch.all(scales != 0)


@pytest.mark.parametrize("name", STARTERS)
@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(3, 64, True), QuantSpec(5, 0), QuantSpec(8, 0, True),
                                  QuantSpec.of(4, 64, "min"), QuantSpec.of(3, 32, "min", 6),
                                  QuantSpec.of(4, 32, "sym", 4), QuantSpec(6, 32), QuantSpec.of(2, 32, "nf"),
                                  QuantSpec.of(3, 64, "nf", 6), QuantSpec.of(4, 32, "iq4nl")], ids=lambda s: s.name)
def test_every_solver_returns_valid_codes(hessian, name, spec):
    w = weight(rows=10)
    qt = solve(name, w, hessian, spec)
    _check(qt, 10, COLS, spec.bits)
    deq = qt.dequantize()
    assert torch.isfinite(deq).all()
    # no solver is wildly worse than the plain grid
    assert float(output_error(w, deq, hessian).sum()) <= 2 * _err("rtn", w, hessian, spec)


@pytest.mark.parametrize("name", STARTERS)
def test_every_solver_handles_per_row_widths(hessian, name):
    """Profiling stacks rows of several widths in one call: each row respects its own width."""
    w = torch.cat([weight(rows=4, seed=s) for s in range(3)])
    for grid in grids_for(4):
        widths = [b for b in (2, 4, 8) if b in grid_of(grid).bits]
        if len(widths) < 2 or grid_of(grid).learned:
            continue  # a grid of one width (iq4nl); a learned grid's levels are the layer's own (test_grids)
        bits = torch.tensor([b for b in widths for _ in range(4)])
        codes, scales, zeros, steps = SOLVERS[name]().solve_rows(w[:4 * len(widths)], LayerStats.of(hessian),
                                                                 Rows(32, bits, grid))
        assert steps is None
        qt = QuantizedTensor(codes, scales, zeros, QuantSpec.of(max(grid_of(grid).bits), 32, grid))
        _check(qt, 4 * len(widths), COLS, bits)
        # each slice equals the single-width solve of the same rows
        for i, b in enumerate(widths):
            alone = solve(name, w[4 * i:4 * i + 4], hessian, QuantSpec.of(b, 32, grid))
            assert torch.equal(codes[4 * i:4 * i + 4], alone.codes)
            assert torch.equal(scales[4 * i:4 * i + 4], alone.scales)


@pytest.mark.parametrize("name", STARTERS)
def test_dead_input_columns(name):
    """Inputs that are always zero (diag H = 0) must not break a solver."""
    h = correlated_hessian(64, seed=3)
    h[:, 5] = 0
    h[5, :] = 0
    w = weight(8, 64)
    qt = solve(name, w, h, QuantSpec(3, 32))
    _check(qt, 8, 64, 3)
    assert torch.isfinite(qt.dequantize()).all()


def test_solve_rejects_a_group_that_does_not_divide(hessian):
    with pytest.raises(ValueError, match="does not fit"):
        solve("rtn", weight(cols=COLS), hessian, QuantSpec(3, 96))


def test_registry():
    assert {"rtn", "clip", "gptq", "comq", "bias"} <= set(SOLVERS)
    with pytest.raises(ValueError, match="unknown solver 'awq-nope'; known: .*gptq"):
        solve("awq-nope", weight(), torch.eye(COLS), QuantSpec(3, 64))
    with pytest.raises(ValueError, match="twice"):
        register(type("Again", (Solver,), {"name": "rtn", "summary": "a second rtn"}))
    with pytest.raises(ValueError, match="summary"):
        register(type("Mute", (Solver,), {"name": "mute"}))
    assert "mute" not in SOLVERS
    assert all(s.summary and (s.starts or s.refines) for s in SOLVERS.values())


def test_solver_help_lists_every_registered_solver():
    from mixq.solvers import help_text

    text = help_text()
    for name, s in SOLVERS.items():
        assert (f"+{name} (" if s.refines and not s.starts else f"{name} (") in text


@pytest.mark.parametrize("grid,bits", [(g, b) for b in (2, 3, 4) for g in grids_for(b)])
def test_least_squares_refit_lowers_the_clip_search_error(bits, grid):
    """Refitting each shrink's scale by weighted least squares finds grids the shrink sweep alone misses."""
    from mixq.solvers.clip import search
    from mixq.formats import quantize_codes

    g = torch.Generator().manual_seed(bits)
    wg = torch.randn(512, 64, generator=g) * torch.rand(512, 1, generator=g)
    imp = torch.rand(512, 64, generator=g) + 0.1
    maxq = torch.full((512, 1), float((1 << bits) - 1))

    def err(refit):
        s, z = search(wg, imp, maxq, grid, refit=refit)
        value = grid_of(grid).value(quantize_codes(wg, s, z, maxq, grid), s, z, maxq)
        return float(((value - wg) ** 2 * imp).sum())

    assert err(True) < 0.999 * err(False)  # a small, steady gain (0.3–1.5 % here)


def test_gptq_reuses_the_inverse_only_for_the_same_statistics(hessian):
    """Profiling solves every format on one layer's statistics: the factor of H⁻¹ they keep (LayerStats.memo) must
    give what a fresh one gives, and other statistics (another H, another damping) must not get it."""
    w = weight()
    spec = QuantSpec(3, 32)
    stats = LayerStats.of(hessian)
    first = solve("gptq", w, stats, spec)
    assert stats.memo  # the factor is kept …
    cached = solve("gptq", w, stats, spec)
    fresh = solve("gptq", w, LayerStats.of(hessian), spec)
    assert torch.equal(first.codes, fresh.codes) and torch.equal(cached.codes, fresh.codes)
    scaled = torch.linspace(0.2, 5, hessian.shape[0]).sqrt()
    other = solve("gptq", w, LayerStats.of(hessian * scaled.outer(scaled)), spec)
    assert not torch.equal(other.codes, first.codes)
    damped = solve("gptq", w, stats, spec, damp=1.0)  # … per damping
    assert torch.equal(damped.codes, solve("gptq", w, LayerStats.of(hessian), spec, damp=1.0).codes)


@pytest.mark.parametrize("spec", [QuantSpec.of(3, 16, "sym", 6, 256), QuantSpec.of(4, 32, "min", 6, 256),
                                  QuantSpec.of(4, 32, "iq4nl", 6, 256), QuantSpec.of(2, 16, "kmin", 4, 256)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("name", STARTERS)
def test_super_block_steps_in_every_solver(name, spec):
    """k-quant layouts (one step per 256 weights of a row): valid codes and steps, each group's scale a code of
    its own super-block's step, and GPTQ still beats RTN on the output error."""
    cols = 512
    h = correlated_hessian(cols)
    w = weight(rows=8, cols=cols)
    w[:, 256:] *= 20  # the two super-blocks of each row need very different steps
    qt = solve(name, w, h, spec)
    _check(qt, 8, cols, spec.bits)
    k = 2 if spec.minimum else 1
    assert qt.steps.shape == (8, 2 * k)
    ds = qt.steps.float().view(8, 2, k)[..., 0]
    assert torch.all(ds[:, 1] > 5 * ds[:, 0])
    if name.startswith("gptq"):
        assert _err(name, w, h, spec) < _err("rtn", w, h, spec)


@pytest.mark.parametrize("name", ["gptq-act", "rtn+comq", "split"])
def test_the_damping_given_reaches_every_solve(hessian, name):
    """gptq, comq's refit and the split rows' update (each after a solver with no damping of its own: rtn) all
    damp H by the damping the solve is given (QuantizeConfig.damp): another damping, another result; the same
    damping again, the same result."""
    from mixq.solvers import gptq as g

    w = weight()
    chain, spec = ("rtn", QuantSpec(3, 64, high=64)) if name == "split" else (name, QuantSpec(3, 64))

    def run(damp):
        return solve(chain, w, hessian, spec, damp=damp).codes
    before = run(0.1)
    assert not torch.equal(run(1.0), before)
    assert torch.equal(run(0.1), before)
    eye = torch.eye(COLS)
    torch.testing.assert_close(g.damped(hessian) - hessian, eye * 0.1 * torch.diagonal(hessian).mean())
    torch.linalg.cholesky(g.damped(torch.zeros(8, 8)))  # an all-zero H still factors
