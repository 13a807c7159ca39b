"""Per-layer solvers, registered by name. A solver is a `Solver` subclass in a file of its own that declares
the statistics it needs (`needs`, capture's names), how the profile judges it (`profile_as`, `profiled`) and what it
can be in a chain (`starts`, `refines`), and solves one layer:

    Solver(damp).solve(weight rows × cols, stats: LayerStats, spec: QuantSpec) -> QuantizedTensor

A chain (mixq.chain.Chain) is one solver followed by refiners, which improve its result (`refine`: comq) or add a
bias (`bias`: bias compensation); `solve_layer` runs a chain on one layer and returns the bias it adds, if any.
Each step may change the statistics the chain solves on (`prepare`: the output-adaptive Hessian, the input
covariance).

Under `solve`, every solver works on a batch of rows (`rows`): rows of several layers and widths stacked in one
`Rows` format, so that profiling solves every width of every layer that shares an input in one call (rows are
independent given H). What a batch returns is stored as QuantizedTensor holds it: (codes, scales, zeros, steps),
steps None unless double-quantized.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..capture import INPUT, LayerStats
from ..formats import HIGH, QuantizedTensor, QuantSpec, quantize
from ..grids import Grid, grid_of
from ..registry import Registry, import_all

DAMP = 0.1  # the default damping (QuantizeConfig.damp): a fraction of mean(diag H) added to H's diagonal. GPTQ's
# 0.01 fits the calibration text closest; 0.1 pulls each solve toward the plain weight error and generalises better:
# on SmolLM2's 3.0 bpw allocation, pydoc perplexity 15.53 → 15.56 and a novel's 63.6 → 59.6
# (benchmarks/results/solvers.md)

SOLVERS = Registry("solver")


def register(cls: type["Solver"]) -> type["Solver"]:
    """Class decorator: register a Solver subclass under its `name`."""
    if not cls.summary:
        raise ValueError(f"solver {cls.name!r} needs a one-line summary (the --solver help)")
    return SOLVERS.register(cls.name)(cls)


@dataclass(eq=False)
class Rows:
    """The format of a batched solve: `group`-wide groups on `grid` (a grid's name, or a layer's own grid: a learned
    grid's levels, `Grid.for_layer`), each row `bits` wide (a tensor, one width per row), scales fp16 or
    `scale_bits`-wide codes with steps per row or per `super_block` weights, and the leading `high` columns of every
    row apart at 8 bits (a split row)."""

    group: int
    bits: torch.Tensor
    grid: "str | Grid"
    scale_bits: int = 16
    super_block: int = 0
    high: int = 0

    @classmethod
    def of(cls, spec: QuantSpec, rows: int, cols: int) -> "Rows":
        return cls(spec.group(cols), torch.full((rows,), spec.bits), spec.grid, spec.scale_bits, spec.super_block,
                   spec.high)

    def stored(self, out: tuple, spec: QuantSpec) -> QuantizedTensor:
        """A batch's output as the QuantizedTensor of `spec` (its split rows' high columns included; a learned grid's
        levels of `spec`'s width)."""
        grid = grid_of(self.grid)
        scales = out[1]
        if grid.solver is not None:  # scales_per_group scales a group, padded to the batch's widest: spec's own
            n = grid.scales_per_group(spec.bits)
            scales = scales.view(scales.shape[0], out[2].shape[1], -1)[..., :n].reshape(scales.shape[0], -1)
        return QuantizedTensor(out[0], scales, out[2], spec, out[3], out[4] if self.high else None,
                               grid.table(spec.bits).float() if grid.learned else None)

    def for_layer(self, weight: torch.Tensor, stats: LayerStats) -> "Rows":
        """This format on the grid the layer of `weight` (its rows all one layer's) is solved on: a learned grid's
        levels fitted to it, weighed by diag H (its columns after the `high` ones)."""
        grid = grid_of(self.grid)
        if not grid.learned:
            return self
        k = self.high
        h = stats.hessian  # (none where the solver needs no statistics: every column alike)
        importance = h.diagonal()[k:] if h.numel() else torch.ones(weight.shape[1] - k)
        own = grid.for_layer(weight[:, k:], importance, self.group, self.bits.unique().tolist())
        return replace(self, grid=own)


class Solver:
    """One step of a chain. A subclass sets `name` and a one-line `summary` (the --solver help), registers itself
    with @register, and implements `rows` (as a chain's first step) or `refine` (after another), or both."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({INPUT})  # statistics it reads (capture's names)
    profile_as: ClassVar[str | None] = None  # the solver whose result the profile judges its candidates by
    profiled: ClassVar[bool] = True  # False: the profile leaves its work out (a refiner skipped, or via profile_as)
    starts: ClassVar[bool] = True  # can be a chain's first step
    refines: ClassVar[bool] = False  # can follow another step
    adds_bias: ClassVar[bool] = False  # the layer gets a bias (`bias`), whose bits count

    def __init__(self, damp: float = DAMP):
        self.damp = damp

    def rows(self, weight: torch.Tensor, stats: LayerStats, fmt: Rows) -> tuple:
        raise NotImplementedError(f"{self.name} does not start a chain")

    def refine(self, weight: torch.Tensor, stats: LayerStats, fmt: Rows, out: tuple) -> tuple:
        raise NotImplementedError(f"{self.name} does not refine")

    def prepare(self, stats: LayerStats) -> LayerStats:
        """The statistics the chain solves on once this step is in it (default: as they are)."""
        return stats

    def bias(self, weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats) -> torch.Tensor | None:
        """The bias change this step adds for `weight` quantized to `deq`, or None."""
        return None

    def solve_rows(self, weight: torch.Tensor, stats: LayerStats, fmt: Rows, then=()) -> tuple:
        """This solver on a batch of rows, then each refiner of `then`. Split rows (`fmt.high`): the leading
        columns round to nearest at 8 bits (HIGH), and the rest is solved, moved first by GPTQ's update to absorb
        their error (with ΔW_h fixed, the least tr(ΔW H ΔWᵀ) has ΔW_l = −ΔW_h H_hl H_ll⁻¹), on H_ll; the high
        columns' QuantizedTensor comes last."""
        if fmt.high:
            from .gptq import damped

            h, k = stats.hessian, fmt.high
            hi = quantize(weight[:, :k], HIGH)
            error = weight[:, :k] - hi.dequantize()
            low = weight[:, k:] + torch.linalg.solve(damped(h[k:, k:], self.damp), h[k:, :k] @ error.T).T
            return (*self.solve_rows(low, replace(stats, hessian=h[k:, k:]), replace(fmt, high=0), then), hi)
        out = self.rows(weight, stats, fmt)
        for step in then:
            out = step.refine(weight, stats, fmt, out)
        return out

    def solve(self, weight: torch.Tensor, stats: LayerStats, spec: QuantSpec, then=(), grid=None) -> QuantizedTensor:
        """One layer in `spec` (then each refiner of `then`); `grid`: the grid it is solved on where the layer's
        rows are solved in parts (a learned grid fitted to the whole layer), else the layer's own (Rows.for_layer)."""
        rows, cols = weight.shape
        if not spec.fits(cols):
            raise ValueError(f"{spec.name} does not fit rows of {cols} weights")
        fmt = Rows.of(spec, rows, cols)
        fmt = fmt.for_layer(weight, stats) if grid is None else replace(fmt, grid=grid)
        return fmt.stored(self.solve_rows(weight.float(), stats, fmt, then), spec)


def build(chain, damp: float = DAMP) -> tuple[Solver, list[Solver]]:
    """The solver and the refiners of a chain (a Chain or its text), each set up with `damp`."""
    from ..chain import Chain

    chain = Chain.parse(chain) if isinstance(chain, str) else chain
    return SOLVERS.lookup(chain.solver)(damp), [SOLVERS.lookup(r)(damp) for r in chain.refiners]


def prepared(steps, stats: LayerStats) -> LayerStats:
    """The statistics a chain solves on: each refiner's `prepare`, then the solver's (the solver's choice of
    Hessian, e.g. oac's output-adaptive one, comes last and wins)."""
    first, then = steps
    for step in [*then, first]:
        stats = step.prepare(stats)
    return stats


def solve_layer(chain, weight: torch.Tensor, stats: LayerStats, spec: QuantSpec,
                damp: float = DAMP) -> tuple[QuantizedTensor, torch.Tensor | None]:
    """One layer quantized by a chain: (its QuantizedTensor, the bias change the chain adds or None)."""
    steps = build(chain, damp)
    on = prepared(steps, stats)
    qt = steps[0].solve(weight, on, spec, steps[1])
    return qt, added_bias(steps[1], weight, qt.dequantize(), on)


def added_bias(refiners, weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats) -> torch.Tensor | None:
    """The bias change the refiners of a chain add for `weight` quantized to `deq` (None: they add none)."""
    bias = None
    for step in refiners:
        delta = step.bias(weight, deq, stats)
        if delta is not None:
            bias = delta if bias is None else bias + delta
    return bias


def solve(chain, weight: torch.Tensor, stats: LayerStats | torch.Tensor, spec: QuantSpec,
          damp: float = DAMP) -> QuantizedTensor:
    """`solve_layer`'s QuantizedTensor; a bare Hessian stands for the statistics of a layer that has no others."""
    return solve_layer(chain, weight, LayerStats.of(stats), spec, damp)[0]


def output_error(weight: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row E‖(W − Ŵ) x‖² = diag(ΔW H ΔWᵀ), the layer-output error the Hessian solvers minimise."""
    d = weight.float() - deq
    return ((d @ hessian) * d).sum(1)


def help_text() -> str:
    """The --solver help, from the registry: solvers, then refiners."""
    first = "; ".join(f"{n} ({s.summary})" for n, s in SOLVERS.items() if s.starts)
    after = "; ".join(f"+{n} ({s.summary})" for n, s in SOLVERS.items() if s.refines)
    return f"Solvers: {first}. Refiners, after a solver: {after}."


import_all(__name__, __path__)  # every module of the package registers its solver: a new file is a new solver
