"""Storage formats: `QuantSpec`, the reference quantize/dequantize pair, exact bit accounting.

Semantics (the reference every kernel and exporter must match), for a weight of rows × cols split into
groups of `group_size` consecutive columns:

    w ≈ (level(q) - z) · s    q ∈ [0, 2^bits - 1] integer code, s fp16 scale, z the zero, one (s, z) per group

The grid (`QuantSpec.grid`, a registered `mixq.grids.Grid`) says what level(q) is and what z is stored as:
- "int" (asymmetric): level(q) = q, z stored `bits` wide.
- "sym": level(q) = q, no zero stored: z is the constant 2^(bits-1), and the scale is signed so that the weight of
  largest magnitude lands on code 0, the longer side of the grid (as llama.cpp's Q4_0: no level is wasted).
- "min": level(q) = q, an fp16 minimum m instead of an integer zero, w ≈ q · s + m (llama.cpp's Q4_1 / Q5_1;
  HQQ's float zero): the grid's offset is free, not a multiple of the step.
- "kmin": as "min" with the minimum never above 0 (llama.cpp's Q2_K / Q4_K / Q5_K); double-quantized only.
- level grids ("nf": normal-float, NF4 at 4 bits; "iq4nl": llama.cpp's IQ4_NL levels): level(q) = L[q], a fixed
  table of 2^bits non-uniform levels, z = 0 and nothing stored, the scale signed.
- "lk", a learned level grid: as a level grid, with a table of each layer's own (fitted by weighted k-means, see
  grids.learned), stored beside the layer as 2^bits fp16 levels that count in its bits (QuantizedTensor's
  `learned_levels`).
- "bcq", binary coding: `bits` fp16 scales α a group and w = Σ_i α_i · (2 · bit_i(q) − 1) (grids.bcq), fitted by
  its own solver (solvers.bcq) and decoded by its grid (`Grid.decode`).
Grids other than int, sym and min are named by `QuantSpec.grid_name`.

A split row (`high` > 0, for ResQ's high-variance subspace, transforms.resq): the leading `high` columns of each
row are stored apart as 8-bit asymmetric codes with one fp16 scale and zero a row (`HIGH`), the rest as above;
group sizes then count in the rest (cols − high).

Double quantization (`scale_bits` 4, 6 or 8; every grid but "int", as llama.cpp's k-quants): instead of fp16,
each group's scale (and minimum) is stored as a `scale_bits`-wide code times an fp16 step per row:
s = Δs · c (unsigned c ≥ 1, "min") or Δs · (c − 2^(scale_bits-1)) (signed scales: "sym" and the level grids);
m = Δm · (c − 2^(scale_bits-1)) ("min"), or −Δm · c with an unsigned c ("kmin").
Small groups then cost little: 4-bit group 32 with 6-bit scale and minimum codes is 4.375 bits + 32 bits a row.
With `super_block` (256: llama.cpp's k-quant super-blocks) the steps are per `super_block` consecutive weights of a
row instead of per row: sym 3 bits, groups of 16, 6-bit scale codes, super-blocks of 256 is ggml's Q3_K exactly
(w = d · (sc − 32) · (q − 4)), and sym 6 bits with 8-bit codes is Q6_K; "iq4nl" with groups of 32 and 6-bit codes is
IQ4_XS.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import torch

from .grids import GRIDS as _REGISTRY, Grid, grid_of
from .grids.learned import LEVEL_BITS

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 96, 128, 192, 256)  # 0 means one group per whole row
SUPER_BLOCKS = (256,)  # weights per double-quantization step; 0 means one step per row
SCALE_BITS = 16  # scales are stored as fp16
MIN_BITS = 16  # so are the minima of "min" grids
GRIDS = tuple(sorted(_REGISTRY, key=lambda n: not _REGISTRY[n].uniform))  # the uniform grids, then level grids
BASE_GRIDS = ("int", "sym", "min")  # the grids QuantSpec's flags say (symmetric, minimum); others by grid_name
SCALE_CODE_BITS = (4, 6, 8)  # widths of double-quantized scale codes
STEP_BITS = 16  # the per-row steps of double-quantized scales and minima are fp16


def grids_for(bits: int, double: bool = False) -> tuple[str, ...]:
    """The grids of one scale a group that take `bits`-wide codes with fp16 scales (`double`: with scale codes):
    those every solver fits (not binary coding's, which has a solver of its own)."""
    return tuple(n for n in GRIDS if bits in grid_of(n).bits and (double or not grid_of(n).double_only)
                 and not (double and grid_of(n).zero == "int") and grid_of(n).solver is None)


@dataclass(frozen=True)
class QuantSpec:
    """A grid of `bits`-wide codes with one scale per group: uniform with a `bits`-wide zero (asymmetric), no zero
    (`symmetric`) or an fp16 minimum (`minimum`); or another grid of mixq.grids by its `grid_name` (a level grid,
    or llama.cpp's k-quant minimum)."""

    bits: int
    group_size: int = 0  # 0: whole row
    symmetric: bool = False
    minimum: bool = False
    scale_bits: int = SCALE_BITS  # 16: fp16 scales; 4, 6 or 8: double-quantized (codes + an fp16 step per row)
    super_block: int = 0  # double-quantized: weights per step (0: the whole row)
    high: int = 0  # leading columns of each row stored apart at 8 bits (a split row); 0: none
    grid_name: str = ""  # a grid beyond int, sym and min, by its name in mixq.grids (nf, iq4nl, kmin); "": none

    def __post_init__(self):
        if self.grid_name:
            named = [n for n in GRIDS if n not in BASE_GRIDS]
            if self.grid_name in BASE_GRIDS or self.grid_name not in GRIDS:
                raise ValueError(f"grid_name names one of {named} (int, sym and min are flags), got "
                                 f"{self.grid_name!r}")
            g = grid_of(self.grid_name)
            if self.symmetric or self.minimum != (g.zero == "float"):
                raise ValueError(f"grid {self.grid_name}: symmetric and minimum follow from the grid (use "
                                 "QuantSpec.of)")
            if self.bits not in g.bits:
                raise ValueError(f"grid {self.grid_name} takes bits {g.bits}, got {self.bits}")
            if g.double_only and self.scale_bits == SCALE_BITS:
                raise ValueError(f"grid {self.grid_name} stores its scales and minima as codes: give scale_bits "
                                 f"(one of {SCALE_CODE_BITS})")
            if g.solver is not None and self.high:
                raise ValueError(f"grid {self.grid_name} is solved by its own solver, which splits no rows")
            if g.solver is not None and self.scale_bits != SCALE_BITS and not g.odd_scale_codes:
                raise ValueError(f"grid {self.grid_name} stores fp16 scales of its own (no scale codes)")
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
        if self.double and self.grid_type.zero == "int":
            raise ValueError("double-quantized scales need a grid without an integer zero (sym, min or levels)")
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
        named = "" if grid in BASE_GRIDS else grid
        return cls(bits, group_size, grid == "sym", grid_of(grid).zero == "float", scale_bits, super_block,
                   grid_name=named)

    @property
    def double(self) -> bool:
        """Double-quantized scales."""
        return self.scale_bits != SCALE_BITS

    @property
    def grid(self) -> str:
        return self.grid_name or ("sym" if self.symmetric else "min" if self.minimum else "int")

    @property
    def grid_type(self) -> Grid:
        return grid_of(self.grid)

    def levels(self) -> torch.Tensor | None:
        """A level grid's 2^bits levels (float32), or None on a uniform grid (level(q) = q); a learned grid's are
        each layer's own (QuantizedTensor.levels)."""
        g = self.grid_type
        if g.learned:
            raise ValueError(f"{self.name}: a learned grid's levels are each layer's own (QuantizedTensor.levels)")
        return None if g.uniform else g.table(self.bits).float()

    def table_bits(self) -> int:
        """Stored bits of the levels a layer keeps of its own (a learned grid's 2^bits fp16 levels), else 0."""
        return (1 << self.bits) * LEVEL_BITS if self.grid_type.learned else 0

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def group(self, cols: int) -> int:
        """The group width for a row of `cols` weights (in its columns after the `high` ones)."""
        return cols - self.high if self.group_size == 0 else self.group_size

    def fits(self, cols: int) -> bool:
        low = cols - self.high
        return (low > 0 and low % self.group(cols) == 0 and low % (self.super_block or low) == 0
                and low % self.grid_type.row_multiple == 0)

    @property
    def low(self) -> "QuantSpec":
        """The format of the columns after the `high` ones."""
        return replace(self, high=0)

    def steps_per_row(self, cols: int) -> int:
        """Double-quantization steps (of scales; as many again of minima) in a row of `cols` weights."""
        return cols // self.super_block if self.super_block else 1

    def overhead_bits_per_group(self) -> int:
        return SCALE_BITS * self.grid_type.scales_per_group(self.bits) + self.grid_type.zero_bits(self.bits)

    def storage_bits(self, rows: int, cols: int) -> int:
        """Exact stored bits for a rows × cols weight: codes + scales + zeros, as packed by `runtime.pack`."""
        if not self.fits(cols):
            raise ValueError(f"{self.name} does not fit rows of {cols} weights")
        if self.high:
            return HIGH.storage_bits(rows, self.high) + self.low.storage_bits(rows, cols - self.high)
        groups = rows * (cols // self.group(cols))
        if self.double:  # scale (and minimum) codes + one fp16 step per row (or super-block) for each
            n = 2 if self.minimum else 1  # (no grid with an integer zero is double-quantized)
            steps = rows * self.steps_per_row(cols) * STEP_BITS
            return (self.grid_type.code_bits(rows * cols, self.bits) + n * (_packed_bits(groups, self.scale_bits)
                                                                               + steps) + self.table_bits())
        zeros = {"none": 0, "int": _packed_bits(groups, self.bits), "float": groups * MIN_BITS}[self.grid_type.zero]
        scales = groups * SCALE_BITS * self.grid_type.scales_per_group(self.bits)
        return self.grid_type.code_bits(rows * cols, self.bits) + scales + zeros + self.table_bits()

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return self.storage_bits(rows, cols) / (rows * cols)

    @property
    def name(self) -> str:
        g = "row" if self.group_size == 0 else f"g{self.group_size}"
        dq = (f"-dq{self.scale_bits}" if self.double else "") + (f"-s{self.super_block}" if self.super_block else "")
        hi = f"-hi{self.high}" if self.high else ""
        if not self.grid_type.uniform:
            return f"{self.grid_type.label(self.bits)}-{g}{dq}{hi}"
        return f"int{self.bits}-{g}-{'asym' if self.grid == 'int' else self.grid}{dq}{hi}"

    @classmethod
    def from_name(cls, text: str) -> "QuantSpec":
        """The spec `name` writes: int3-g64-min, int4-g32-min-dq6, int3-g16-sym-dq6-s256, nf4-g64, iq4nl-g32, …"""
        example = ("write e.g. int3-g64-min, int4-g32-min-dq6, int4-g32-kmin-dq6-s256, nf4-g64, lk3-g64-dq6, "
                   "iq4nl-g32, bcq2-g64 or iq2-g64")
        m = re.fullmatch(r"([a-z0-9]+?)-(row|g\d+)(?:-([a-z]+))?(?:-dq(\d+))?(?:-s(\d+))?(?:-hi(\d+))?",
                         text.strip())
        if not m:
            raise ValueError(f"cannot read format {text!r}: {example}")
        head, group, kind, dq, sb, hi = m.groups()
        group_size = 0 if group == "row" else int(group[1:])
        uniform = re.fullmatch(r"int(\d)", head)
        if uniform and kind:
            grid, bits = {"asym": "int"}.get(kind, kind), int(uniform.group(1))
            if grid not in GRIDS or not grid_of(grid).uniform or kind == "int":
                raise ValueError(f"cannot read format {text!r}: {example}")
        else:
            found = [(g, b) for g in GRIDS if not grid_of(g).uniform for b in grid_of(g).bits
                     if grid_of(g).label(b) == head and not kind]
            if not found:
                named = [g for g in GRIDS if not grid_of(g).uniform and re.fullmatch(rf"{g}\d+", head) and not kind]
                if named:  # a known grid at a width it does not take
                    raise ValueError(f"cannot read format {text!r}: grid {named[0]} takes bits "
                                     f"{', '.join(map(str, grid_of(named[0]).bits))}")
                raise ValueError(f"cannot read format {text!r}: {example}")
            grid, bits = found[0]
        spec = replace(cls.of(bits, group_size, grid, int(dq) if dq else SCALE_BITS, int(sb) if sb else 0),
                       high=int(hi or 0))
        if spec.name != text.strip():
            raise ValueError(f"cannot read format {text!r}: {example}")
        return spec

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
        if not self.grid_name:
            del d["grid_name"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "group_size", "symmetric", "minimum", "scale_bits", "super_block", "high",
                            "grid_name"}
        if unknown:
            raise ValueError(f"unknown QuantSpec keys: {sorted(unknown)}")
        if "bits" not in d:
            raise ValueError(f"a format needs 'bits' (one of {BITS}); got {d}")
        return cls(int(d["bits"]), int(d.get("group_size", 0)), bool(d.get("symmetric", False)),
                   bool(d.get("minimum", False)), int(d.get("scale_bits", SCALE_BITS)), int(d.get("super_block", 0)),
                   int(d.get("high", 0)), str(d.get("grid_name", "")))


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
    the high ones; `high` holds those (in format HIGH). A learned grid's levels (2^bits, float32 holding fp16 values)
    are `learned_levels`. Binary coding's scales are its α, rows × groups · bits (plane i of group g at g · bits + i),
    and its zeros 0."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    steps: torch.Tensor | None = None
    high: "QuantizedTensor | None" = None
    learned_levels: torch.Tensor | None = None

    def __post_init__(self):
        if (self.high is not None) != bool(self.spec.high):
            raise ValueError(f"{self.spec.name}: a split format holds its high columns, and only it does")
        if (self.learned_levels is not None) != self.spec.grid_type.learned:
            raise ValueError(f"{self.spec.name}: a learned grid holds its levels, and only it does")

    def grid_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of every group as the reference `dequantize` takes them: float32 scales, and integer
        zeros or float minima."""
        if not self.spec.double:
            return self.scales, self.zeros
        return decode_scales(self.scales, self.zeros, self.steps, self.spec.grid, self.spec.scale_bits)

    def levels(self) -> torch.Tensor | None:
        """The level table of a level grid (the layer's own on a learned grid), None on a uniform grid."""
        return self.learned_levels if self.learned_levels is not None else self.spec.levels()

    def dequantize(self) -> torch.Tensor:
        if self.spec.grid_type.solver is not None:  # a grid of several scales a group decodes itself
            return self.spec.grid_type.decode(self.codes, self.grid_values()[0], self.spec.group(self.codes.shape[1]),
                                              self.spec.bits)
        low = dequantize(self.codes, *self.grid_values(), self.spec.group(self.codes.shape[1] + self.spec.high),
                         self.levels())
        return low if self.high is None else torch.cat([self.high.dequantize(), low], 1)

    @staticmethod
    def stack(parts: "list[QuantizedTensor]") -> "QuantizedTensor":
        """Row blocks of one format, stacked in order."""
        def cat(ts):
            return None if ts[0] is None else torch.cat(ts)
        if any(p.learned_levels is not None and not torch.equal(p.learned_levels, parts[0].learned_levels)
               for p in parts):
            raise ValueError(f"{parts[0].spec.name}: row blocks with levels of their own do not stack into one layer")
        return QuantizedTensor(cat([p.codes for p in parts]), cat([p.scales for p in parts]),
                               cat([p.zeros for p in parts]), parts[0].spec, cat([p.steps for p in parts]),
                               None if parts[0].high is None else QuantizedTensor.stack([p.high for p in parts]),
                               parts[0].learned_levels)

    def select(self, rows) -> "QuantizedTensor":
        """The same rows (a slice or indices) of every stored tensor."""
        return QuantizedTensor(self.codes[rows], self.scales[rows], self.zeros[rows], self.spec,
                               None if self.steps is None else self.steps[rows],
                               None if self.high is None else self.high.select(rows), self.learned_levels)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
               levels: torch.Tensor | None = None) -> torch.Tensor:
    """The reference, in float32, one (s, z) per `group` consecutive columns: (q - z) · s for integer zeros,
    q · s + m for fp16 minima (floating `zeros`); with a level grid's `levels`, L[q] in place of q (z = 0)."""
    rows, cols = codes.shape
    q = (codes.float() if levels is None else levels[codes.long()]).view(rows, cols // group, group)
    s, z = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    w = q * s + z if zeros.is_floating_point() else (q - z) * s
    return w.view(rows, cols)


def fit_params(w: torch.Tensor, maxq: torch.Tensor, grid: "str | Grid", shrink: float | torch.Tensor = 1.0):
    """The `grid`'s (scale, zero) for each row of `w` (rows × g), its range shrunk by `shrink` (clipping): the
    min/max grid of a uniform grid, the absmax of a level grid (Grid.fit).

    `maxq` is rows × 1 so that rows of different widths can be solved together. Returns (scale, zero), rows × 1:
    scale already rounded to fp16 (what is stored; negative for some symmetric rows), zero an integer in [0, maxq]
    ("int", "sym"), 0 (level grids) or, for "min", the real number −m/s of the fp16 minimum m (so (q − z)·s is the
    value).
    """
    return grid_of(grid).fit(w, maxq, shrink)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                   grid: "str | Grid") -> torch.Tensor:
    """Codes (float, integral values) for `w` on the `grid` (scale, zero); all broadcast against w."""
    return grid_of(grid).encode(w, scale, zero, maxq)


def quantize(w: torch.Tensor, spec: QuantSpec, shrink: float | torch.Tensor = 1.0) -> QuantizedTensor:
    """Reference round-to-nearest quantization of a rows × cols weight (`shrink` per row-group or scalar)."""
    rows, cols = w.shape
    if not spec.fits(cols):
        raise ValueError(f"{spec.name} does not fit rows of {cols} weights")
    if spec.high:
        low = quantize(w[:, spec.high:], spec.low, shrink)
        return QuantizedTensor(low.codes, low.scales, low.zeros, spec, low.steps, quantize(w[:, :spec.high], HIGH),
                               low.learned_levels)
    g = spec.group(cols)
    wg = w.float().reshape(rows * (cols // g), g)
    if spec.grid_type.solver is not None:  # a grid of several scales a group: its own fit, every weight alike
        from .solvers import SOLVERS

        return SOLVERS.lookup(spec.grid_type.solver).reference(w.float(), spec)
    maxq = torch.full((wg.shape[0], 1), float(spec.maxq))
    if isinstance(shrink, torch.Tensor):
        shrink = shrink.reshape(-1, 1)
    grid = spec.grid_type.for_layer(w, torch.ones(cols), g, [spec.bits])  # (a learned grid: every column alike)
    learned = grid.table(spec.bits).float() if grid.learned else None
    scale, zero = fit_params(wg, maxq, grid, shrink)
    dq = DoubleQuant.of(w.float(), g, maxq[:rows], grid, spec.scale_bits, spec.super_block)
    if dq is not None:
        scale, zero = dq.snap(scale, zero)
    codes = quantize_codes(wg, scale, zero, maxq, grid).to(torch.uint8).view(rows, cols)
    if dq is not None:
        scales, zeros, steps = dq.encode(scale, zero)
        return QuantizedTensor(codes, scales, zeros, spec, steps, learned_levels=learned)
    return QuantizedTensor(codes, scale.half().view(rows, -1), stored_zeros(scale, zero, grid).view(rows, -1),
                           spec, learned_levels=learned)


def stored_zeros(scale: torch.Tensor, zero: torch.Tensor, grid: "str | Grid") -> torch.Tensor:
    """What is stored for fit_params' zeros: uint8 integer zeros (0 on level grids), or the fp16 minima m = −z·s of
    "min" grids."""
    return (-zero * scale).half() if grid_of(grid).zero == "float" else zero.to(torch.uint8)


# --- double-quantized scales ----------------------------------------------------------------------------------

def _code_range(scale_bits: int, signed: bool) -> tuple[int, int]:
    half = 1 << (scale_bits - 1)
    return (-half, half - 1) if signed else (1, (1 << scale_bits) - 1)


def min_codes(grid: "str | Grid", scale_bits: int) -> tuple[int, int, int]:
    """(lowest code, highest code, sign) of a double-quantized minimum: m = sign · Δm · c."""
    if grid_of(grid).negative_min:
        return 0, (1 << scale_bits) - 1, -1
    return (*_code_range(scale_bits, True), 1)


def row_steps(w: torch.Tensor, group: int, maxq: torch.Tensor, grid: "str | Grid", scale_bits: int) -> torch.Tensor:
    """The fp16 steps (Δs, Δm) of each row (rows × 2, float32 holding fp16 values), from the min/max grids of the
    row's groups: the largest scale (minimum) of the row takes the largest code. `maxq` is rows × 1."""
    rows, cols = w.shape
    groups = cols // group
    s, z = fit_params(w.reshape(-1, group), maxq.repeat_interleave(groups, 0), grid)
    ds = s.view(rows, groups).abs().amax(1) / _code_range(scale_bits, grid_of(grid).signed_scale)[1]
    if grid_of(grid).zero == "float":
        dm = (-z * s).view(rows, groups).abs().amax(1) / min_codes(grid, scale_bits)[1]
    else:
        dm = torch.zeros_like(ds)
    steps = torch.stack([ds, dm], 1).half().float()
    return torch.where(steps > 0, steps, torch.full_like(steps, 2.0 ** -24))  # fp16's smallest step, never 0


def snap(scale: torch.Tensor, zero: torch.Tensor, steps: torch.Tensor, grid: "str | Grid", scale_bits: int):
    """The nearest representable (scale, zero) under a row's steps (steps rows × 2 against scale rows × 1)."""
    ds, dm = steps[:, :1], steps[:, 1:]
    signed = grid_of(grid).signed_scale
    lo, hi = _code_range(scale_bits, signed)
    c = (scale / ds).round().clamp(lo, hi)
    if signed:
        return ds * torch.where(c == 0, torch.ones_like(c), c), zero
    s = ds * c
    lo, hi, sign = min_codes(grid, scale_bits)
    m = sign * dm * (sign * -zero * scale / dm).round().clamp(lo, hi)
    return s, -m / s


@dataclass
class DoubleQuant:
    """The per-row steps of a double-quantized solve, fixed before it from the original weights; solvers snap
    every grid they fit to them."""

    steps: torch.Tensor  # (rows · k) × 2: k steps per row, one per super-block
    grid: "str | Grid"
    scale_bits: int
    per_row: int = 1  # k

    @classmethod
    def of(cls, w: torch.Tensor, group: int, maxq: torch.Tensor, grid: "str | Grid", scale_bits: int,
           super_block: int = 0) -> "DoubleQuant | None":
        if scale_bits == SCALE_BITS:
            return None
        if grid_of(grid).zero == "int":
            raise ValueError("double-quantized scales need a grid without an integer zero (sym, min or levels)")
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
        steps = self.steps[:, :2 if grid_of(self.grid).zero == "float" else 1].half().reshape(rows, -1)
        return sc.reshape(rows, -1), zc.reshape(rows, -1), steps


def encode_scales(scale, zero, steps, grid: "str | Grid", scale_bits: int):
    """Snapped (scale, zero) of every group (rows × groups) → the stored uint8 codes (scales, zeros)."""
    half = 1 << (scale_bits - 1)
    ds, dm = steps[:, :1], steps[:, 1:]
    if grid_of(grid).signed_scale:
        return ((scale / ds).round() + half).to(torch.uint8), zero.to(torch.uint8)
    lo, _, sign = min_codes(grid, scale_bits)
    return (scale / ds).round().to(torch.uint8), ((sign * -zero * scale / dm).round() - lo).to(torch.uint8)


def decode_scales(scales: torch.Tensor, zeros: torch.Tensor, steps: torch.Tensor, grid: "str | Grid", scale_bits: int):
    """The reference decoding of double-quantized scales (`scale_bits`-wide codes on `grid`): float32 (scale,
    zero-or-minimum) of every group."""
    half = 1 << (scale_bits - 1)
    rows, groups = scales.shape
    minimum = grid_of(grid).zero == "float"
    k = steps.shape[1] // (2 if minimum else 1)  # steps per row
    steps = steps.float().reshape(rows * k, -1)
    ds = steps[:, :1]
    if grid_of(grid).odd_scale_codes:  # (the i-quants' scales: positive, odd multiples of the step)
        return (ds * (2 * scales.float().reshape(rows * k, -1) + 1)).reshape(rows, groups), zeros
    if not minimum:
        return (ds * (scales.float().reshape(rows * k, -1) - half)).reshape(rows, groups), zeros
    s = ds * scales.float().reshape(rows * k, -1)
    lo, _, sign = min_codes(grid, scale_bits)
    m = sign * steps[:, 1:] * (zeros.float().reshape(rows * k, -1) + lo)
    return s.reshape(rows, groups), m.reshape(rows, groups)
