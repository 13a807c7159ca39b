"""`QuantLinear`: a linear layer that holds packed codes, fp16 scales and packed zeros (or fp16 minima), and computes
from them. A grid with a layout of its own has a subclass that names it (`class BCQLinear(QuantLinear,
grid="bcq")`: runtime.bcq's bit planes, runtime.lattice's codebook indices), which `QuantLinear(...)` and
`QuantLinear.from_quantized` give for its specs."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import HIGH, QuantizedTensor, QuantSpec
from ..registry import import_all
from .cpu import kernel
from .pack import pack, unpack, unpack_at

KERNEL_MAX_ROWS = 8  # rows of x (decoding, small batches) that qgemv takes; longer inputs: dequant + matmul


LAYOUTS: dict[str, type] = {}  # grid name → the QuantLinear subclass of its own layout (kept by __init_subclass__)


def layout(spec: QuantSpec) -> type:
    """The class that stores `spec`: QuantLinear, or its grid's own subclass."""
    if spec.grid_type.solver is None:
        return QuantLinear
    _import_layouts()
    if spec.grid not in LAYOUTS:
        raise ValueError(f"{spec.name}: no layout stores grid {spec.grid}")
    return LAYOUTS[spec.grid]


@cache
def _import_layouts() -> None:
    """Import the package's modules once, so that every layout has registered."""
    import_all(__package__, [str(Path(__file__).parent)])


class QuantLinear(nn.Module):
    def __init_subclass__(cls, grid: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if grid is not None:
            LAYOUTS[grid] = cls

    def __new__(cls, in_features: int = 0, out_features: int = 0, spec: QuantSpec | None = None, bias: bool = False):
        return super().__new__(layout(spec) if cls is QuantLinear and spec is not None else cls)

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False):
        super().__init__()
        if not spec.fits(in_features):
            raise ValueError(f"{spec.name} does not fit rows of {in_features} weights")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self._cols = in_features - spec.high  # the columns stored in `spec`'s codes; the high ones in `high`
        self.high = QuantLinear(spec.high, out_features, HIGH) if spec.high else None
        self._group = spec.group(in_features)
        groups = out_features * (self._cols // self._group)
        self.groups = groups
        u8 = dict(dtype=torch.uint8)
        self.register_buffer("qweight", torch.zeros(-(-out_features * self._cols // 8) * spec.bits, **u8))
        zero = spec.grid_type.zero  # what each group stores beside its scale
        if spec.double:  # packed scale (and minimum) codes, fp16 steps per row
            packed = -(-groups // 8) * spec.scale_bits
            self.register_buffer("scales", torch.zeros(packed, **u8))
            if zero == "float":
                self.register_buffer("qzeros", torch.zeros(packed, **u8))
            steps = (2 if zero == "float" else 1) * spec.steps_per_row(self._cols)
            self.register_buffer("steps", torch.zeros(out_features, steps, dtype=torch.float16))
        else:
            self.register_buffer("scales", torch.zeros(out_features, groups // out_features, dtype=torch.float16))
            if zero == "int":
                self.register_buffer("qzeros", torch.zeros(-(-groups // 8) * spec.bits, **u8))
            elif zero == "float":
                self.register_buffer("mins", torch.zeros_like(self.scales))
        if spec.grid_type.learned:  # the layer's own levels
            self.register_buffer("levels", torch.zeros(1 << spec.bits, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._ac = None  # the kernel's per-group (s, z or m), float32: decoded on first use, never saved

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> "QuantLinear":
        if cls is QuantLinear and layout(qt.spec) is not QuantLinear:
            return layout(qt.spec).from_quantized(qt, bias)
        rows, cols = qt.codes.shape[0], qt.codes.shape[1] + qt.spec.high
        spec, zero = qt.spec, qt.spec.grid_type.zero
        m = cls(cols, rows, spec, bias is not None)
        m.qweight.copy_(pack(qt.codes, spec.bits))
        if spec.double:
            m.scales.copy_(pack(qt.scales, spec.scale_bits))
            if zero == "float":
                m.qzeros.copy_(pack(qt.zeros, spec.scale_bits))
            m.steps.copy_(qt.steps)
        else:
            m.scales.copy_(qt.scales)
            if zero == "int":
                m.qzeros.copy_(pack(qt.zeros, spec.bits))
            elif zero == "float":
                m.mins.copy_(qt.zeros)
        if spec.grid_type.learned:
            m.levels.copy_(qt.learned_levels)
        if spec.high:
            m.high = QuantLinear.from_quantized(qt.high)
        if bias is not None:
            m.bias.data.copy_(bias)
        return m

    def quantized(self, rows: torch.Tensor | None = None, codes: bool = True) -> QuantizedTensor:
        """The stored tensors, unpacked: every row, or only `rows` (indices), read in place from the packing;
        without `codes`, the groups' scales and zeros only (codes of no column: a 128k-row head's codes unpacked
        whole would take gigabytes)."""
        spec, cols, per_row = self.spec, self._cols, self.groups // self.out_features
        n = self.out_features if rows is None else len(rows)

        def read(packed, bits, width):  # width values per row
            if rows is None:
                return unpack(packed, bits, n * width).view(n, width)
            return unpack_at(packed, bits, rows[:, None] * width + torch.arange(width))

        high = None if self.high is None else self.high.quantized(rows, codes)
        codes = read(self.qweight, spec.bits, cols) if codes else torch.empty(n, 0, dtype=torch.uint8)
        zero = spec.grid_type.zero
        fixed = torch.full((n, per_row), spec.grid_type.fixed_zero(spec.bits), dtype=torch.uint8)  # none stored
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        levels = self.levels.float() if spec.grid_type.learned else None
        if spec.double:
            scales = read(self.scales, spec.scale_bits, per_row)
            zeros = read(self.qzeros, spec.scale_bits, per_row) if zero == "float" else fixed
            return QuantizedTensor(codes, scales, zeros, spec, pick(self.steps), high, levels)
        zeros = {"float": lambda: pick(self.mins), "none": lambda: fixed,
                 "int": lambda: read(self.qzeros, spec.bits, per_row)}[zero]()
        return QuantizedTensor(codes, pick(self.scales), zeros, spec, high=high, learned_levels=levels)

    def weight_float(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows of x: straight from the codes (qgemv). More: the weight decoded by the kernel (exactly the
        reference's numbers), then torch's matmul. Without the kernel: the reference dequantize. A split row's
        high columns (spec.high) go through their own QuantLinear."""
        if self.high is None:
            return self._forward(x, self.bias)
        k = self.spec.high
        return self._forward(x[..., k:].contiguous(), self.bias) + self.high(x[..., :k].contiguous())

    def _forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k = self._kernel_for(x)
        if k is None:
            w = self.quantized().dequantize()
            return F.linear(x, (w if self.high is None else w[:, self.spec.high:]).to(x.dtype), bias)
        s, zm = self._group_params()
        rows, minimum = x.numel() // self._cols, self.spec.grid_type.zero == "float"
        lut = self._levels()
        if rows > KERNEL_MAX_ROWS:
            w = k.dequant(self.qweight, s, zm, self._cols, self.spec.bits, self._group, minimum, lut)
            return F.linear(x, w, bias)
        y = k.qgemv(self.qweight, s, zm, x.reshape(rows, self._cols), self.spec.bits, self._group, minimum, lut)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _kernel_for(self, x: torch.Tensor):
        """The compiled kernel where it serves `x` (float32 without gradient, weights it can read), else None: the
        reference."""
        return kernel() if x.dtype == torch.float32 and not x.requires_grad and self._kernel_fits() else None

    def _kernel_fits(self) -> bool:
        """The kernel reads runs of 8 codes: rows and groups must be multiples of 8 columns."""
        return self._group % 8 == 0 and self._cols % 8 == 0 and self.qweight.device.type == "cpu"

    def _levels(self) -> torch.Tensor:
        """The kernel's level table: a level grid's 2^bits levels (a learned grid's: the layer's own), or empty
        (uniform grids)."""
        levels = self.levels.float() if self.spec.grid_type.learned else self.spec.levels()
        return torch.empty(0) if levels is None else levels.contiguous()

    def _group_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) of w = (q − z)·s, or (s, m) of w = q·s + m ("min" grids), float32 rows × groups."""
        if self._ac is None:
            s, z = self.quantized(codes=False).grid_values()
            self._ac = (s.float().contiguous(), z.float().contiguous())
        return self._ac

    def _load_from_state_dict(self, *args, **kwargs):
        self._ac = None  # new buffers: decode again
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}"


class QuantEmbedding(QuantLinear):
    """An embedding table (rows: tokens) in QuantLinear's storage; a lookup dequantizes only the rows it reads.
    With tied weights the output head is a QuantLinear holding the very same buffers (`tied_head`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, scale: float | None = None):
        super().__init__(embedding_dim, num_embeddings, spec)
        self.scale = scale  # a factor the table it replaces multiplied its rows by (models.Adapter.table_scale)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias=None, scale: float | None = None) -> "QuantEmbedding":
        if bias is not None:
            raise ValueError("an embedding has no bias")
        m = QuantLinear.from_quantized(qt)
        e = cls(m.out_features, m.in_features, m.spec, scale)
        e.load_state_dict(m.state_dict())
        return e

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() == 0:  # (generation may look up no token)
            return torch.empty(*ids.shape, self.in_features)
        seen, where = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = self.quantized(seen).dequantize()
        if self.scale is not None:
            rows = rows * torch.tensor(self.scale, dtype=rows.dtype)
        return rows[where].view(*ids.shape, self.in_features)

    @property
    def num_embeddings(self) -> int:  # (nn.Embedding's names, which the exporters and transformers read)
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def tied_head(self) -> QuantLinear:
        head = QuantLinear(self.in_features, self.out_features, self.spec)
        for name, buf in self.named_buffers(recurse=False):
            setattr(head, name, buf)  # the same tensors: stored once, loaded once
        return head

    def extra_repr(self) -> str:
        return f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, spec={self.spec.name}"
