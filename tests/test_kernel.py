"""The CPU kernel (runtime/csrc/qgemv.cpp) against the reference `dequantize`: every code width, grid, scale
storage and group that divides the row, odd row counts (the last row reads its bytes the careful way) and every
count of rows of x up to past its block of 8."""
from __future__ import annotations

import shutil

import pytest
import torch

import mixq.runtime.qlinear as qlinear
from mixq.formats import QuantSpec, quantize
from mixq.runtime.cpu import kernel
from mixq.runtime.qlinear import QuantLinear

HAVE_COMPILER = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler: QuantLinear uses the reference path")

SPECS = [QuantSpec.of(b, g, grid, sb) for b in (2, 3, 4, 5, 6, 8) for g, grid, sb in
         ((32, "min", 6), (64, "min", 8), (32, "int", 16), (96, "sym", 16), (0, "min", 16), (64, "sym", 4))]
LEVEL_SPECS = [QuantSpec.of(b, g, "nf", sb) for b in (2, 3, 4) for g, sb in ((32, 16), (64, 6))] + [
    QuantSpec.of(4, 32, "iq4nl"), QuantSpec.of(4, 32, "iq4nl", 6, 256),  # level tables: looked up in registers
    QuantSpec.of(4, 32, "kmin", 6, 256), QuantSpec.of(2, 16, "kmin", 4, 256)]  # k-quant minima: subtracted


def _layer(spec: QuantSpec, rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    qt = quantize(w, spec)
    return QuantLinear.from_quantized(qt), qt.dequantize()


def test_the_kernel_builds():
    assert kernel() is not None


@pytest.mark.parametrize("spec", SPECS + LEVEL_SPECS, ids=lambda s: s.name)
def test_kernel_equals_the_reference(spec):
    k = kernel()
    for rows, seed in ((1, 0), (3, 1), (17, 2)):
        cols = 512 if spec.super_block else 192
        layer, w = _layer(spec, rows, cols, seed)
        a, c = layer._group_params()
        for n in (1, 2, 3, 5, 8, 13):
            x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n))
            y = k.qgemv(layer.qweight, a, c, x, spec.bits, spec.group(cols), spec.minimum, layer._levels())
            ref = x @ w.T
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_quantlinear_uses_the_kernel_for_few_rows_and_falls_back(monkeypatch):
    spec = QuantSpec.of(3, 64, "min", 6)
    layer, w = _layer(spec, 40, 192, 5)
    layer.bias = torch.nn.Parameter(torch.randn(40))
    calls = []
    real = kernel()

    class Spy:
        def qgemv(self, *args):
            calls.append(args[3].shape[0])
            return real.qgemv(*args)

        def dequant(self, *args):
            calls.append("dequant")
            return real.dequant(*args)

    monkeypatch.setattr(qlinear, "kernel", lambda: Spy())
    with torch.no_grad():
        for shape in ((192,), (1, 1, 192), (2, 4, 192), (3, 9, 192)):
            x = torch.randn(*shape)
            torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-4)
    assert calls == [1, 1, 8, "dequant"]  # 27 rows: the kernel decodes the weight, torch multiplies
    odd, w_odd = _layer(QuantSpec.of(4, 0, "min"), 5, 203, 6)  # rows not in runs of 8: the reference path
    x = torch.randn(1, 203)
    torch.testing.assert_close(odd(x), x @ w_odd.T, rtol=1e-5, atol=1e-4)
    assert calls == [1, 1, 8, "dequant"]
    monkeypatch.setattr(qlinear, "kernel", lambda: None)  # no compiler: the reference path, same numbers
    x = torch.randn(1, 192)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-4)


def test_decoded_group_params_follow_new_buffers():
    spec = QuantSpec.of(4, 32, "min", 6)
    first, _ = _layer(spec, 8, 64, 1)
    second, w2 = _layer(spec, 8, 64, 2)
    x = torch.randn(1, 64)
    first(x)  # decodes and keeps (a, c)
    first.load_state_dict(second.state_dict())
    torch.testing.assert_close(first(x), x @ w2.T, rtol=1e-5, atol=1e-5)


def test_kernel_on_k_quant_super_blocks():
    k = kernel()
    for spec in (QuantSpec.of(3, 16, "sym", 6, 256), QuantSpec.of(6, 16, "sym", 8, 256)):
        layer, w = _layer(spec, 9, 512, 3)
        a, c = layer._group_params()
        x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
        ref = x @ w.T
        y = k.qgemv(layer.qweight, a, c, x, spec.bits, 16, False, layer._levels())
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_the_portable_branch_equals_the_reference(tmp_path):
    """The kernel's branch for CPUs without AVX2 (compiled here with AVX2 and FMA turned off) on every width:
    products within float tolerance, decoded weights bit for bit."""
    import os

    import ninja
    from torch.utils.cpp_extension import load

    from mixq.runtime.cpu import _SOURCE

    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    portable = load(name="mixq_qgemv_portable", sources=[str(_SOURCE)], build_directory=str(tmp_path),
                    extra_cflags=["-O2", "-mno-avx2", "-mno-fma", "-ffp-contract=off"], verbose=False)
    for spec in SPECS[::3] + LEVEL_SPECS[::2] + [QuantSpec.of(3, 16, "sym", 6, 256)]:
        cols = 512 if spec.super_block else 192
        layer, w = _layer(spec, 5, cols, 7)
        a, c = layer._group_params()
        x = torch.randn(3, cols, generator=torch.Generator().manual_seed(1))
        ref = x @ w.T
        y = portable.qgemv(layer.qweight, a, c, x, spec.bits, spec.group(cols), spec.minimum, layer._levels())
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        assert torch.equal(portable.dequant(layer.qweight, a, c, cols, spec.bits, spec.group(cols),
                                            spec.minimum, layer._levels()), w)


def test_fp16_rows_gemv_equals_the_float32_product():
    k = kernel()
    for rows, cols, n in ((1, 8, 1), (7, 13, 3), (33, 200, 8), (6, 64, 2)):  # odd widths take the scalar tail
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).half()
        x = torch.randn(n, cols, generator=torch.Generator().manual_seed(cols))
        ref = x @ w.float().T
        torch.testing.assert_close(k.hgemv(w, x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("spec", SPECS + LEVEL_SPECS + [QuantSpec.of(3, 16, "sym", 6, 256), QuantSpec.of(5, 32, "sym")],
                         ids=lambda s: s.name)
def test_kernel_dequant_is_the_reference_bit_for_bit(spec):
    """Prompts multiply with the weight the kernel decodes: the very numbers of `dequantize` (no fused rounding)."""
    k = kernel()
    for rows, seed in ((1, 0), (7, 1)):
        cols = 512 if spec.super_block else 192
        layer, w = _layer(spec, rows, cols, seed)
        s, zm = layer._group_params()
        got = k.dequant(layer.qweight, s, zm, cols, spec.bits, spec.group(cols), spec.minimum, layer._levels())
        assert torch.equal(got, w)
