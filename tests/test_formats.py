"""The reference grid (formats.quantize / dequantize) and exact bit accounting against the packed buffers."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.formats import BITS, GROUP_SIZES, MIN_BITS, SCALE_BITS, QuantSpec, dequantize, grids_for, quantize
from mixq.runtime.qlinear import QuantEmbedding, QuantLinear

SPECS = [QuantSpec.of(b, g, k) for b, g in itertools.product((2, 3, 4, 5, 6, 8), (32, 64, 0)) for k in grids_for(b)] + [
    QuantSpec.of(b, g, k, sb) for b, g, k, sb in itertools.product((2, 4, 8), (32, 0), ("sym", "min"), (4, 6, 8))] + [
    QuantSpec.of(3, 16, "sym", 6, 256), QuantSpec.of(6, 16, "sym", 8, 256), QuantSpec.of(4, 32, "min", 6, 256),
    QuantSpec.of(3, 32, "nf", 6), QuantSpec.of(4, 32, "iq4nl", 6, 256), QuantSpec.of(4, 32, "kmin", 6, 256),
    QuantSpec.of(2, 16, "kmin", 4, 256), QuantSpec.of(5, 32, "kmin", 6), QuantSpec.of(3, 32, "lk", 6)]
# float32 slack on top of the half-step bound: |w| · a few ulps
REL_EPS = 1e-6


def _width(spec: QuantSpec, groups: int, whole_row: int = 48) -> int:
    """A row width that `spec` fits: `groups` groups (super-blocks where it has them; else rows of `whole_row`)."""
    if spec.super_block:
        return spec.super_block * groups
    return spec.group_size * groups if spec.group_size else whole_row * groups


def _weights(seed: int, rows: int, cols: int, magnitude: float, outliers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    if outliers:  # a few large weights, as real layers have
        idx = torch.randint(0, rows * cols, (max(1, rows * cols // 50),), generator=g)
        w.view(-1)[idx] *= 8
    return w


def _grid_bounds(qt):
    """Per-element lowest and highest representable values of each element's group, and the (signed) scale."""
    rows, cols = qt.codes.shape
    g = qt.spec.group(cols)
    scales, zeros = qt.grid_values()
    s = scales.float().repeat_interleave(g, dim=1)
    z = zeros.float().repeat_interleave(g, dim=1)
    if qt.spec.minimum:  # q·s + m
        return z, z + qt.spec.maxq * s, s
    levels = qt.levels()
    if levels is not None:  # L[q]·s
        a, b = levels[0] * s, levels[-1] * s
    else:
        a, b = -z * s, (qt.spec.maxq - z) * s
    return torch.minimum(a, b), torch.maximum(a, b), s


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), groups=st.integers(1, 3),
       magnitude=st.sampled_from([0.02, 1.0, 30.0]), outliers=st.booleans())
def test_round_trip_error_is_at_most_half_a_step(spec, seed, rows, groups, magnitude, outliers):
    cols = _width(spec, groups)
    w = _weights(seed, rows, cols, magnitude, outliers)
    qt = quantize(w, spec)

    assert qt.codes.shape == (rows, cols) and qt.codes.dtype == torch.uint8
    ngroups = cols // spec.group(cols)
    assert qt.scales.shape == (rows, ngroups) and qt.zeros.shape == (rows, ngroups)
    if spec.double:  # codes of the scales (and minima), fp16 steps per row
        assert qt.scales.dtype == torch.uint8 and int(qt.scales.max()) < 1 << spec.scale_bits
        assert qt.zeros.dtype == torch.uint8
        per_row = (2 if spec.minimum else 1) * spec.steps_per_row(cols)
        assert qt.steps.dtype == torch.float16 and qt.steps.shape == (rows, per_row)
    else:
        assert qt.scales.dtype == torch.float16
        assert qt.zeros.dtype == (torch.float16 if spec.minimum else torch.uint8)
    assert int(qt.codes.max()) <= spec.maxq
    scales, zeros = qt.grid_values()
    if spec.grid == "int":
        assert int(qt.zeros.max()) <= spec.maxq
    if spec.symmetric:
        assert torch.all(zeros == 1 << (spec.bits - 1))
    if qt.levels() is not None:
        assert torch.all(zeros == 0)
    assert torch.all(scales != 0) and torch.all(torch.isfinite(scales))
    if not spec.grid_type.signed_scale:
        assert torch.all(scales > 0)

    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    # the dequantized values are exactly (q - z)·s, q·s + m, or L[q]·s
    lo, hi, scale = _grid_bounds(qt)
    z = zeros.float().repeat_interleave(spec.group(cols), 1)
    levels = qt.levels()
    if levels is not None:
        expected = levels[qt.codes.long()] * scale
        step = scale.abs() * float((levels[1:] - levels[:-1]).max())  # the widest gap between two levels
    else:
        expected = qt.codes.float() * scale + z if spec.minimum else (qt.codes.float() - z) * scale
        step = scale.abs()
    assert torch.equal(deq, expected)

    err = (w - deq).abs()
    slack = REL_EPS * (w.abs() + lo.abs() + hi.abs()) + 1e-12
    # round to nearest: any weight within half a step of the grid's ends is at most half a step from a point
    inside = (w >= lo - step / 2) & (w <= hi + step / 2)
    assert torch.all(err[inside] <= step[inside] / 2 + slack[inside]), float((err - step / 2)[inside].max())
    # clipped weights lie just outside the grid: never more than one step away from it (double quantization may
    # round a scale down, by up to half a step of the scales: test_double_quantization covers it)
    # (the fp16 rounding of a symmetric scale may leave the opposite extreme a hair over one step from code maxq)
    # (a learned grid's lowest level sits where its weights are: those below are clipped by design, as its fit
    # minimises the weighted error instead; test_grids checks the fit)
    if not spec.double and not spec.grid_type.learned:
        assert torch.all(err <= step + slack + w.abs() * 2.0 ** -10)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.grid == "int"], ids=lambda s: s.name)
def test_round_trip_is_exact_on_grid_points(spec):
    """Weights that already lie on a grid spanning their range come back bit for bit."""
    cols, rows = spec.group_size or 40, 3  # one group per row
    g = torch.Generator().manual_seed(spec.bits * 1000 + cols)
    codes = torch.randint(0, spec.maxq + 1, (rows, cols), generator=g)
    codes[:, 0], codes[:, 1] = 0, spec.maxq  # span the full range so min/max fitting finds the same grid
    zero = spec.maxq // 3
    scale = 0.125  # a power of two: exact in fp16 and in every product
    w = (codes.float() - zero) * scale
    qt = quantize(w, spec)
    assert torch.equal(qt.codes, codes.to(torch.uint8))
    assert torch.all(qt.zeros == zero)
    assert torch.equal(qt.dequantize(), w)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@settings(max_examples=6)
@given(rows=st.integers(1, 9), groups=st.integers(1, 3), seed=st.integers(0, 1000))
def test_storage_bits_equal_packed_bytes(spec, rows, groups, seed):
    cols = _width(spec, groups, 8) + (0 if spec.group_size else 3)  # odd widths for whole-row groups
    qt = quantize(_weights(seed, rows, cols, 1.0, False), spec)
    layer = QuantLinear.from_quantized(qt)
    packed_bits = sum(b.numel() * b.element_size() * 8 for b in layer.buffers())
    assert spec.storage_bits(rows, cols) == packed_bits
    assert spec.bits_per_weight(rows, cols) == pytest.approx(packed_bits / (rows * cols), rel=1e-12)
    # and the layer computes exactly with the reference weight
    assert torch.equal(layer.weight_float(), qt.dequantize())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@settings(max_examples=4)
@given(rows=st.integers(1, 40), groups=st.integers(1, 3), seed=st.integers(0, 1000))
def test_embedding_lookup_reads_the_rows_of_the_packed_table(spec, rows, groups, seed):
    """A lookup dequantizes only the rows it needs, read in place from the packing (odd widths and row counts,
    rows that straddle bytes), and equals the reference; the tied head computes with the same buffers."""
    cols = _width(spec, groups, 8) + (0 if spec.group_size else 3)
    qt = quantize(_weights(seed, rows, cols, 1.0, False), spec)
    table = QuantEmbedding.from_quantized(qt)
    ids = torch.randint(0, rows, (2, 7), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(table(ids), qt.dequantize()[ids])
    head = table.tied_head()
    assert all(a is b for a, b in zip(head.buffers(), table.buffers()))
    x = torch.randn(3, cols)
    torch.testing.assert_close(head(x), x @ qt.dequantize().T, rtol=1e-4, atol=1e-4)  # the kernel sums in its order


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.double], ids=lambda s: s.name)
def test_storage_bits_formula(spec):
    """Large aligned layer (no padding): bits + (16 + zero bits) / group per weight, as the README states."""
    rows, cols = 64, 192
    group = spec.group(cols)
    zero_bits = {"sym": 0, "int": spec.bits, "min": MIN_BITS}.get(spec.grid, 0)  # level grids store no zero
    levels = (1 << spec.bits) * 16 if spec.grid_type.learned else 0  # a learned grid's own fp16 levels, a layer
    assert spec.storage_bits(rows, cols) == pytest.approx(rows * cols * (spec.bits + (SCALE_BITS + zero_bits) / group)
                                                          + levels)


def test_readme_example_bits_per_weight():
    # "3-bit, group 192, asymmetric: 3 + (16 + 3)/192 = 3.099 bits per weight"
    assert round(QuantSpec(3, 192).bits_per_weight(576, 576), 3) == 3.099


@pytest.mark.parametrize("bits", [0, 1, 7, 9, 16, -4])
def test_spec_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits)


@pytest.mark.parametrize("group", [1, 8, 48, 100, 512, -32])
def test_spec_rejects_bad_group_sizes(group):
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, group)


def test_spec_is_frozen_and_named():
    spec = QuantSpec(3, 64, True)
    with pytest.raises(Exception):
        spec.bits = 4  # type: ignore[misc]
    assert spec.name == "int3-g64-sym"
    assert QuantSpec(4).name == "int4-row-asym"


def test_fits():
    assert not QuantSpec(4, 128).fits(576)
    assert QuantSpec(4, 64).fits(576)
    assert QuantSpec(4, 192).fits(576)
    assert QuantSpec(4, 0).fits(577)
    assert QuantSpec(4, 0).group(577) == 577
    with pytest.raises(ValueError, match="does not fit"):
        QuantSpec(4, 128).storage_bits(10, 576)
    with pytest.raises(ValueError, match="does not fit"):
        quantize(torch.zeros(2, 576), QuantSpec(4, 128))
    with pytest.raises(ValueError, match="does not fit"):
        QuantLinear(576, 8, QuantSpec(4, 128))


@given(cols=st.integers(1, 2000), group=st.sampled_from((0,) + GROUP_SIZES))
def test_fits_means_groups_divide(cols, group):
    spec = QuantSpec(4, group)
    assert spec.fits(cols) == (group == 0 or cols % group == 0)


def test_spec_dict_round_trip_and_unknown_keys():
    for b, g, s in itertools.product(BITS, (0,) + GROUP_SIZES, (False, True)):
        spec = QuantSpec(b, g, s)
        assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown"):
        QuantSpec.from_dict({"bits": 4, "group_size": 64, "symmetric": False, "scheme": "x"})


def test_quantize_reference_example():
    """Pins the grid by hand: asymmetric min/max with the range stretched to include 0, rounded zero, fp16 scale."""
    w = torch.tensor([[-0.7, 2.3, 0.2, 1.6]])
    qt = quantize(w, QuantSpec(2, 0))  # lo -0.7, hi 2.3: scale 1.0, zero round(0.7) = 1
    assert qt.scales.tolist() == [[1.0]] and qt.zeros.tolist() == [[1]]
    assert qt.codes.tolist() == [[0, 3, 1, 3]]
    assert qt.dequantize().tolist() == [[-1.0, 2.0, 0.0, 2.0]]

    w = torch.tensor([[0.5, 1.5, 3.0, 1.0]])  # all positive: the grid still starts at 0
    qt = quantize(w, QuantSpec(2, 0))
    assert qt.scales.tolist() == [[1.0]] and qt.zeros.tolist() == [[0]]
    assert qt.codes.tolist() == [[0, 2, 3, 1]]  # round half to even: 0.5 → 0, 1.5 → 2

    # symmetric: zero 2^(bits-1) = 2, scale −(signed extreme)/2 so that the extreme lands on code 0
    w = torch.tensor([[-1.5, 0.75, 1.5, -0.2]])  # the first of the largest magnitudes is -1.5: scale 0.75
    qt = quantize(w, QuantSpec(2, 0, True))
    assert qt.scales.tolist() == [[0.75]] and qt.zeros.tolist() == [[2]]
    assert qt.codes.tolist() == [[0, 3, 3, 2]]  # -2 + 2; 1 + 2; 2 + 2 = 4 clipped to 3; -0.27 → 0 + 2
    assert qt.dequantize().tolist() == [[-1.5, 0.75, 0.75, 0.0]]

    w = torch.tensor([[0.2, -1.0, 2.0, 0.5]])  # positive extreme: the scale is negative, 2.0 → code 0
    qt = quantize(w, QuantSpec(2, 0, True))
    assert qt.scales.tolist() == [[-1.0]] and qt.codes.tolist() == [[2, 3, 0, 2]]
    assert qt.dequantize().tolist() == [[0.0, -1.0, 2.0, -0.0]]


def test_dequantize_matches_definition():
    codes = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0], [1.0, 0.25]], dtype=torch.float16)
    zeros = torch.tensor([[1, 2], [0, 3]], dtype=torch.uint8)
    got = dequantize(codes, scales, zeros, 2)
    want = torch.tensor([[-0.5, 0.0, 0.0, 2.0], [3.0, 2.0, -0.5, -0.75]])
    assert torch.equal(got, want)


def test_constant_and_zero_rows_do_not_divide_by_zero():
    for spec in (QuantSpec(4, 32), QuantSpec(3, 0, True)):
        w = torch.zeros(2, 64)
        w[1] = 0.75
        deq = quantize(w, spec).dequantize()
        assert torch.isfinite(deq).all()
        step = quantize(w, spec).scales.float().max()
        assert torch.all((deq - w).abs() <= step)


def test_padding_is_counted():
    # 3 rows × 5 cols = 15 codes pad to 16; 3 groups of zeros pad to 8
    spec = QuantSpec(3, 0)
    assert spec.storage_bits(3, 5) == 16 * 3 + 3 * 16 + 8 * 3
    assert math.isclose(QuantSpec(8, 0, True).storage_bits(1, 1), 8 * 8 + 16)


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_min_grid_reproduces_a_ggml_q4_1_style_block_exactly(bits):
    """Weights stored as q·d + m (llama.cpp's Q4_1 / Q5_1, any fp16 m) come back bit for bit on a "min" grid,
    which an integer zero cannot do: its offset is a multiple of the step."""
    spec = QuantSpec.of(bits, 32, "min")
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, spec.maxq + 1, (4, 32), generator=g)
    codes[:, 0], codes[:, 1] = 0, spec.maxq
    d = torch.tensor([[0.0123], [0.5], [0.002], [1.75]]).half().float()
    m = torch.tensor([[-0.0917], [0.31], [-0.0051], [-9.3]]).half().float()
    w = codes.float() * d + m
    qt = quantize(w, spec)
    assert torch.equal(qt.codes, codes.to(torch.uint8))
    assert torch.equal(qt.dequantize(), w)
    assert float((quantize(w, QuantSpec.of(bits, 32, "int")).dequantize() - w).abs().max()) > 0


def test_min_spec_accounting_and_names():
    spec = QuantSpec.of(4, 32, "min")
    assert spec.name == "int4-g32-min" and spec.minimum and not spec.symmetric
    assert spec.bits_per_weight(576, 576) == 5.0  # llama.cpp's Q4_1: 4 + (16 + 16) / 32
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="not both"):
        QuantSpec(4, 32, True, True)
    with pytest.raises(ValueError, match="grid"):
        QuantSpec.of(4, 32, "float")


@pytest.mark.parametrize("grid", ["sym", "min"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_double_quantization(grid, bits):
    """At 2–4 bits, scale (and minimum) codes cost little: 8-bit codes within 2 % of fp16 scales' weight error,
    6-bit within 5 %, 4-bit within 25 %. At 8 bits the weight step is so fine that the scale's rounding shows
    (narrower codes, larger error)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 192, generator=g) * torch.rand(64, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)

    def err(sb):
        return float(((quantize(w, QuantSpec.of(bits, 32, grid, sb)).dequantize() - w) ** 2).sum())

    base = err(16)
    if bits <= 4:
        assert err(8) <= 1.02 * base and err(6) <= 1.05 * base and err(4) <= 1.25 * base
    else:
        assert base < err(8) < err(6) < err(4)


def test_double_quantized_spec():
    spec = QuantSpec.of(4, 32, "min", 6)
    assert spec.name == "int4-g32-min-dq6" and spec.double
    # codes 4 + scale and minimum codes 2 · 6 / 32 + two fp16 steps per row of 576
    assert spec.bits_per_weight(576, 576) == pytest.approx(4 + 12 / 32 + 32 / 576)
    assert QuantSpec.of(3, 32, "sym", 4).bits_per_weight(576, 576) == pytest.approx(3 + 4 / 32 + 16 / 576)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="scale_bits"):
        QuantSpec.of(4, 32, "min", 5)
    with pytest.raises(ValueError, match="without an integer zero"):
        QuantSpec.of(4, 32, "int", 6)


def test_k_quant_super_blocks_cost_what_ggml_stores():
    """sym 3 bits, groups of 16, 6-bit scale codes, one fp16 step per 256 weights: Q3_K's 110 bytes per 256
    weights (3.4375 bpw); sym 6 bits with 8-bit codes: Q6_K's 210 bytes (6.5625)."""
    assert QuantSpec.of(3, 16, "sym", 6, 256).bits_per_weight(576, 1536) == 110 * 8 / 256
    assert QuantSpec.of(6, 16, "sym", 8, 256).bits_per_weight(576, 1536) == 210 * 8 / 256
    assert not QuantSpec.of(3, 16, "sym", 6, 256).fits(576)  # 576 = 2.25 super-blocks
    with pytest.raises(ValueError, match="super_block"):
        QuantSpec.of(3, 16, "sym", 16, 256)  # fp16 scales have no steps
    with pytest.raises(ValueError, match="do not divide"):
        QuantSpec.of(3, 192, "sym", 6, 256)
    spec = QuantSpec.of(3, 16, "sym", 6, 256)
    assert QuantSpec.from_dict(spec.to_dict()) == spec and spec.name == "int3-g16-sym-dq6-s256"


def test_super_block_steps_follow_each_super_block():
    """A row whose halves differ 100× in scale: per-super-block steps keep the small half's scales fine, where
    one step per row would round them to a few codes."""
    w = torch.cat([torch.randn(4, 256) * 0.01, torch.randn(4, 256)], 1)
    per_block = quantize(w, QuantSpec.of(3, 16, "sym", 6, 256))
    per_row = quantize(w, QuantSpec.of(3, 16, "sym", 6))
    assert per_block.steps.shape == (4, 2) and per_row.steps.shape == (4, 1)
    small = slice(0, 256)
    err_block = (per_block.dequantize() - w)[:, small].pow(2).sum()
    err_row = (per_row.dequantize() - w)[:, small].pow(2).sum()
    assert err_block < 0.5 * err_row
