"""Per-layer solvers, registered by name. Each is a pure function on tensors:

    solver(weight rows × cols, hessian cols × cols, group, bits (rows,), grid, scale_bits=16, super_block=0)
        -> (codes, scales, zeros, steps)    as QuantizedTensor stores them (steps None unless double-quantized)

`bits` is per row so that one call can solve rows of several widths at once (profiling stacks every candidate
width of every layer that shares an input); `grid` is QuantSpec.grid ("int", "sym" or "min"). `solve` wraps that
for one layer and one spec.

A refiner improves a solver's result: refiner(weight, hessian, group, bits, grid, scale_bits, super_block, out) ->
out. A solver's name may chain refiners after it with "+": "gptq-act+comq" is GPTQ, then coordinate descent.
"""
from __future__ import annotations

import torch

from ..formats import HIGH, QuantizedTensor, QuantSpec, quantize
from ..registry import Registry

SOLVERS = Registry("solver")
register_solver = SOLVERS.register
REFINERS = Registry("refiner")
register_refiner = REFINERS.register


def get_solver(name: str, base=None, high: int = 0):
    """The solver function of a name: a registered solver, or one followed by registered refiners ("a+b+c");
    `base`, a solver function that stands in for the chain's first name; `high`, split rows (`split`)."""
    if high:
        return split(get_solver(name, base), high)
    first, *after = name.split("+")
    solver = SOLVERS.lookup(first) if base is None else base
    if not after:
        return solver
    refiners = [REFINERS.lookup(r) for r in after]

    def chained(weight, hessian, group, bits, grid, scale_bits=16, super_block=0):
        out = solver(weight, hessian, group, bits, grid, scale_bits, super_block)
        for refine in refiners:
            out = refine(weight, hessian, group, bits, grid, scale_bits, super_block, out)
        return out
    return chained


def split(solver, high: int):
    """`solver` for split rows (QuantSpec.high): the leading `high` columns round to nearest at 8 bits (HIGH), and
    the solver gets the rest, moved first by GPTQ's update to absorb their error (with ΔW_h fixed, the least
    tr(ΔW H ΔWᵀ) has ΔW_l = −ΔW_h H_hl H_ll⁻¹) and judged on H_ll. Returns the solver's tuple plus the high
    columns' QuantizedTensor."""
    from .gptq import damped

    def solve_split(weight, hessian, group, bits, grid, scale_bits=16, super_block=0):
        hi = quantize(weight[:, :high], HIGH)
        h_ll = damped(hessian[high:, high:])
        error = weight[:, :high] - hi.dequantize()
        low = weight[:, high:] + torch.linalg.solve(h_ll, hessian[high:, :high] @ error.T).T
        return (*solver(low, hessian[high:, high:], group, bits, grid, scale_bits, super_block), hi)
    return solve_split


def solve(name: str, weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, base=None) -> QuantizedTensor:
    rows, cols = weight.shape
    if not spec.fits(cols):
        raise ValueError(f"{spec.name} does not fit rows of {cols} weights")
    bits = torch.full((rows,), spec.bits)
    out = get_solver(name, base, spec.high)(weight.float(), hessian.float(), spec.group(cols), bits, spec.grid,
                                            spec.scale_bits, spec.super_block)
    return QuantizedTensor(*out[:3], spec, out[3], out[4] if spec.high else None)


def output_error(weight: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row E‖(W − Ŵ) x‖² = diag(ΔW H ΔWᵀ), the layer-output error the Hessian solvers minimise."""
    d = weight.float() - deq
    return ((d @ hessian) * d).sum(1)


from . import aespa, bias, clip, comq, gptq, oac, rtn, taskclip  # noqa: E402,F401  (register)
