"""`BCQLinear`: QuantLinear of a binary-coding format (grids.bcq), its codes stored as bit planes for the
look-up-table product of BiQGEMM (Jeon et al. 2020).

`qweight` holds the planes, bits × cols/8 × rows bytes: byte (i, jb, r) has plane i's signs of row r's columns
8·jb … 8·jb + 7 (bit t for column 8·jb + t; set: +1), so that 8 rows' bytes of one plane and 8 columns lie together;
`scales` the α, fp16 rows × groups · bits (as QuantizedTensor). The bytes count `bits` bits a weight, as
QuantSpec.storage_bits does. For a few rows of x the kernel (`bcq_gemv`) forms, for every 8 inputs, the 256 signed
sums ±x_0 ± … ± x_7 once, and each plane's byte picks one: no weight is decoded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QuantizedTensor, QuantSpec
from .qlinear import KERNEL_MAX_ROWS, QuantLinear


def to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """rows × cols codes → bits × cols/8 × rows plane bytes."""
    rows, cols = codes.shape
    b = (codes.long().unsqueeze(0) >> torch.arange(bits).view(-1, 1, 1)) & 1  # bits × rows × cols
    byte = (b.view(bits, rows, cols // 8, 8) << torch.arange(8)).sum(-1)
    return byte.permute(0, 2, 1).contiguous().to(torch.uint8)


def from_planes(planes: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_planes` (any subset of rows in the last dimension): rows × cols codes, uint8."""
    bits, blocks, rows = planes.shape
    b = (planes.long().permute(0, 2, 1).unsqueeze(-1) >> torch.arange(8)) & 1  # bits × rows × blocks × 8
    return (b.reshape(bits, rows, blocks * 8) << torch.arange(bits).view(-1, 1, 1)).sum(0).to(torch.uint8)


class BCQLinear(QuantLinear, grid="bcq"):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False):
        nn.Module.__init__(self)
        if not spec.fits(in_features) or in_features % 8 or spec.group(in_features) % 8:
            raise ValueError(f"{spec.name} does not fit rows of {in_features} weights (bit planes: multiples of 8)")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.high, self._cols, self._group = None, in_features, spec.group(in_features)
        self.groups = out_features * (in_features // self._group)
        self.register_buffer("qweight", torch.zeros(spec.bits, in_features // 8, out_features, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, self.groups // out_features * spec.bits,
                                                   dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._ac = None  # α as the kernel reads it (float32 groups × bits × rows), never saved

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> "BCQLinear":
        rows, cols = qt.codes.shape
        m = cls(cols, rows, qt.spec, bias is not None)
        m.qweight.copy_(to_planes(qt.codes, qt.spec.bits))
        m.scales.copy_(qt.scales)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def _kernel_fits(self) -> bool:
        return self.qweight.device.type == "cpu"  # (rows and groups are multiples of 8: __init__ checks)

    def quantized(self, rows: torch.Tensor | None = None, codes: bool = True) -> QuantizedTensor:
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        n = self.out_features if rows is None else len(rows)
        planes = self.qweight if rows is None else self.qweight[:, :, rows]
        out = from_planes(planes) if codes else torch.empty(n, 0, dtype=torch.uint8)
        zeros = torch.zeros(n, self.groups // self.out_features, dtype=torch.uint8)
        return QuantizedTensor(out, pick(self.scales), zeros, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self._cols
        k = self._kernel_for(x)
        if k is None or rows > KERNEL_MAX_ROWS:
            w = self.quantized().dequantize()
            return F.linear(x, w.to(x.dtype), self.bias)
        if self._ac is None:
            per = self.groups // self.out_features
            self._ac = self.scales.float().view(self.out_features, per, self.spec.bits).permute(1, 2, 0).contiguous()
        y = k.bcq_gemv(self.qweight, self._ac, x.reshape(rows, self._cols).contiguous(), self._group)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
