"""Allocation: one candidate per layer, least total damage under the budget.

The multiple-choice knapsack, solved exactly as a 0/1 integer program with scipy's `milp` (HiGHS):
    min Σ_l Σ_c d_lc x_lc   s.t.  Σ_c x_lc = 1 for each layer,  Σ_l Σ_c b_lc x_lc ≤ B,  x ∈ {0, 1}
The Pareto curve (size against damage) is the optimum at a sweep of budgets.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from .cost import CostTable, layer_seconds
from .plan import Budget, Plan
from .profile import Profile


class BudgetError(ValueError):
    pass


@dataclass(frozen=True)
class Allocation:
    plan: Plan
    bits: int  # stored bits of the block linears
    damage: float
    table_bits: int = 0  # stored bits of the embedding table and the head, where they are quantized

    def bits_per_weight(self, profile: Profile) -> float:
        return self.bits / profile.weights


def bit_limits(profile: Profile, tables: bool = False) -> tuple[int, int]:
    """Smallest and largest possible stored bits of the block linears (with `tables`, and of the tables)."""
    layers = [lp for lp in profile.layers if tables or lp.name not in profile.tables]
    return sum(min(lp.bits) for lp in layers), sum(max(lp.bits) for lp in layers)


def budget_bits(profile: Profile, budget: Budget) -> int:
    """The budget as stored bits of the allocated layers: under `bits`, those of a model whose block linears
    average `bits` and whose tables (where the profile has them) average `table_bits`, which the allocation then
    spends over all of them together; under a size, what the float rest leaves."""
    if budget.bits is not None:
        return int(np.floor(budget.bits * profile.weights + budget.table_bits * profile.table_weights))
    return (budget.bytes - profile.fixed_bytes) * 8


def check_budget(profile: Profile, budget: Budget, costs: CostTable | None = None) -> float:
    """The budget in stored bits (or, for a latency, seconds per token of the block linears), or a BudgetError
    naming the smallest and largest possible models. Needs only the costs, so it runs before any profiling (see
    profile.cost_profile)."""
    if budget.latency:
        if profile.tables:
            raise BudgetError("a latency budget keeps the embedding table and the head float, but this profile "
                              "has them as layers: profile with --float-tables")
        return _check_latency(profile, budget, costs)
    limit = budget_bits(profile, budget)
    lo, hi = bit_limits(profile, tables=True)
    if limit < lo:
        n = profile.weights + profile.table_weights

        def mb(bits: int) -> float:
            return (bits // 8 + profile.fixed_bytes) / 1e6
        asked = f" (the tables {budget.table_bits:g}: {mb(limit):.2f} MB)" if budget.bits and profile.tables else ""
        of = " of the blocks and tables" if profile.tables else ""
        raise BudgetError(
            f"budget {budget}{asked} is below the smallest possible model: {lo / n:.3f} bits per weight{of} "
            f"({mb(lo):.2f} MB); the largest is {hi / n:.3f} ({mb(hi):.2f} MB)")
    return limit


def _check_latency(profile: Profile, budget: Budget, costs: CostTable | None) -> float:
    if costs is None:
        raise BudgetError("a latency budget needs a cost table: run `mixq calibrate-cost` first")
    floats = costs.float_token
    limit = (budget.seconds if budget.seconds is not None else budget.of_float * floats) - costs.rest
    fastest = sum(min(layer_seconds(costs, lp)) for lp in profile.layers)
    if limit < fastest:
        best = costs.rest + fastest
        raise BudgetError(f"budget {budget} is below the fastest possible model on this machine: "
                          f"{best * 1000:.2f} ms per token ({best / floats:.2f} × the float model's "
                          f"{floats * 1000:.2f} ms)")
    return limit


def allocate(profile: Profile, budget: Budget, costs: CostTable | None = None, gap: float = 1e-9,
             seconds: float | None = None) -> Allocation:
    """`costs`: the measured cost table a latency budget is allocated under (unused for bits and sizes). `gap`:
    HiGHS's relative optimality gap; `seconds`: a time limit, after which the best allocation found is taken."""
    limit = check_budget(profile, budget, costs)
    cost = np.concatenate([layer_seconds(costs, lp) if budget.latency else lp.bits
                           for lp in profile.layers]).astype(float)
    if budget.latency:  # seconds are ~1e-5: in units of the limit, HiGHS's absolute tolerances mean something
        cost, limit = cost / limit, 1.0
    dmg = np.concatenate([lp.damage for lp in profile.layers]).astype(float)
    sizes = [len(lp.bits) for lp in profile.layers]
    owner = np.repeat(np.arange(len(sizes)), sizes)
    one_each = csr_matrix((np.ones(len(owner)), (owner, np.arange(len(owner)))), shape=(len(sizes), len(owner)))
    with _silent_stdout():  # HiGHS may print debug lines straight to fd 1, which would corrupt JSON output
        res = milp(dmg, integrality=np.ones_like(dmg), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(cost[None, :], -np.inf, limit)],
                   options={"mip_rel_gap": gap, **({"time_limit": seconds} if seconds else {})})
    if res.x is None:
        raise BudgetError(f"no allocation meets budget {budget}: {res.message}")
    chosen = {}
    start = 0
    for lp, k in zip(profile.layers, sizes):
        chosen[lp.name] = int(np.argmax(res.x[start:start + k]))
        start += k
    return _allocation(profile, chosen)


@contextmanager
def _silent_stdout():
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _allocation(profile: Profile, chosen: dict[str, int]) -> Allocation:
    plan = Plan({lp.name: lp.candidates[chosen[lp.name]] for lp in profile.layers}, profile.transforms)
    bits = sum(lp.bits[chosen[lp.name]] for lp in profile.layers if lp.name not in profile.tables)
    tables = sum(lp.bits[chosen[lp.name]] for lp in profile.layers if lp.name in profile.tables)
    damage = sum(lp.damage[chosen[lp.name]] for lp in profile.layers)
    return Allocation(plan, bits, damage, tables)


def uniform(profile: Profile, candidate_index_of) -> Allocation:
    """The allocation that gives every layer the candidate picked by `candidate_index_of(layer_profile)`."""
    return _allocation(profile, {lp.name: candidate_index_of(lp) for lp in profile.layers})


PARETO_GAP, PARETO_SECONDS = 1e-6, 10.0  # a plotted point need not be proved optimal to nine digits: on near-tied
# damages (random weights, 224 layers) HiGHS spent over ten minutes on one point at 1e-9


def pareto(profile: Profile, points: int = 24) -> list[tuple[float, float]]:
    """(bits per weight, total damage) of the optimum at `points` budgets from the smallest to the largest (within
    PARETO_GAP, or the best found in PARETO_SECONDS)."""
    lo, hi = bit_limits(profile)
    n = profile.weights
    curve = []
    for bpw in np.linspace(lo / n, hi / n, points):
        a = allocate(profile, Budget(bits=float(bpw) + 1e-9), gap=PARETO_GAP, seconds=PARETO_SECONDS)
        curve.append((a.bits / n, a.damage))
    return curve
