"""Storage formats: `QuantSpec`, the reference quantize/dequantize pair, exact bit accounting.

Semantics (the reference every kernel and exporter must match), for a weight of rows × cols split into
groups of `group_size` consecutive columns:

    w ≈ (q - z) · s        q ∈ [0, 2^bits - 1] integer code, s fp16 scale, z integer zero, one (s, z) per group

Three grids (`QuantSpec.grid`):
- "int" (asymmetric): z is stored, `bits` wide.
- "sym": no zero is stored: z is the constant 2^(bits-1), and the scale is signed so that the weight of largest
  magnitude lands on code 0, the longer side of the grid (as llama.cpp's Q4_0: no level is wasted).
- "min": an fp16 minimum m instead of an integer zero, w ≈ q · s + m (llama.cpp's Q4_1 / Q5_1; HQQ's float
  zero): the grid's offset is free, not a multiple of the step.

A split row (`high` > 0, for ResQ's high-variance subspace, transforms.resq): the leading `high` columns of each
row are stored apart as 8-bit asymmetric codes with one fp16 scale and zero a row (`HIGH`), the rest as above;
group sizes then count in the rest (cols − high).

Double quantization (`scale_bits` 4, 6 or 8; "sym" and "min" grids, as llama.cpp's k-quants): instead of fp16,
each group's scale (and minimum) is stored as a `scale_bits`-wide code times an fp16 step per row:
s = Δs · c (unsigned c ≥ 1, "min") or Δs · (c − 2^(scale_bits-1)) (signed, "sym"); m = Δm · (c − 2^(scale_bits-1)).
Small groups then cost little: 4-bit group 32 with 6-bit scale and minimum codes is 4.375 bits + 32 bits a row.
With `super_block` (256: llama.cpp's k-quant super-blocks) the steps are per `super_block` consecutive weights of a
row instead of per row: sym 3 bits, groups of 16, 6-bit scale codes, super-blocks of 256 is ggml's Q3_K exactly
(w = d · (sc − 32) · (q − 4)), and sym 6 bits with 8-bit codes is Q6_K.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 96, 128, 192, 256)  # 0 means one group per whole row
SUPER_BLOCKS = (256,)  # weights per double-quantization step; 0 means one step per row
SCALE_BITS = 16  # scales are stored as fp16
MIN_BITS = 16  # so are the minima of "min" grids
GRIDS = ("int", "sym", "min")
SCALE_CODE_BITS = (4, 6, 8)  # widths of double-quantized scale codes
STEP_BITS = 16  # the per-row steps of double-quantized scales and minima are fp16


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid: `bits` per code, one fp16 scale per group, and per group a `bits`-wide zero (asymmetric),
    nothing (`symmetric`) or an fp16 minimum (`minimum`)."""

    bits: int
    group_size: int = 0  # 0: whole row
    symmetric: bool = False
    minimum: bool = False
    scale_bits: int = SCALE_BITS  # 16: fp16 scales; 4, 6 or 8: double-quantized (codes + an fp16 step per row)
    super_block: int = 0  # double-quantized: weights per step (0: the whole row)
    high: int = 0  # leading columns of each row stored apart at 8 bits (a split row); 0: none

    def __post_init__(self):
        if self.high < 0 or self.high % 8:
            raise ValueError(f"high (columns stored at 8 bits) must be a multiple of 8 ≥ 0, got {self.high}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size != 0 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be 0 (whole row) or one of {GROUP_SIZES}, got {self.group_size}")
        if self.symmetric and self.minimum:
            raise ValueError("a format is symmetric or has a minimum, not both")
        if self.scale_bits != SCALE_BITS and self.scale_bits not in SCALE_CODE_BITS:
            raise ValueError(f"scale_bits must be {SCALE_BITS} (fp16) or one of {SCALE_CODE_BITS}, "
                             f"got {self.scale_bits}")
        if self.double and not (self.symmetric or self.minimum):
            raise ValueError("double-quantized scales need a symmetric or a minimum grid")
        if self.super_block:
            if self.super_block not in SUPER_BLOCKS or not self.double:
                raise ValueError(f"super_block must be 0 or, with double-quantized scales, one of {SUPER_BLOCKS}")
            if self.group_size == 0 or self.super_block % self.group_size:
                raise ValueError(f"groups of {self.group_size or 'whole rows'} do not divide super-blocks of "
                                 f"{self.super_block}")

    @classmethod
    def of(cls, bits: int, group_size: int = 0, grid: str = "int", scale_bits: int = SCALE_BITS,
           super_block: int = 0) -> "QuantSpec":
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        return cls(bits, group_size, grid == "sym", grid == "min", scale_bits, super_block)

    @property
    def double(self) -> bool:
        """Double-quantized scales."""
        return self.scale_bits != SCALE_BITS

    @property
    def grid(self) -> str:
        return "sym" if self.symmetric else "min" if self.minimum else "int"

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group(self, cols: int) -> int:
        """The group width for a row of `cols` weights (in its columns after the `high` ones)."""
        return cols - self.high if self.group_size == 0 else self.group_size

    def fits(self, cols: int) -> bool:
        low = cols - self.high
        return low > 0 and low % self.group(cols) == 0 and low % (self.super_block or low) == 0

    @property
    def low(self) -> "QuantSpec":
        """The format of the columns after the `high` ones."""
        return replace(self, high=0)

    def steps_per_row(self, cols: int) -> int:
        """Double-quantization steps (of scales; as many again of minima) in a row of `cols` weights."""
        return cols // self.super_block if self.super_block else 1

    def overhead_bits_per_group(self) -> int:
        return SCALE_BITS + {"sym": 0, "int": self.bits, "min": MIN_BITS}[self.grid]

    def storage_bits(self, rows: int, cols: int) -> int:
        """Exact stored bits for a rows × cols weight: codes + scales + zeros, as packed by `runtime.pack`."""
        if not self.fits(cols):
            raise ValueError(f"{self.name} does not fit rows of {cols} weights")
        if self.high:
            return HIGH.storage_bits(rows, self.high) + self.low.storage_bits(rows, cols - self.high)
        groups = rows * (cols // self.group(cols))
        if self.double:  # scale (and minimum) codes + one fp16 step per row (or super-block) for each
            n = 2 if self.minimum else 1
            steps = rows * self.steps_per_row(cols) * STEP_BITS
            return _packed_bits(rows * cols, self.bits) + n * (_packed_bits(groups, self.scale_bits) + steps)
        zeros = {"sym": 0, "int": _packed_bits(groups, self.bits), "min": groups * MIN_BITS}[self.grid]
        return _packed_bits(rows * cols, self.bits) + groups * SCALE_BITS + zeros

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.storage_bits(rows, cols) / (rows * cols)

    @property
    def name(self) -> str:
        g = "row" if self.group_size == 0 else f"g{self.group_size}"
        dq = (f"-dq{self.scale_bits}" if self.double else "") + (f"-s{self.super_block}" if self.super_block else "")
        hi = f"-hi{self.high}" if self.high else ""
        return f"int{self.bits}-{g}-{'asym' if self.grid == 'int' else self.grid}{dq}{hi}"

    def to_dict(self) -> dict:
        d = asdict(self)  # the newer fields only when they are set: plain specs read as before
        if not self.minimum:
            del d["minimum"]
        if not self.double:
            del d["scale_bits"]
        if not self.super_block:
            del d["super_block"]
        if not self.high:
            del d["high"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "group_size", "symmetric", "minimum", "scale_bits", "super_block", "high"}
        if unknown:
            raise ValueError(f"unknown QuantSpec keys: {sorted(unknown)}")
        if "bits" not in d:
            raise ValueError(f"a format needs 'bits' (one of {BITS}); got {d}")
        return cls(int(d["bits"]), int(d.get("group_size", 0)), bool(d.get("symmetric", False)),
                   bool(d.get("minimum", False)), int(d.get("scale_bits", SCALE_BITS)), int(d.get("super_block", 0)),
                   int(d.get("high", 0)))


HIGH = QuantSpec(8)  # the leading columns of a split row: 8-bit asymmetric, one group a row


def _packed_bits(n: int, bits: int) -> int:
    """Codes are packed 8 at a time into `bits` bytes (see runtime.pack): padding up to a multiple of 8 codes."""
    return -(-n // 8) * 8 * bits


@dataclass
class QuantizedTensor:
    """What is stored, unpacked: integer codes (rows × cols, uint8); per group (rows × groups) fp16 scales and
    uint8 integer zeros or fp16 minima ("min"); with double quantization, uint8 scale (and minimum) codes instead,
    and `steps` (rows × k or 2k, fp16, k steps per row): Δs (and Δm) of each row, or of each super-block of a row
    (Δs₀, Δm₀, Δs₁, Δm₁, …). A split spec's (`spec.high`) codes, scales and zeros are those of the columns after
    the high ones; `high` holds those (in format HIGH)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    steps: torch.Tensor | None = None
    high: "QuantizedTensor | None" = None

    def __post_init__(self):
        if (self.high is not None) != bool(self.spec.high):
            raise ValueError(f"{self.spec.name}: a split format holds its high columns, and only it does")

    def grid_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of every group as the reference `dequantize` takes them: float32 scales, and integer
        zeros or float minima."""
        if not self.spec.double:
            return self.scales, self.zeros
        return decode_scales(self.scales, self.zeros, self.steps, self.spec)

    def dequantize(self) -> torch.Tensor:
        low = dequantize(self.codes, *self.grid_values(), self.spec.group(self.codes.shape[1] + self.spec.high))
        return low if self.high is None else torch.cat([self.high.dequantize(), low], 1)

    @staticmethod
    def stack(parts: "list[QuantizedTensor]") -> "QuantizedTensor":
        """Row blocks of one format, stacked in order."""
        def cat(ts):
            return None if ts[0] is None else torch.cat(ts)
        return QuantizedTensor(cat([p.codes for p in parts]), cat([p.scales for p in parts]),
                               cat([p.zeros for p in parts]), parts[0].spec, cat([p.steps for p in parts]),
                               None if parts[0].high is None else QuantizedTensor.stack([p.high for p in parts]))

    def select(self, rows) -> "QuantizedTensor":
        """The same rows (a slice or indices) of every stored tensor."""
        return QuantizedTensor(self.codes[rows], self.scales[rows], self.zeros[rows], self.spec,
                               None if self.steps is None else self.steps[rows],
                               None if self.high is None else self.high.select(rows))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The reference, in float32, one (s, z) per `group` consecutive columns: (q - z) · s for integer zeros,
    q · s + m for fp16 minima (floating `zeros`)."""
    rows, cols = codes.shape
    q = codes.float().view(rows, cols // group, group)
    s, z = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    w = q * s + z if zeros.is_floating_point() else (q - z) * s
    return w.view(rows, cols)


def fit_params(w: torch.Tensor, maxq: torch.Tensor, grid: str, shrink: float | torch.Tensor = 1.0):
    """Min/max grid for each row of `w` (rows × g), its range shrunk by `shrink` (clipping).

    `maxq` is rows × 1 so that rows of different widths can be solved together. Returns (scale, zero), rows × 1:
    scale already rounded to fp16 (what is stored; negative for some symmetric rows), zero an integer in [0, maxq]
    ("int", "sym") or, for "min", the real number −m/s of the fp16 minimum m (so (q − z)·s is the value).
    """
    if grid == "min":  # no need to include 0: shrink towards the middle of the range
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * shrink
        scale = (2 * half / maxq).clamp(min=1e-6).half().float()
        return scale, -(mid - half).half().float() / scale
    if grid == "sym":
        zero = torch.floor((maxq + 1) / 2)
        extreme = w.gather(1, w.abs().argmax(1, keepdim=True))  # signed: it lands on code 0, the longer side
        scale = -extreme * shrink / zero
        scale = torch.where(scale.abs() < 1e-6, torch.full_like(scale, 1e-6), scale).half().float()
        return scale, zero.expand_as(scale)
    lo = w.amin(1, keepdim=True).clamp(max=0) * shrink
    hi = w.amax(1, keepdim=True).clamp(min=0) * shrink
    scale = ((hi - lo) / maxq).clamp(min=1e-6).half().float()
    zero = torch.minimum(torch.round(-lo / scale).clamp(min=0), maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Codes (float, integral values) for `w` on the grid (scale, zero); all broadcast against w."""
    return torch.minimum((w / scale).add_(zero).round_().clamp_(min=0), maxq)


def quantize(w: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> QuantizedTensor:
    """Reference round-to-nearest quantization of a rows × cols weight (`shrink` per row-group or scalar)."""
    rows, cols = w.shape
    if not spec.fits(cols):
        raise ValueError(f"{spec.name} does not fit rows of {cols} weights")
    if spec.high:
        low = quantize(w[:, spec.high:], spec.low, shrink)
        return QuantizedTensor(low.codes, low.scales, low.zeros, spec, low.steps, quantize(w[:, :spec.high], HIGH))
    g = spec.group(cols)
    wg = w.float().reshape(rows * (cols // g), g)
    maxq = torch.full((wg.shape[0], 1), float(spec.maxq))
    if isinstance(shrink, torch.Tensor):
        shrink = shrink.reshape(-1, 1)
    scale, zero = fit_params(wg, maxq, spec.grid, shrink)
    dq = DoubleQuant.of(w.float(), g, maxq[:rows], spec.grid, spec.scale_bits, spec.super_block)
    if dq is not None:
        scale, zero = dq.snap(scale, zero)
    codes = quantize_codes(wg, scale, zero, maxq).to(torch.uint8).view(rows, cols)
    if dq is not None:
        scales, zeros, steps = dq.encode(scale, zero)
        return QuantizedTensor(codes, scales, zeros, spec, steps)
    return QuantizedTensor(codes, scale.half().view(rows, -1), stored_zeros(scale, zero, spec.grid).view(rows, -1),
                           spec)


def stored_zeros(scale: torch.Tensor, zero: torch.Tensor, grid: str) -> torch.Tensor:
    """What is stored for fit_params' zeros: uint8 integer zeros, or the fp16 minima m = −z·s of "min" grids."""
    return (-zero * scale).half() if grid == "min" else zero.to(torch.uint8)


# --- double-quantized scales ----------------------------------------------------------------------------------

def _code_range(scale_bits: int, signed: bool) -> tuple[int, int]:
    half = 1 << (scale_bits - 1)
    return (-half, half - 1) if signed else (1, (1 << scale_bits) - 1)


def row_steps(w: torch.Tensor, group: int, maxq: torch.Tensor, grid: str, scale_bits: int) -> torch.Tensor:
    """The fp16 steps (Δs, Δm) of each row (rows × 2, float32 holding fp16 values), from the min/max grids of the
    row's groups: the largest scale (minimum) of the row takes the largest code. `maxq` is rows × 1."""
    rows, cols = w.shape
    groups = cols // group
    s, z = fit_params(w.reshape(-1, group), maxq.repeat_interleave(groups, 0), grid)
    ds = s.view(rows, groups).abs().amax(1) / _code_range(scale_bits, grid == "sym")[1]
    if grid == "min":
        dm = (-z * s).view(rows, groups).abs().amax(1) / _code_range(scale_bits, True)[1]
    else:
        dm = torch.zeros_like(ds)
    steps = torch.stack([ds, dm], 1).half().float()
    return torch.where(steps > 0, steps, torch.full_like(steps, 2.0 ** -24))  # fp16's smallest step, never 0


def snap(scale: torch.Tensor, zero: torch.Tensor, steps: torch.Tensor, grid: str, scale_bits: int):
    """The nearest representable (scale, zero) under a row's steps (steps rows × 2 against scale rows × 1)."""
    ds, dm = steps[:, :1], steps[:, 1:]
    lo, hi = _code_range(scale_bits, grid == "sym")
    c = (scale / ds).round().clamp(lo, hi)
    if grid == "sym":
        return ds * torch.where(c == 0, torch.ones_like(c), c), zero
    s = ds * c
    m = dm * (-zero * scale / dm).round().clamp(*_code_range(scale_bits, True))
    return s, -m / s


@dataclass
class DoubleQuant:
    """The per-row steps of a double-quantized solve, fixed before it from the original weights; solvers snap
    every grid they fit to them."""

    steps: torch.Tensor  # (rows · k) × 2: k steps per row, one per super-block
    grid: str
    scale_bits: int
    per_row: int = 1  # k

    @classmethod
    def of(cls, w: torch.Tensor, group: int, maxq: torch.Tensor, grid: str, scale_bits: int,
           super_block: int = 0) -> "DoubleQuant | None":
        if scale_bits == SCALE_BITS:
            return None
        if grid not in ("sym", "min"):
            raise ValueError("double-quantized scales need a symmetric or a minimum grid")
        k = w.shape[1] // super_block if super_block else 1  # a super-block is a row of its own for the steps
        steps = row_steps(w.reshape(-1, w.shape[1] // k), group, maxq.repeat_interleave(k, 0), grid, scale_bits)
        return cls(steps, grid, scale_bits, k)

    def column(self, gi: int, groups: int) -> "DoubleQuant":
        """The steps of group column `gi` (of `groups` in a row): rows × 2, for a solver that fits one column of
        groups at a time."""
        return DoubleQuant(self.steps.view(-1, self.per_row, 2)[:, gi * self.per_row // groups], self.grid,
                           self.scale_bits)

    def snap(self, scale: torch.Tensor, zero: torch.Tensor):
        """Snap (scale, zero) of rows × 1 grids; (rows · groups) × 1 are expanded to their row's steps."""
        steps = self.steps
        if scale.shape[0] != steps.shape[0]:
            steps = steps.repeat_interleave(scale.shape[0] // steps.shape[0], 0)
        return snap(scale, zero, steps, self.grid, self.scale_bits)

    def encode(self, scale: torch.Tensor, zero: torch.Tensor):
        """rows × groups snapped grids → stored (scale codes, zero codes, fp16 steps rows × k or 2k)."""
        blocks, rows = self.steps.shape[0], self.steps.shape[0] // self.per_row
        scale, zero = scale.reshape(blocks, -1), zero.reshape(blocks, -1)
        sc, zc = encode_scales(scale, zero, self.steps, self.grid, self.scale_bits)
        steps = self.steps[:, :2 if self.grid == "min" else 1].half().reshape(rows, -1)
        return sc.reshape(rows, -1), zc.reshape(rows, -1), steps


def encode_scales(scale, zero, steps, grid: str, scale_bits: int):
    """Snapped (scale, zero) of every group (rows × groups) → the stored uint8 codes (scales, zeros)."""
    half = 1 << (scale_bits - 1)
    ds, dm = steps[:, :1], steps[:, 1:]
    if grid == "sym":
        return ((scale / ds).round() + half).to(torch.uint8), zero.to(torch.uint8)
    return (scale / ds).round().to(torch.uint8), ((-zero * scale / dm).round() + half).to(torch.uint8)


def decode_scales(scales: torch.Tensor, zeros: torch.Tensor, steps: torch.Tensor, spec: QuantSpec):
    """The reference decoding of double-quantized scales: float32 (scale, zero-or-minimum) of every group."""
    half = 1 << (spec.scale_bits - 1)
    rows, groups = scales.shape
    k = steps.shape[1] // (2 if spec.grid == "min" else 1)  # steps per row
    steps = steps.float().reshape(rows * k, -1)
    ds = steps[:, :1]
    if spec.grid == "sym":
        return (ds * (scales.float().reshape(rows * k, -1) - half)).reshape(rows, groups), zeros
    s = ds * scales.float().reshape(rows * k, -1)
    m = steps[:, 1:] * (zeros.float().reshape(rows * k, -1) - half)
    return s.reshape(rows, groups), m.reshape(rows, groups)
