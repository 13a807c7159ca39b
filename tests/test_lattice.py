"""Lattice-codebook formats (grids.lattice, solvers.ldlq, runtime.lattice): the codebooks are llama.cpp's, runs go
to their nearest point, LDLQ's feedback lowers the output error, exact bits, the packed indices round-trip and
compute the reference, and a run that allocates among them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq.formats import QuantizedTensor, QuantSpec, quantize
from mixq.grids import lattice
from mixq.grids.lattice import RUN, codebook, coded, fit_code, index_of, nearest, point_of, super_steps
from mixq.plan import Candidate
from mixq.runtime.lattice import LatticeLinear
from mixq.runtime.qlinear import QuantLinear
from mixq.solvers import output_error, solve
from mixq.testing import check_packed_layer, tiny_run_layers


@pytest.mark.parametrize("bits,kind,size", [(2, "IQ2_S", 1024), (3, "IQ3_S", 512)])
def test_codebooks_are_llama_cpp_s_and_decode_is_sign_times_point_times_scale(bits, kind, size):
    import gguf.quants

    points, places, mags = codebook(bits)
    ref = getattr(gguf.quants, kind)
    ref.init_grid()
    assert points.shape == (size, RUN[bits])
    assert np.array_equal(points.numpy(), np.asarray(ref.grid, dtype=np.float32).reshape(ref.grid_shape))
    assert torch.equal(mags[places], points)
    k = torch.tensor([5, size - 1])
    codes = (places[k] * 2 + (torch.arange(2 * RUN[bits]).view(2, -1) % 3 == 0)).view(1, -1).to(torch.uint8)
    scales = torch.tensor([[0.5]]).half()
    qt = QuantizedTensor(codes, scales, torch.zeros(1, 1, dtype=torch.uint8), QuantSpec.of(bits, 0, "iq"))
    signs = torch.where(codes.long() & 1 == 1, -1.0, 1.0)
    assert torch.equal(qt.dequantize(), 0.5 * signs * points[k].reshape(1, -1))
    assert torch.equal(index_of(codes, bits), k.view(1, 2))



@pytest.mark.parametrize("bits", [2, 3])
def test_scale_codes_searched_coarse_to_fine_lose_little_against_every_code(bits, monkeypatch):
    gen = torch.Generator().manual_seed(bits)
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(4.0).sample((64, 256)) * 0.02  # (heavy tails, as trained weights)
    importance = torch.rand(256, generator=gen) + 0.1
    imp = importance.expand(64, 256).reshape(-1, 32)
    step = super_steps(w, importance, 32, bits, 6, 0).repeat_interleave(8, 0).view(-1, 1)

    def error(codes):
        s = step * (2 * codes + 1)
        v = coded(w.reshape(-1, RUN[bits]) / s.repeat_interleave(32 // RUN[bits], 0), bits)[1].view(-1, 32)
        return (imp * (w.reshape(-1, 32) - s * v).square()).sum(1)

    fast = fit_code(w.reshape(-1, 32), imp, bits, step, 6)
    monkeypatch.setattr(lattice, "CODE_STRIDE", 1)
    every = fit_code(w.reshape(-1, 32), imp, bits, step, 6)
    assert torch.equal(fast[1], step * (2 * fast[0] + 1)) and fast[0].min() >= 0 and fast[0].max() <= 63
    assert (error(fast[0]) >= error(every[0]) - 1e-9).all()  # (every code's best is the least)
    assert 0.9 < (fast[0] == every[0]).float().mean() < 1
    assert error(fast[0]).sum() <= 1.01 * error(every[0]).sum()

@pytest.mark.parametrize("bits", [2, 3])
def test_each_run_goes_to_its_nearest_point(bits):
    points = codebook(bits)[0]
    t = torch.randn(300, RUN[bits], generator=torch.Generator().manual_seed(bits)) * points.abs().mean()
    codes, values = coded(t, bits)
    dist = ((t.abs().unsqueeze(1) - points.unsqueeze(0)) ** 2).sum(-1)  # signs free: magnitudes to points
    assert torch.allclose(((t - values) ** 2).sum(-1), dist.min(1).values, rtol=1e-4, atol=1e-3)
    assert torch.equal(values.abs(), points[nearest(t, bits)]) and torch.equal(values < 0, t < 0)
    assert torch.equal(codes & 1 == 1, t < 0)
    rounded = torch.bucketize(t.abs(), (codebook(bits)[2][1:] + codebook(bits)[2][:-1]) / 2)
    on_point = point_of(rounded, bits) >= 0
    assert 0 < on_point.float().mean() < 1  # both of nearest's ways: a run rounded onto a point, and a scored one


def test_bits_are_the_codebook_s_and_bad_specs_fail_in_one_line():
    assert QuantSpec.from_name("iq2-g64").storage_bits(4, 128) == 4 * 128 // 8 * 18 + 4 * 2 * 16  # index + 8 signs
    assert QuantSpec.from_name("iq3-g32").storage_bits(2, 64) == 2 * 64 // 4 * 13 + 2 * 2 * 16  # index + 4 signs
    assert QuantSpec.from_name("iq2-g64").bits_per_weight(1, 576) == 2.5  # as int2-g64-min and bcq2-g64
    with pytest.raises(ValueError, match="takes bits"):
        QuantSpec.of(4, 64, "iq")
    with pytest.raises(ValueError, match="splits no rows"):
        QuantSpec.from_name("iq2-g64-hi8")
    assert QuantSpec.of(2, 64, "iq", 6).name == "iq2-g64-dq6"  # (odd scale codes, a step a row)
    with pytest.raises(ValueError, match="fitted by its own solver, ldlq, not gptq"):
        Candidate(QuantSpec.of(2, 64, "iq"), "gptq")
    with pytest.raises(ValueError, match="ldlq fits only its own grid's formats"):
        Candidate(QuantSpec.of(3, 64, "min"), "ldlq")
    assert not QuantSpec.of(2, 0, "iq").fits(48) and QuantSpec.of(2, 0, "iq").fits(64)  # high bits: 32 weights a byte


@pytest.mark.parametrize("bits", [2, 3])
def test_ldlq_s_feedback_lowers_the_output_error_below_the_scalar_grids_at_the_same_bits(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    h = x.T @ x / 1024
    spec = QuantSpec.from_name(f"iq{bits}-g64")
    plain = float(output_error(w, quantize(w, spec).dequantize(), h).sum())
    fed = float(output_error(w, solve("ldlq", w, h, spec).dequantize(), h).sum())
    scalar = float(output_error(w, solve("gptq", w, h, QuantSpec.from_name(f"int{bits}-g64-min")).dequantize(),
                                h).sum())  # the same bpw: 2.5 and 3.5
    assert fed < 0.9 * plain and fed < 0.9 * scalar, (fed, plain, scalar)


@pytest.mark.parametrize("rows,cols,name", [(64, 256, "iq2-g64"), (7, 192, "iq3-g32"), (5, 64, "iq2-row")])
def test_packed_indices_round_trip_and_compute_the_reference(rows, cols, name, tmp_path):
    g = torch.Generator().manual_seed(rows)
    spec = QuantSpec.from_name(name)
    w = torch.randn(rows, cols, generator=g)
    qt = solve("ldlq", w, torch.eye(cols) + 0.1, spec)
    layer = QuantLinear.from_quantized(qt, torch.randn(rows, generator=g))
    assert isinstance(layer, LatticeLinear)
    assert sum(b.numel() * b.element_size() * 8 for b in layer.buffers()) == spec.storage_bits(rows, cols)
    assert torch.equal(layer.quantized().codes, qt.codes)
    check_packed_layer(layer, qt.dequantize(), tmp_path)


def test_a_run_allocates_lattice_formats_with_their_own_solver(tiny_hf_dir, text_file, tmp_path):
    layers, linears = tiny_run_layers(tiny_hf_dir, text_file, tmp_path / "q", "iq2-g32,iq3-g32,int4-g32-min",
                                      LatticeLinear)
    chosen = [v for v in layers.values() if v.get("grid_name") == "iq"]
    assert chosen and all(v["solver"] == "ldlq" for v in chosen) and len(linears) == len(chosen)


@pytest.mark.parametrize("name", ["iq2-g64", "iq3-g32", "iq2-g16"])
def test_the_kernel_computes_the_reference_and_serves_a_few_rows(name, monkeypatch):
    from mixq.runtime.cpu import kernel

    k = kernel()
    assert k is not None
    g = torch.Generator().manual_seed(1)
    rows, cols = 19, 192
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    qt = quantize(w, QuantSpec.from_name(name))
    layer, deq = QuantLinear.from_quantized(qt), qt.dequantize()
    for n in (1, 3, 8, 13):
        x = torch.randn(n, cols, generator=g)
        ref = x @ deq.T
        y = k.iq_gemv(layer.qweight, layer.qh, layer.signs, layer.scales.float(), codebook(qt.spec.bits)[0], x,
                      qt.spec.group(cols), 10 if qt.spec.bits == 2 else 9)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    calls = []

    class Spy:
        def iq_gemv(self, *args):
            calls.append(args[5].shape[0])
            return k.iq_gemv(*args)

    monkeypatch.setattr("mixq.runtime.qlinear.kernel", lambda: Spy())
    layer(torch.randn(2, cols)), layer(torch.randn(40, cols))
    assert calls == [2]  # the longer input decoded the weight instead


@pytest.mark.parametrize("name,kind,bpw", [("iq2-g16-dq4-s256", "IQ2_S", 2.5625),
                                            ("iq3-g32-dq4-s256", "IQ3_S", 3.4375)])
def test_double_quantized_lattice_formats_are_llama_cpp_s_i_quants_bit_for_bit(name, kind, bpw, tmp_path):
    """IQ2_S and IQ3_S: odd scale codes on a step a super-block; the blocks mixq writes dequantize, by the gguf
    package's reference, to exactly mixq's weights, for the reference fit and for LDLQ; the layer stores the same
    bits and computes them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from mixq.export.gguf import encode_blocks, ggml_type

    spec = QuantSpec.from_name(name)
    assert ggml_type(spec) == kind and spec.bits_per_weight(3, 512) == bpw
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 512, generator=g) * torch.rand(3, 1, generator=g)
    x = torch.randn(256, 512, generator=g)
    for qt in (quantize(w, spec), solve("ldlq", w, x.T @ x, spec)):
        assert qt.steps is not None and int(qt.scales.max()) < 16
        s, _ = qt.grid_values()
        torch.testing.assert_close(s, qt.steps.float().repeat_interleave(256 // qt.spec.group(512), 1)
                                   * (2 * qt.scales.float() + 1))
        blocks = encode_blocks(qt)
        assert blocks.size * 8 == spec.storage_bits(3, 512)
        ref = dequantize(blocks.reshape(-1), getattr(GGMLQuantizationType, kind)).reshape(3, 512)
        assert np.array_equal(ref, qt.dequantize().numpy())
        layer = QuantLinear.from_quantized(qt)
        assert sum(b.numel() * b.element_size() * 8 for b in layer.buffers()) == spec.storage_bits(3, 512)
        check_packed_layer(layer, qt.dequantize(), tmp_path)


def test_a_known_grid_at_a_width_it_does_not_take_is_named_in_one_line():
    for text, grid in (("iq4-g64", "iq takes bits 2, 3"), ("nf5-g64", "nf takes bits 2, 3, 4")):
        with pytest.raises(ValueError, match=f"cannot read format '{text}': grid {grid}$"):
            QuantSpec.from_name(text)


def test_resident_bytes_count_the_decoded_scales_of_every_layout():
    from mixq.eval.speed import resident_bytes

    w = torch.randn(16, 64)
    for name in ("iq2-g32", "bcq2-g32", "int2-g32-min"):
        layer = QuantLinear.from_quantized(quantize(w, QuantSpec.from_name(name)))
        before = resident_bytes(layer)
        layer(torch.randn(1, 64))  # (decodes the scales the kernel reads)
        assert resident_bytes(layer) > before, name
