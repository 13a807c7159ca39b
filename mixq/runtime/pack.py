"""Bit packing: n codes of `bits` bits take ceil(n / 8) · bits bytes, little-endian within each run of 8 codes.

Eight codes of b bits form one 8b-bit integer (code i at bit b·i), written as b bytes. The same layout for every
width, so one pack/unpack pair serves 2…8 bits and 3 bits really take 3 bits.
"""
from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten `codes` (integers in [0, 2^bits)) and pack them into a uint8 tensor."""
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:  # the codes already are the bytes (and 64-bit words would overflow int64's sign)
        return flat.to(torch.uint8)
    word = (flat.view(-1, 8) << (torch.arange(8, dtype=torch.int64) * bits)).sum(1, keepdim=True)
    out = (word >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack`: the first `n` codes as uint8."""
    if bits == 8:
        return packed[:n].clone()
    b = packed.to(torch.int64).view(-1, bits)
    word = (b << (torch.arange(bits, dtype=torch.int64) * 8)).sum(1, keepdim=True)
    codes = (word >> (torch.arange(8, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)


def unpack_at(packed: torch.Tensor, bits: int, index: torch.Tensor) -> torch.Tensor:
    """The codes at the given flat positions (any shape) as uint8, without unpacking the rest: in `pack`'s layout
    code i starts at bit b·i of the little-endian byte stream, so it lies within the two bytes from ⌊b·i/8⌋."""
    pos = index.to(torch.int64) * bits
    byte = pos >> 3
    lo = packed[byte].to(torch.int64)
    hi = packed[(byte + 1).clamp(max=packed.numel() - 1)].to(torch.int64)
    return (((hi << 8) | lo) >> (pos & 7)).bitwise_and((1 << bits) - 1).to(torch.uint8)
