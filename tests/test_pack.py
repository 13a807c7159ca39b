"""Bit packing: n codes of b bits take ceil(n / 8) · b bytes, and unpack inverts pack bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixq.runtime.pack import pack, unpack, unpack_at

WIDTHS = range(2, 9)


@st.composite
def codes_of_width(draw):
    bits = draw(st.sampled_from(WIDTHS))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=83))
    return bits, values


@given(codes_of_width())
def test_round_trip(case):
    bits, values = case
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-len(values) // 8) * bits
    assert unpack(packed, bits, len(values)).tolist() == values


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 17, 1001])
def test_round_trip_extremes_and_odd_lengths(bits, n):
    g = torch.Generator().manual_seed(bits * 7919 + n)
    maxq = (1 << bits) - 1
    for codes in (torch.randint(0, maxq + 1, (n,), generator=g), torch.full((n,), maxq), torch.zeros(n)):
        packed = pack(codes.to(torch.uint8), bits)
        assert packed.numel() == -(-n // 8) * bits
        assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_flattens_any_shape(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 7), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert torch.equal(packed, pack(codes.reshape(-1), bits))
    assert torch.equal(unpack(packed, bits, codes.numel()).view(3, 5, 7), codes.to(torch.uint8))


def test_layout_is_little_endian_runs_of_eight():
    """Eight b-bit codes form one 8b-bit integer, code i at bit b·i, written as b little-endian bytes."""
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert pack(torch.tensor(codes), 3).tolist() == list(word.to_bytes(3, "little"))
    # 4 bits: two codes per byte, low nibble first
    assert pack(torch.tensor([0x1, 0xA, 0x2, 0xB, 0x3, 0xC, 0x4, 0xD]), 4).tolist() == [0xA1, 0xB2, 0xC3, 0xD4]
    # padding codes are zeros
    assert pack(torch.tensor([3]), 2).tolist() == [3, 0]
    assert pack(torch.tensor([255, 1]), 8).tolist() == [255, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("bits", WIDTHS)
def test_out_of_range_codes_raise(bits):
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([0, 1 << bits]), bits)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([-1, 0], dtype=torch.int16), bits)


def test_empty():
    for bits in WIDTHS:
        packed = pack(torch.zeros(0, dtype=torch.uint8), bits)
        assert packed.numel() == 0
        assert unpack(packed, bits, 0).numel() == 0


@given(codes_of_width(), st.data())
def test_unpack_at_reads_any_positions(case, data):
    bits, values = case
    if not values:
        return
    packed = pack(torch.tensor(values, dtype=torch.uint8), bits)
    where = data.draw(st.lists(st.integers(0, len(values) - 1), min_size=1, max_size=20))
    got = unpack_at(packed, bits, torch.tensor(where))
    assert got.tolist() == [values[i] for i in where]


@pytest.mark.parametrize("name", ["int4-g32-min-dq6", "int3-g64-min", "nf3-g64-dq6", "int4-g32-asym"])
def test_group_values_read_without_unpacking_the_codes(name):
    """What the kernel reads of a layer (its groups' scales and zeros) comes without the codes, which for a
    128k-row head would take gigabytes unpacked, and equals what the whole read gives."""
    from mixq.formats import QuantSpec, quantize
    from mixq.runtime.qlinear import QuantLinear

    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(0))
    layer = QuantLinear.from_quantized(quantize(w, QuantSpec.from_name(name)))
    scales_only, whole = layer.quantized(codes=False), layer.quantized()
    assert scales_only.codes.numel() == 0 and whole.codes.shape == (48, 192)
    for a, b in zip(scales_only.grid_values(), whole.grid_values()):
        assert torch.equal(a, b)
