"""Binary-coding formats (grids.bcq, solvers.bcq, runtime.bcq): the reference decode, the fit's fixed point, the
solver's error feedback, exact bits, the bit planes and the look-up-table kernel against the reference, and a run
that allocates among them."""
from __future__ import annotations

import pytest
import torch

from mixq.formats import QuantSpec, quantize
from mixq.grids.bcq import fit_group, levels_of, nearest, signs
from mixq.plan import Candidate
from mixq.runtime.bcq import BCQLinear, from_planes, to_planes
from mixq.runtime.qlinear import QuantLinear
from mixq.solvers import output_error, solve
from mixq.testing import check_packed_layer, tiny_run_layers


def test_codes_hold_the_signs_and_decode_is_the_signed_sum_of_alphas():
    spec = QuantSpec.from_name("bcq3-row")
    codes = torch.tensor([[0, 7, 5, 2, 1, 3, 6, 4]], dtype=torch.uint8)
    alpha = torch.tensor([[1.0, 0.5, 0.25]])
    from mixq.formats import QuantizedTensor

    qt = QuantizedTensor(codes, alpha.half(), torch.zeros(1, 1, dtype=torch.uint8), spec)
    expected = [sum(a * (1 if (int(q) >> i) & 1 else -1) for i, a in enumerate([1.0, 0.5, 0.25])) for q in codes[0]]
    assert qt.dequantize()[0].tolist() == expected
    assert levels_of(alpha)[0].tolist() == [expected[codes[0].tolist().index(q)] for q in range(8)]  # level q
    assert QuantSpec.from_name("bcq3-g16").storage_bits(4, 64) == 4 * 64 * 3 + 4 * 4 * 3 * 16  # 3 fp16 α a group


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fit_gives_nearest_codes_and_is_close_to_a_least_squares_fixed_point(bits):
    """Each code is its weight's nearest level; one more round (each group's weighted least-squares α for those
    signs, then the nearest codes) gains little; and the fit loses far less than the greedy start."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 64, generator=g) * torch.rand(40, 1, generator=g)
    imp = torch.rand(40, 64, generator=g) + 0.05
    codes, alpha = fit_group(w, imp, bits)

    def error(c, a):
        return float((((w - (signs(c, bits) * a.unsqueeze(1)).sum(-1)) ** 2) * imp).sum())

    lv = levels_of(alpha)
    deq = (signs(codes, bits) * alpha.unsqueeze(1)).sum(-1)
    assert torch.allclose((w - deq).abs(), (w.unsqueeze(-1) - lv.unsqueeze(1)).abs().min(-1).values, atol=1e-6)
    b = signs(codes, bits)
    gram, rhs = torch.einsum("ngi,ng,ngj->nij", b, imp, b), torch.einsum("ngi,ng->ni", b, imp * w)
    ls = torch.linalg.lstsq(gram.double(), rhs.double().unsqueeze(-1)).solution.squeeze(-1).float()
    again = nearest(w, ls)
    assert error(again, ls) > 0.97 * error(codes, alpha)
    assert error(codes, alpha) < 0.9 * error(*fit_group(w, imp, bits, iters=0))


def test_the_solver_s_error_feedback_lowers_the_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    h = x.T @ x / 1024
    for bits in (2, 3):
        spec = QuantSpec.from_name(f"bcq{bits}-g64")
        plain = output_error(w, quantize(w, spec).dequantize(), h).sum()
        fed = output_error(w, solve("bcq", w, h, spec).dequantize(), h).sum()
        assert float(fed) < 0.9 * float(plain), (bits, float(fed), float(plain))


def test_bad_binary_coding_specs_and_candidates_fail_in_one_line():
    with pytest.raises(ValueError, match="stores fp16 scales of its own"):
        QuantSpec.of(2, 64, "bcq", 6)
    with pytest.raises(ValueError, match="takes bits"):
        QuantSpec.of(5, 64, "bcq")
    with pytest.raises(ValueError, match="fitted by its own solver, bcq, not gptq-act"):
        Candidate(QuantSpec.of(2, 64, "bcq"), "gptq-act")
    with pytest.raises(ValueError, match="bcq fits only its own grid's formats, not int3-g64-min"):
        Candidate(QuantSpec.of(3, 64, "min"), "bcq")
    with pytest.raises(ValueError, match="the bcq solver fits them"):
        solve("gptq", torch.randn(4, 64), torch.eye(64), QuantSpec.of(2, 64, "bcq"))
    assert QuantSpec.from_name("bcq2-g64") == QuantSpec.of(2, 64, "bcq")
    assert not QuantSpec.of(2, 0, "bcq").fits(100) and QuantSpec.of(2, 0, "bcq").fits(104)  # planes: 8 columns a byte


@pytest.mark.parametrize("rows,cols,name", [(64, 256, "bcq2-g64"), (61, 192, "bcq3-g32"), (13, 128, "bcq4-g128"),
                                            (9, 64, "bcq2-row")])


def test_bit_planes_and_the_lookup_kernel_compute_the_reference(rows, cols, name, tmp_path):
    """Planes round-trip; the kernel (8 rows at a time, then one by one) equals x · Ŵᵀ for one and several rows of
    x; longer inputs dequantize; the buffers count the format's bits and read back."""
    g = torch.Generator().manual_seed(rows)
    spec = QuantSpec.from_name(name)
    w = torch.randn(rows, cols, generator=g)
    qt = solve("bcq", w, torch.eye(cols) + 0.1, spec)
    assert torch.equal(from_planes(to_planes(qt.codes, spec.bits)), qt.codes)
    layer = QuantLinear.from_quantized(qt, torch.randn(rows, generator=g))
    assert isinstance(layer, BCQLinear)
    assert sum(b.numel() * b.element_size() * 8 for b in layer.buffers()) == spec.storage_bits(rows, cols)
    check_packed_layer(layer, qt.dequantize(), tmp_path)


def test_a_run_allocates_binary_coding_with_its_own_solver(tiny_hf_dir, text_file, tmp_path):
    layers, linears = tiny_run_layers(tiny_hf_dir, text_file, tmp_path / "q", "bcq2-g32,bcq3-g32,bcq4-g32", BCQLinear)
    assert {(v["grid_name"], v["solver"]) for v in layers.values()} == {("bcq", "bcq")}
    assert len(linears) == len(layers)
