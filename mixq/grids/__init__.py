"""Grids, registered by name: how a group's weights map to codes and back, given its scale and zero.

Every grid has the value (level(q) − z) · s of code q, with s the group's scale and z its zero:
- uniform grids (`uniform.py`: "int", "sym", "min") have level(q) = q, the integer code itself;
- level grids (`normal.py`'s "nf", `iq4nl.py`'s "iq4nl") have a fixed table of 2^bits levels, level(q) = L[q],
  no zero (z = 0) and a signed scale: w ≈ s · L[q], as bitsandbytes' NF4 and llama.cpp's IQ4_NL; a learned grid
  (`learned.py`'s "lk") has a table of each layer's own, stored with it (`for_layer` gives the layer's grid).
- binary coding (`bcq.py`) stores `bits` scales a group, w = Σ α_i · (±1); the lattice codebooks (`lattice.py`,
  "iq") code 8 or 4 weights at once, w = s · (±c_k) with c a point of llama.cpp's IQ2_S or IQ3_S grid. Each is
  fitted and decoded by its own solver and `decode` (`solver`, `scales_per_group`, `code_bits`), not through fit /
  encode / level.

A grid declares what is stored beside each group's scale (`zero`: nothing, an integer code or an fp16 minimum),
whether its scale is signed (double-quantized scale codes are then signed), and the widths it takes; it fits a
group's (scale, zero), encodes weights to their nearest codes and gives each code's level. `maxq` (2^bits − 1) is
a column of one width per row, so that rows of several widths are solved together (solvers.Rows).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..registry import Registry, import_all

GRIDS = Registry("grid")
OWN_SOLVERS: dict[str, str] = {}  # solver → the grid it alone fits (a grid of several scales a group), kept by register

ZEROS = ("none", "int", "float")  # what a group stores beside its scale: nothing, a `bits`-wide code, an fp16 value
BUCKETIZE_MAX = 8192  # Levels.encode: inputs up to this many weights take a binary search, larger ones the passes


def register(cls: type["Grid"]) -> type["Grid"]:
    """Class decorator: register one instance of a Grid subclass under its `name`."""
    if cls.zero not in ZEROS:
        raise ValueError(f"grid {cls.name!r}: zero must be one of {ZEROS}")
    GRIDS.register(cls.name)(cls())
    if cls.solver is not None:
        OWN_SOLVERS[cls.solver] = cls.name
    return cls


def grid_of(name: "str | Grid") -> "Grid":
    """The registered grid of that name; a grid itself (a layer's own, as a learned grid's) as it is."""
    return name if isinstance(name, Grid) else GRIDS.lookup(name)


class Grid:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    zero: ClassVar[str] = "none"  # stored beside each scale: "none", "int" (bits wide) or "float" (fp16)
    signed_scale: ClassVar[bool] = False  # a scale of either sign (double-quantized: signed codes)
    negative_min: ClassVar[bool] = False  # a float zero that is a minimum ≤ 0 (double-quantized: unsigned codes of −m)
    bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)  # the widths it takes
    uniform: ClassVar[bool] = True  # level(q) = q
    double_only: ClassVar[bool] = False  # its scales (and minima) are stored only as codes (scale_bits < 16)
    learned: ClassVar[bool] = False  # its levels are fitted per layer and stored beside it (`for_layer`)
    solver: ClassVar[str | None] = None  # the one solver that fits it (a grid of several scales a group), or None
    row_multiple: ClassVar[int] = 1  # rows it stores are a multiple of this many weights (bit planes: 8)
    odd_scale_codes: ClassVar[bool] = False  # double-quantized by its own solver, s = step · (2c + 1) (i-quants)

    def scales_per_group(self, bits: int) -> int:
        """fp16 scales stored a group (a binary-coding grid: one a bit)."""
        return 1

    def code_bits(self, weights: int, bits: int) -> int:
        """Stored bits of the codes of `weights` weights: packed 8 at a time into `bits` bytes (runtime.pack),
        padded to a multiple of 8 codes (a codebook of several weights a code: its own)."""
        return -(-weights // 8) * 8 * bits

    def fit(self, w: torch.Tensor, maxq: torch.Tensor, shrink: float | torch.Tensor = 1.0):
        """(scale, zero) of each row of `w` (rows × g; maxq rows × 1), its range shrunk by `shrink`: scale rounded to
        fp16 (what is stored), zero a float column (integral for integer zeros; −m/s for an fp16 minimum m)."""
        raise NotImplementedError

    def encode(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
        """The nearest code (float, integral) of each weight; scale, zero and maxq broadcast against w."""
        raise NotImplementedError

    def level(self, q: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
        """level(q), float: the code itself on a uniform grid."""
        return q

    def value(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
        """(level(q) − z) · s, the weight a code stands for."""
        return (self.level(q, maxq) - zero) * scale

    def coder(self, maxq: torch.Tensor):
        """(encode(w, s, z), value(q, s, z)) for rows of widths `maxq`, fixed: for a solver that codes column after
        column of the same rows (a level grid looks its table rows up once, not per column)."""
        return (lambda w, s, z: self.encode(w, s, z, maxq)), (lambda q, s, z: self.value(q, s, z, maxq))

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, group: int, bits: int) -> torch.Tensor:
        """A grid of several scales a group (`solver`): the reference float32 weights of its codes and scales."""
        raise NotImplementedError(f"grid {self.name} has one scale a group: formats.dequantize decodes it")

    def for_layer(self, weight: torch.Tensor, importance: torch.Tensor, group: int, bits) -> "Grid":
        """The grid a layer is solved on (rows × cols `weight`, `importance` of each column, groups of `group`, the
        widths `bits`): itself, unless its levels are learned per layer."""
        return self

    def fixed_zero(self, bits: int) -> int:
        """z where none is stored (zero "none")."""
        return 0

    def zero_bits(self, bits: int) -> int:
        """Stored bits of one group's zero."""
        return {"none": 0, "int": bits, "float": 16}[self.zero]

    def label(self, bits: int) -> str:
        """The start of a format's name: int4, nf4, …"""
        return f"{self.name}{bits}"


class Levels(Grid):
    """A grid of fixed levels: w ≈ s · L[q], no zero (z = 0), one signed fp16 scale a group that puts the group's
    largest weight on the level of largest magnitude (`fit`); codes are the nearest level's (ties: the lower).
    A subclass gives `table(bits)`, its 2^bits levels in increasing order."""

    zero = "none"
    signed_scale = True
    uniform = False

    def table(self, bits: int) -> torch.Tensor:
        raise NotImplementedError

    def _tables(self):
        """(levels, midpoints, end, row) of every width, padded to the widest: levels w × 2^b, midpoints
        w × (2^b − 1) (+inf past a width's last), end w × 1 (the level of largest magnitude, signed; of two, the
        positive); and the row of each maxq (−1: a width the grid does not take)."""
        if not hasattr(self, "_cache"):
            n = 1 << max(self.bits)
            levels = torch.zeros(len(self.bits), n)
            mids = torch.full((len(self.bits), n - 1), float("inf"))
            for i, b in enumerate(self.bits):
                t = self.table(b).float()
                if t.shape != (1 << b,) or not bool((t[1:] > t[:-1]).all()):
                    raise ValueError(f"grid {self.name}: table({b}) must be 2^{b} increasing levels")
                levels[i, :len(t)], levels[i, len(t):] = t, t[-1]
                mids[i, :len(t) - 1] = (t[1:] + t[:-1]) / 2
            last = n - 1 - levels.abs().flip(1).argmax(1, keepdim=True)  # ties (NF's ±1): the positive one
            end = levels.gather(1, last)
            row = torch.full((256,), -1, dtype=torch.long)
            row[[(1 << b) - 1 for b in self.bits]] = torch.arange(len(self.bits))
            self._cache = levels, mids, end, row
        return self._cache

    def _rows(self, maxq: torch.Tensor) -> torch.Tensor:
        """The table row of each maxq (a column of 2^bits − 1 values)."""
        rows = self._tables()[3][maxq.reshape(-1).long().clamp(0, 255)]
        if bool((rows < 0).any()):
            raise ValueError(f"grid {self.name} takes {self.bits} bits")
        return rows

    def fit(self, w, maxq, shrink=1.0):
        extreme = w.gather(1, w.abs().argmax(1, keepdim=True))
        scale = extreme * shrink / self._tables()[2][self._rows(maxq)]
        scale = torch.where(scale.abs() < 1e-6, torch.full_like(scale, 1e-6), scale).half().float()
        return scale, torch.zeros_like(scale)

    @staticmethod
    def _one(rows: torch.Tensor) -> int | None:
        """The table row when every row is the same, else None."""
        return int(rows[0]) if rows.numel() == 1 or bool((rows == rows[0]).all()) else None

    def _mids(self, row: int) -> torch.Tensor:
        """The midpoints of one width's levels (2^bits − 1)."""
        if not hasattr(self, "_mids_cache"):
            mids = self._tables()[1]
            self._mids_cache = [m[m < float("inf")].contiguous() for m in mids]
        return self._mids_cache[row]

    def encode(self, w, scale, zero, maxq):
        """The number of midpoints below w / s: the nearest level's code (ties: the lower). One width: a binary
        search (torch.bucketize) on small inputs (GPTQ's columns: 20 × faster than passes over 15 midpoints), one
        comparison pass a midpoint on whole groups; rows of several widths: the passes, each row's own."""
        x = w / scale
        rows = self._rows(maxq)
        row = self._one(rows)
        codes = torch.zeros_like(x)
        if row is not None:
            mids = self._mids(row)
            if x.numel() <= BUCKETIZE_MAX:
                return torch.bucketize(x, mids).to(x.dtype)
            for m in mids.tolist():
                codes += x > m
            return codes
        mids = self._tables()[1]
        per_row = mids[rows].reshape(*x.shape[:-1], -1)  # +inf past a row's own last midpoint
        for k in range(per_row.shape[-1]):
            codes += x > per_row[..., k:k + 1]
        return codes

    def coder(self, maxq):
        row = self._one(self._rows(maxq))
        if row is None:  # rows of several widths: each row's own table
            return super().coder(maxq)
        mids, levels = self._mids(row), self._tables()[0][row]

        def encode(w, s, z):  # (as `encode` does for one width)
            x = w / s
            return torch.bucketize(x, mids).to(x.dtype) if x.numel() <= BUCKETIZE_MAX else self.encode(w, s, z, maxq)

        return encode, lambda q, s, z: (levels[q.long()] - z) * s

    def level(self, q, maxq):
        levels, rows = self._tables()[0], self._rows(maxq)
        row = self._one(rows)
        if row is not None:
            return levels[row][q.long()]
        return levels[rows].reshape(*q.shape[:-1], -1).gather(-1, q.long())

    def label(self, bits: int) -> str:
        return f"{self.name}{bits}"


import_all(__name__, __path__)  # every module of the package registers its grids
