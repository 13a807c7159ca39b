"""Level grids (mixq.grids): the tables are the published ones, codes are the nearest level's for rows of several
widths, specs name and serialise them, and NF beats the uniform grid where it should (normal weights)."""
from __future__ import annotations

import pytest
import torch

from mixq.formats import GRIDS, QuantSpec, quantize
from mixq.grids import grid_of
from mixq.grids.iq4nl import KVALUES
from mixq.grids.normal import normal_levels

# bitsandbytes' NF4 (QLoRA, arXiv 2305.14314, appendix E)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def test_nf4_is_bitsandbytes_table():
    torch.testing.assert_close(normal_levels(4), torch.tensor(NF4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normal_levels_span_minus_one_to_one_with_an_exact_zero(bits):
    t = normal_levels(bits)
    assert t.shape == (1 << bits,) and bool((t[1:] > t[:-1]).all())
    assert t[0] == -1 and t[-1] == 1 and bool((t == 0).any())
    assert int((t > 0).sum()) == int((t < 0).sum()) + 1  # the extra level on the positive side, as NF4's


def test_iq4nl_is_ggmls_table():
    assert grid_of("iq4nl").table(4).tolist() == list(KVALUES) and grid_of("iq4nl").bits == (4,)


@pytest.mark.parametrize("grid", [g for g in GRIDS if not grid_of(g).uniform and grid_of(g).solver is None])
def test_codes_are_the_nearest_level_for_rows_of_several_widths(grid):
    g = grid_of(grid)
    widths = [b for b in g.bits for _ in range(3)]
    maxq = torch.tensor([[float((1 << b) - 1)] for b in widths])
    w = torch.randn(len(widths), 64, generator=torch.Generator().manual_seed(0))
    scale, zero = g.fit(w, maxq)
    assert torch.all(zero == 0)
    q = g.encode(w, scale, zero, maxq)
    for i, b in enumerate(widths):
        levels = g.table(b) * scale[i]
        nearest = (w[i, :, None] - levels).abs().argmin(1)  # brute force (ties: the lower level, as encode)
        assert torch.equal(q[i].long(), nearest), (grid, b)
        assert torch.equal(g.value(q[i:i + 1], scale[i:i + 1], zero[i:i + 1], maxq[i:i + 1]), levels[nearest][None])
    # the largest weight of each row lands on the level of largest magnitude: nothing is clipped
    top = w.abs().argmax(1, keepdim=True)
    assert torch.allclose(g.value(q, scale, zero, maxq).gather(1, top), w.gather(1, top), rtol=2e-3)


@pytest.mark.parametrize("grid", [g for g in GRIDS if not grid_of(g).uniform and grid_of(g).solver is None])
def test_small_and_large_inputs_encode_alike_ties_to_the_lower_level(grid):
    """One width: a binary search on small inputs (GPTQ's columns), comparison passes on large ones; both give the
    nearest level, a weight on a midpoint the lower one."""
    from mixq.grids import BUCKETIZE_MAX

    g = grid_of(grid)
    for b in g.bits:
        t = g.table(b)
        mids = (t[1:] + t[:-1]) / 2
        x = torch.cat([mids, torch.randn(200, generator=torch.Generator().manual_seed(b))])
        small = x[:, None]
        large = x.repeat(BUCKETIZE_MAX // len(x) + 1)[:, None]
        one, maxq = torch.ones(1, 1), torch.full((1, 1), float((1 << b) - 1))
        q_small, q_large = g.encode(small, one, 0 * one, maxq), g.encode(large, one, 0 * one, maxq)
        assert small.numel() <= BUCKETIZE_MAX < large.numel()
        assert torch.equal(q_large[:len(x)], q_small)
        assert torch.equal(q_small[:len(mids), 0].long(), torch.arange(len(mids)))  # a midpoint: the lower level
        assert torch.equal(q_small[len(mids):, 0].long(), (x[len(mids):, None] - t).abs().argmin(1))


def test_level_specs_name_serialise_and_count_no_zero():
    nf = QuantSpec.of(4, 64, "nf")
    assert nf.name == "nf4-g64" and nf.grid == "nf" and QuantSpec.from_dict(nf.to_dict()) == nf
    assert nf.bits_per_weight(8, 128) == 4 + 16 / 64  # codes and an fp16 scale a group: no zero
    xs = QuantSpec.of(4, 32, "iq4nl", 6, 256)  # llama.cpp's IQ4_XS layout
    assert xs.name == "iq4nl-g32-dq6-s256" and QuantSpec.from_dict(xs.to_dict()) == xs
    assert xs.bits_per_weight(4, 512) == 4 + 6 / 32 + 16 / 256
    assert "grid_name" not in QuantSpec.of(4, 64, "min").to_dict()  # uniform specs read and write as before


def test_bad_level_specs_fail_in_one_line():
    with pytest.raises(ValueError, match=r"grid nf takes bits \(2, 3, 4\), got 5"):
        QuantSpec.of(5, 32, "nf")
    with pytest.raises(ValueError, match="iq4nl takes bits"):
        QuantSpec.of(3, 32, "iq4nl")
    with pytest.raises(ValueError, match="follow from the grid"):
        QuantSpec(4, 32, True, grid_name="nf")
    with pytest.raises(ValueError, match="grid_name names one of"):
        QuantSpec(4, 32, grid_name="sym")
    with pytest.raises(ValueError, match="stores its scales and minima as codes"):
        QuantSpec.of(4, 32, "kmin")
    with pytest.raises(ValueError, match="grid must be one of"):
        QuantSpec.of(4, 32, "nf9")
    with pytest.raises(ValueError, match="got 'lattice'"):
        QuantSpec.from_dict({"bits": 4, "group_size": 32, "grid_name": "lattice"})


def test_nf4_beats_the_uniform_grid_on_normal_weights_at_equal_bits():
    """NF's levels are the normal's quantiles: on normal weights they lose less than evenly spaced ones at the same
    stored bits (codes + one fp16 scale a group, no zero), and on uniform weights they lose more."""
    g = torch.Generator().manual_seed(1)
    normal, flat = torch.randn(256, 256, generator=g), torch.rand(256, 256, generator=g) * 2 - 1
    nf, sym = QuantSpec.of(4, 64, "nf"), QuantSpec.of(4, 64, "sym")
    assert nf.bits_per_weight(256, 256) == sym.bits_per_weight(256, 256)

    def mse(w, spec):
        return float(((quantize(w, spec).dequantize() - w) ** 2).mean())

    assert mse(normal, nf) < 0.95 * mse(normal, sym)  # 7 % less here
    assert mse(flat, nf) > mse(flat, sym)


def test_formats_by_name_with_the_default_menu():
    from mixq.config import default_specs, parse_formats

    specs = parse_formats("nf3-g64, default ,int4-g32-min-dq6,nf3-g64")
    assert specs[0] == QuantSpec.of(3, 64, "nf") and list(specs[1:]) == default_specs()  # no duplicates
    for spec in default_specs() + [QuantSpec.of(4, 32, "iq4nl", 6, 256), QuantSpec.of(3, 0, "nf")]:
        assert QuantSpec.from_name(spec.name) == spec
    with pytest.raises(ValueError, match="cannot read format 'int3-g64'"):
        QuantSpec.from_name("int3-g64")  # a uniform grid needs its kind


def test_a_run_allocates_among_level_grids(tiny_hf_dir, text_file, tmp_path):
    """--formats reaches the profile and the allocation; the packed model computes what the plan's specs say."""
    import json

    from typer.testing import CliRunner

    import mixq
    from mixq.cli import app
    from mixq.runtime.qlinear import QuantLinear

    res = CliRunner().invoke(app, ["quantize", "--model", tiny_hf_dir, "--calib", text_file, "--eval-windows", "0",
                                   "--calib-windows", "2", "--bits", "3.5", "--formats", "nf3-g32,nf4-g32,iq4nl-g32",
                                   "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "q" / "plan.json").read_text())["layers"]
    plan.pop("model.embed_tokens")  # the table has its own candidates (config.table_candidates)
    grids = {layer.get("grid_name") for layer in plan.values()}
    assert grids <= {"nf", "iq4nl"} and "nf" in grids
    model = mixq.load(tmp_path / "q")
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.spec.grid_name for m in layers)


def _weighted_mse(w, deq, importance):
    return float(((w - deq) ** 2 * importance).sum())


def test_learned_levels_are_a_weighted_k_means_fixed_point():
    """Each free level is the importance-weighted mean of the normalised weights nearest it; the largest is pinned
    at +1 (every group's extreme); the levels are fp16 values, increasing, and stored: 2^bits fp16 a layer."""
    from mixq.grids.learned import fit_levels

    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=g) * torch.rand(1, 128, generator=g)  # uneven columns
    imp = torch.rand(128, generator=g) + 0.1
    levels = fit_levels(w, imp, 64, 3, iters=200)
    assert levels.shape == (8,) and bool((levels[1:] > levels[:-1]).all()) and levels[-1] == 1
    assert torch.equal(levels, levels.half().float())
    wg = w.reshape(-1, 64)
    e = wg.gather(1, wg.abs().argmax(1, keepdim=True))
    x, mass = (wg / e).reshape(-1), (imp.expand(96, 128).reshape(-1, 64) * e ** 2).reshape(-1)
    cell = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)
    for k in range(7):
        mean = float((mass * x)[cell == k].sum() / mass[cell == k].sum())
        assert abs(mean - float(levels[k])) < 2e-3  # to fp16 rounding of the level
    spec = QuantSpec.of(3, 64, "lk")
    assert spec.name == "lk3-g64" and QuantSpec.from_name("lk3-g64") == spec
    assert spec.storage_bits(96, 128) == QuantSpec.of(3, 64, "nf").storage_bits(96, 128) + 8 * 16


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_learned_grid_beats_normal_float_where_weights_are_not_normal(bits):
    """On weights the normal's quantiles do not describe (Laplace, uneven columns), the layer's own levels lose less
    weighted error than NF's at the same codes, with GPTQ and without; never more on normal weights."""
    from mixq.solvers import solve

    g = torch.Generator().manual_seed(bits)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((128, 256))
    x = torch.randn(512, 256, generator=g) * (torch.rand(256, generator=g) * 2 + 0.2)
    h = x.T @ x / 512
    for w, margin in ((laplace, 0.95), (torch.randn(128, 256, generator=g), 1.0)):
        lk, nf = QuantSpec.of(bits, 64, "lk"), QuantSpec.of(bits, 64, "nf")
        for method in ("rtn", "gptq"):
            a, b = solve(method, w, h, lk), solve(method, w, h, nf)
            err = [_weighted_mse(w, q.dequantize(), h.diagonal()) for q in (a, b)]
            assert err[0] < margin * err[1], (method, err)
        assert a.learned_levels is not None and not torch.equal(a.levels(), b.levels())


def test_learned_grid_packs_saves_and_computes_its_own_levels(tmp_path):
    """QuantLinear keeps the layer's levels (a buffer), its kernel and the reference agree, and it reads back."""
    from mixq.runtime.qlinear import QuantLinear
    from mixq.solvers import solve

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 192, generator=g), torch.randn(4, 192, generator=g)
    for name in ("lk3-g64", "lk2-g32-dq6", "lk4-g64-dq6-hi64"):
        qt = solve("gptq-act+comq", w, torch.eye(192) + 0.1, QuantSpec.from_name(name))
        layer = QuantLinear.from_quantized(qt)
        assert torch.equal(layer.levels.float(), qt.learned_levels)
        torch.testing.assert_close(layer(x), x @ qt.dequantize().T, rtol=1e-4, atol=1e-4)
        torch.save(layer.state_dict(), tmp_path / "l.pt")
        back = QuantLinear(192, 48, qt.spec)
        back.load_state_dict(torch.load(tmp_path / "l.pt"))
        assert torch.equal(back.weight_float(), qt.dequantize())
    with pytest.raises(ValueError, match="learned grid holds its levels"):
        type(qt)(qt.codes, qt.scales, qt.zeros, QuantSpec.of(3, 64, "lk"))


def test_a_run_allocates_learned_grids_and_refuses_them_where_they_cannot_go(tiny_hf_dir, text_file, tmp_path):
    """lk formats go through the profile (a fit a layer), the allocation, the apply, the save and the load: the
    loaded model holds each layer's own levels and computes what it was solved to; a plan that gives the table a
    learned grid, and an export that cannot store one, are refused in one line."""
    import json

    from typer.testing import CliRunner

    import mixq
    from mixq.cli import app
    from mixq.runtime.qlinear import QuantLinear

    from mixq.testing import quantize_tiny

    out = tmp_path / "q"
    res = quantize_tiny(tiny_hf_dir, text_file, out, 3.2, "lk3-g32,lk4-g32-dq6,lk2-g32")
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())["layers"]
    assert {layer.get("grid_name") for layer in plan.values()} == {"lk"}
    model = mixq.load(out)
    layers = [m for m in model.model.layers.modules() if isinstance(m, QuantLinear)]
    tables = {tuple(m.levels.tolist()) for m in layers}
    assert len(tables) > 2  # each layer its own
    x = torch.randn(2, layers[0].in_features)
    torch.testing.assert_close(layers[0](x), x @ layers[0].weight_float().T, rtol=1e-4, atol=1e-4)

    plan_path = tmp_path / "bad_plan.json"
    bad = json.loads((out / "plan.json").read_text())
    bad["layers"]["model.embed_tokens"] = {**bad["layers"]["model.layers.0.mlp.up_proj"], "solver": "rtn"}
    plan_path.write_text(json.dumps(bad))
    res = CliRunner().invoke(app, ["quantize", "--model", tiny_hf_dir, "--calib", text_file, "--plan",
                                   str(plan_path), "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "learned grid" in res.output and not (tmp_path / "bad").exists()
    res = CliRunner().invoke(app, ["export", str(out), str(tmp_path / "m.gguf"), "--to", "gguf"])
    assert res.exit_code != 0 and "which no ggml type stores" in res.output and not (tmp_path / "m.gguf").exists()
