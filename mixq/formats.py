"""Storage formats: `QuantSpec`, the reference quantize/dequantize pair, exact bit accounting.

Semantics (the reference every kernel and exporter must match), for a weight of rows × cols split into
groups of `group_size` consecutive columns:

    w ≈ (q - z) · s        q ∈ [0, 2^bits - 1] integer code, s fp16 scale, z integer zero, one (s, z) per group

Symmetric specs store no zero: z is the constant 2^(bits-1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 96, 128, 192, 256)  # 0 means one group per whole row
SCALE_BITS = 16  # scales are stored as fp16


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid: `bits` per code, one fp16 scale (+ a `bits`-wide zero unless symmetric) per group."""

    bits: int
    group_size: int = 0  # 0: whole row
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size != 0 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be 0 (whole row) or one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group(self, cols: int) -> int:
        """The group width for a row of `cols` weights."""
        return cols if self.group_size == 0 else self.group_size

    def fits(self, cols: int) -> bool:
        return cols % self.group(cols) == 0

    def overhead_bits_per_group(self) -> int:
        return SCALE_BITS + (0 if self.symmetric else self.bits)

    def storage_bits(self, rows: int, cols: int) -> int:
        """Exact stored bits for a rows × cols weight: codes + scales + zeros, as packed by `runtime.pack`."""
        if not self.fits(cols):
            raise ValueError(f"{self.name} does not fit rows of {cols} weights")
        groups = rows * (cols // self.group(cols))
        return _packed_bits(rows * cols, self.bits) + groups * SCALE_BITS + (
            0 if self.symmetric else _packed_bits(groups, self.bits))

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.storage_bits(rows, cols) / (rows * cols)

    @property
    def name(self) -> str:
        g = "row" if self.group_size == 0 else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "group_size", "symmetric"}
        if unknown:
            raise ValueError(f"unknown QuantSpec keys: {sorted(unknown)}")
        if "bits" not in d:
            raise ValueError(f"a format needs 'bits' (one of {BITS}); got {d}")
        return cls(int(d["bits"]), int(d.get("group_size", 0)), bool(d.get("symmetric", False)))


def _packed_bits(n: int, bits: int) -> int:
    """Codes are packed 8 at a time into `bits` bytes (see runtime.pack): padding up to a multiple of 8 codes."""
    return -(-n // 8) * 8 * bits


@dataclass
class QuantizedTensor:
    """Unpacked integer codes (rows × cols, uint8) + fp16 scales and uint8 zeros (rows × groups) + the spec."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.spec.group(self.codes.shape[1]))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The reference: (q - z) · s in float32, one (s, z) per `group` consecutive columns."""
    rows, cols = codes.shape
    q = codes.float().view(rows, cols // group, group)
    w = (q - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.view(rows, cols)


def fit_params(w: torch.Tensor, maxq: torch.Tensor, symmetric: bool, shrink: float | torch.Tensor = 1.0):
    """Min/max grid for each row of `w` (rows × g), its range shrunk by `shrink` (clipping).

    `maxq` is rows × 1 so that rows of different widths can be solved together. Returns (scale, zero), rows × 1:
    scale already rounded to fp16 (what is stored), zero an integer in [0, maxq].
    """
    if symmetric:
        amax = w.abs().amax(1, keepdim=True) * shrink
        scale = 2 * amax / maxq
        zero = torch.floor((maxq + 1) / 2)
    else:
        lo = w.amin(1, keepdim=True).clamp(max=0) * shrink
        hi = w.amax(1, keepdim=True).clamp(min=0) * shrink
        scale = (hi - lo) / maxq
    scale = scale.clamp(min=1e-6).half().float()
    if not symmetric:
        zero = torch.minimum(torch.round(-lo / scale).clamp(min=0), maxq)
    return scale, zero.expand_as(scale)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Codes (float, integral values) for `w` on the grid (scale, zero); all broadcast against w."""
    return torch.minimum((w / scale).round_().add_(zero).clamp_(min=0), maxq)


def quantize(w: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> QuantizedTensor:
    """Reference round-to-nearest quantization of a rows × cols weight (`shrink` per row-group or scalar)."""
    rows, cols = w.shape
    if not spec.fits(cols):
        raise ValueError(f"{spec.name} does not fit rows of {cols} weights")
    g = spec.group(cols)
    wg = w.float().reshape(rows * (cols // g), g)
    maxq = torch.full((wg.shape[0], 1), float(spec.maxq))
    if isinstance(shrink, torch.Tensor):
        shrink = shrink.reshape(-1, 1)
    scale, zero = fit_params(wg, maxq, spec.symmetric, shrink)
    codes = quantize_codes(wg, scale, zero, maxq)
    return QuantizedTensor(codes.to(torch.uint8).view(rows, cols), scale.half().view(rows, -1),
                           zero.to(torch.uint8).view(rows, -1), spec)
