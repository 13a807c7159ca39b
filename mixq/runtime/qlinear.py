"""`QuantLinear`: a linear layer that holds packed codes, fp16 scales and packed zeros, and computes from them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QuantizedTensor, QuantSpec, dequantize
from .pack import pack, unpack


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False):
        super().__init__()
        if not spec.fits(in_features):
            raise ValueError(f"{spec.name} does not fit rows of {in_features} weights")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        groups = out_features * (in_features // spec.group(in_features))
        self.register_buffer("qweight", torch.zeros(-(-out_features * in_features // 8) * spec.bits, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups // out_features, dtype=torch.float16))
        if not spec.symmetric:
            self.register_buffer("qzeros", torch.zeros(-(-groups // 8) * spec.bits, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> "QuantLinear":
        rows, cols = qt.codes.shape
        m = cls(cols, rows, qt.spec, bias is not None)
        m.qweight.copy_(pack(qt.codes, qt.spec.bits))
        m.scales.copy_(qt.scales)
        if not qt.spec.symmetric:
            m.qzeros.copy_(pack(qt.zeros, qt.spec.bits))
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def zeros(self) -> torch.Tensor:
        if self.spec.symmetric:
            return torch.full_like(self.scales, 1 << (self.spec.bits - 1), dtype=torch.uint8)
        return unpack(self.qzeros, self.spec.bits, self.scales.numel()).view_as(self.scales)

    def weight_float(self) -> torch.Tensor:
        codes = unpack(self.qweight, self.spec.bits, self.out_features * self.in_features)
        codes = codes.view(self.out_features, self.in_features)
        return dequantize(codes, self.scales, self.zeros(), self.spec.group(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_float().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}"
