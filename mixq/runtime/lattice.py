"""`LatticeLinear`: QuantLinear of a lattice-codebook format (grids.lattice, "iq"), stored as llama.cpp's IQ2_S
and IQ3_S store their runs: for each run of 8 (iq2) or 4 (iq3) weights of a row, the low 8 bits of its point's
index (`qweight`, rows × cols/run bytes), the index's high bits (`qh`, rows × cols/32 bytes: 2 bits a run of iq2, 4 runs
a byte; 1 bit a run of iq3, 8 runs a byte, run r of a byte at bit `INDEX_BITS − 8` · r), and a sign a weight
(`signs`, rows × cols/8 bytes, bit t of byte b for column 8b + t: set where negative); fp16 `scales` rows ×
groups, or, double-quantized, their codes packed (runtime.pack) and an fp16 step a super-block (`steps`). These
are exactly the bits QuantSpec.storage_bits counts. For a few rows of x the kernel's `iq_gemv` decodes every 8
columns once (a point or two, their signs, the group's scale) into each row's product; longer inputs decode the
weight (points × signs × scales) and multiply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import QuantizedTensor, QuantSpec
from ..grids.lattice import INDEX_BITS, RUN, codebook, index_of
from .pack import pack, unpack, unpack_at
from .qlinear import KERNEL_MAX_ROWS, QuantLinear


class LatticeLinear(QuantLinear, grid="iq"):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False):
        nn.Module.__init__(self)
        if not spec.fits(in_features):
            raise ValueError(f"{spec.name} does not fit rows of {in_features} weights (runs packed 32 weights a "
                             "byte of high bits: multiples of 32)")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.high, self._cols, self._group = None, in_features, spec.group(in_features)
        self.groups = out_features * (in_features // self._group)
        u8 = dict(dtype=torch.uint8)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // RUN[spec.bits], **u8))
        self.register_buffer("qh", torch.zeros(out_features, in_features // 32, **u8))
        self.register_buffer("signs", torch.zeros(out_features, in_features // 8, **u8))
        groups = in_features // self._group
        if spec.double:  # scale codes packed, an fp16 step a super-block
            self.register_buffer("scales", torch.zeros(-(-out_features * groups // 8) * spec.scale_bits, **u8))
            self.register_buffer("steps", torch.zeros(out_features, spec.steps_per_row(in_features),
                                                      dtype=torch.float16))
        else:
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._ac = None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> "LatticeLinear":
        rows, cols = qt.codes.shape
        bits = qt.spec.bits
        m = cls(cols, rows, qt.spec, bias is not None)
        idx = index_of(qt.codes, bits)  # rows × runs
        high, per = INDEX_BITS[bits] - 8, 32 // RUN[bits]
        m.qweight.copy_((idx & 0xFF).to(torch.uint8))
        shifts = torch.arange(per) * high
        m.qh.copy_(((idx >> 8).view(rows, -1, per) << shifts).sum(-1).to(torch.uint8))
        negative = (qt.codes.long() & 1).view(rows, -1, 8)
        m.signs.copy_((negative << torch.arange(8)).sum(-1).to(torch.uint8))
        if qt.spec.double:
            m.scales.copy_(pack(qt.scales, qt.spec.scale_bits))
            m.steps.copy_(qt.steps)
        else:
            m.scales.copy_(qt.scales)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def _indices(self, rows=None) -> torch.Tensor:
        """Point index of every run (rows × runs, int64)."""
        bits = self.spec.bits
        high, per = INDEX_BITS[bits] - 8, 32 // RUN[bits]
        qs, qh = (self.qweight, self.qh) if rows is None else (self.qweight[rows], self.qh[rows])
        top = (qh.long().unsqueeze(-1) >> (torch.arange(per) * high)) & ((1 << high) - 1)
        return qs.long() | (top.reshape(qs.shape) << 8)

    def _negative(self, rows=None) -> torch.Tensor:
        signs = self.signs if rows is None else self.signs[rows]
        return ((signs.long().unsqueeze(-1) >> torch.arange(8)) & 1).reshape(signs.shape[0], -1)

    def quantized(self, rows: torch.Tensor | None = None, codes: bool = True) -> QuantizedTensor:
        n, per_row = self.out_features if rows is None else len(rows), self.groups // self.out_features
        zeros = torch.zeros(n, per_row, dtype=torch.uint8)
        steps = None
        if self.spec.double:
            b = self.spec.scale_bits
            scales = unpack(self.scales, b, n * per_row).view(n, per_row) if rows is None else \
                unpack_at(self.scales, b, rows[:, None] * per_row + torch.arange(per_row))
            steps = self.steps if rows is None else self.steps[rows]
        else:
            scales = self.scales if rows is None else self.scales[rows]
        if not codes:
            return QuantizedTensor(torch.empty(n, 0, dtype=torch.uint8), scales, zeros, self.spec, steps)
        places = codebook(self.spec.bits)[1][self._indices(rows)].reshape(n, -1)
        return QuantizedTensor((places * 2 + self._negative(rows)).to(torch.uint8), scales, zeros, self.spec, steps)

    def _scales(self) -> torch.Tensor:
        """Every group's scale, float32 rows × groups (decoded once, never saved)."""
        if self._ac is None:
            self._ac = self.quantized(codes=False).grid_values()[0].float().contiguous()
        return self._ac

    def weight_float(self) -> torch.Tensor:
        """The float32 weight, decoded straight from the indices (the reference's numbers)."""
        rows, cols = self.out_features, self._cols
        points = codebook(self.spec.bits)[0][self._indices()].reshape(rows, cols)
        w = torch.where(self._negative() == 1, -points, points)
        return (w.view(rows, -1, self._group) * self._scales().unsqueeze(-1)).view(rows, cols)

    def _kernel_fits(self) -> bool:
        return self.qweight.device.type == "cpu"  # (rows of a multiple of 32, groups of 8s: QuantSpec.fits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows of x: the kernel's iq_gemv, straight from the indices; more: the decoded weight and torch's
        matmul."""
        rows = x.numel() // self._cols
        k = self._kernel_for(x)
        if k is None or rows > KERNEL_MAX_ROWS:
            return F.linear(x, self.weight_float().to(x.dtype), self.bias)
        bits = self.spec.bits
        y = k.iq_gemv(self.qweight, self.qh, self.signs, self._scales(), codebook(bits)[0],
                      x.reshape(rows, self._cols), self._group, INDEX_BITS[bits])
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
