"""Interaction refinement: per-layer damages do not simply add, so after the exact solve the chosen plan's real
KL divergence from the float model is measured and a bounded local search trades bits between layers.

Each round takes, for every layer, its move up its own Pareto frontier (the next candidate with more bits and
less estimated damage) and pairs it with the move down of another layer that pays for it within the budget,
cheapest predicted loss first (the exact solve is optimal for the estimate, so every trade costs something on
paper). The `pairs` cheapest trades are measured; the one that lowers the measured KL most is kept. The search
stops after `rounds` rounds or when no measured trade helps. Every weight is solved once on the float model's
inputs and cached, so a measurement is one forward pass over the refinement windows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .allocate import Allocation, _allocation, check_budget
from .capture import LayerStats, float_block_stats
from .models import adapter_for
from .plan import Budget
from .profile import LayerProfile, Profile
from .sensitivity.kl import KLProbe
from .solvers import DAMP, solve

REFINE_WINDOWS = 4
REFINE_LENGTH = 512


@dataclass
class Refinement:
    allocation: Allocation
    kl_before: float
    kl_after: float
    measured: int  # KL measurements made
    trades: list[str] = field(default_factory=list)  # "layer → candidate; layer → candidate" of each kept trade


def frontier(lp: LayerProfile) -> list[int]:
    """Candidate indices on the layer's lower convex hull of (bits, damage), by increasing bits."""
    order = sorted(range(len(lp.bits)), key=lambda k: (lp.bits[k], lp.damage[k]))
    hull: list[int] = []
    for k in order:
        if hull and lp.damage[k] >= lp.damage[hull[-1]]:
            continue  # more bits for no less damage
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a → k: not on the lower hull
            if (lp.damage[b] - lp.damage[a]) * (lp.bits[k] - lp.bits[a]) >= \
                    (lp.damage[k] - lp.damage[a]) * (lp.bits[b] - lp.bits[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


class _Weights:
    """Each (layer, candidate)'s dequantized weight, solved on demand on the float model's inputs and cached."""

    def __init__(self, model: nn.Module, calib: torch.Tensor, damp: float = DAMP):
        adapter = adapter_for(model)
        self.model, self.stats, self.cache, self.damp = model, {}, {}, damp
        self.float = {n: model.get_submodule(n).weight.data for n in adapter.layer_names(model) + adapter.tables(model)}
        for i, _, stats in float_block_stats(model, adapter, calib):
            for group in adapter.groups:
                for n in group:
                    self.stats[f"{adapter.blocks}.{i}.{n}"] = stats[group[0]]

    def set(self, lp: LayerProfile, k: int) -> None:
        key = (lp.name, k)
        if key not in self.cache:
            cand = lp.candidates[k]
            stats = self.stats.get(lp.name, LayerStats(torch.empty(0, 0), 0))  # the tables' solvers take none
            self.cache[key] = solve(cand.solver, self.float[lp.name], stats, cand.spec, self.damp).dequantize()
        self.model.get_submodule(lp.name).weight.data = self.cache[key]

    def restore(self) -> None:
        for name, w in self.float.items():
            self.model.get_submodule(name).weight.data = w


def refine(model: nn.Module, calib: torch.Tensor, profile: Profile, alloc: Allocation, budget: Budget,
           rounds: int = 4, pairs: int = 8, step=None, damp: float = DAMP) -> Refinement:
    """A plan at least as good as `alloc` by the measured KL, within the same budget. The model is left float."""
    limit = check_budget(profile, budget)
    probe = KLProbe(model, adapter_for(model), calib, REFINE_WINDOWS, REFINE_LENGTH)
    weights = _Weights(model, calib, damp)
    layers = {lp.name: lp for lp in profile.layers}
    hulls = {lp.name: frontier(lp) for lp in profile.layers}
    chosen = {lp.name: lp.candidates.index(alloc.plan.layers[lp.name]) for lp in profile.layers}
    whole = any(name in layers for name in adapter_for(model).tables(model))  # a quantized table: run it too
    try:
        for lp in profile.layers:
            weights.set(lp, chosen[lp.name])
        best = before = probe.kl(whole)
        measured, trades = 1, []
        for r in range(rounds):
            used = sum(layers[n].bits[k] for n, k in chosen.items())  # (the tables' too: one budget)
            options = _trades(layers, hulls, chosen, limit - used)[:pairs]
            results = []
            for moves in options:
                for name, k in moves:
                    weights.set(layers[name], k)
                results.append(probe.kl(whole))
                measured += 1
                for name, _ in moves:
                    weights.set(layers[name], chosen[name])
            if step:
                step("refine", r + 1, rounds)
            if not results or min(results) >= best:
                break
            i = min(range(len(results)), key=results.__getitem__)
            best = results[i]
            for name, k in options[i]:
                chosen[name] = k
                weights.set(layers[name], k)
            trades.append("; ".join(f"{name} → {layers[name].candidates[k].name}" for name, k in options[i]))
    finally:
        weights.restore()
    return Refinement(_allocation(profile, chosen), before, best, measured, trades)


def _trades(layers: dict[str, LayerProfile], hulls: dict[str, list[int]], chosen: dict[str, int], slack: int):
    """The moves of each trade ((layer, candidate) pairs), cheapest predicted loss first: for every layer that can
    move up its frontier, that move and, unless the slack pays for it, the move down of another layer that does."""
    ups, downs = [], []
    for name, lp in layers.items():
        hull, k = hulls[name], chosen[name]
        pos = _position(lp, hull, k)
        if pos + 1 < len(hull):
            u = hull[pos + 1]
            ups.append((name, u, lp.bits[u] - lp.bits[k], lp.damage[u] - lp.damage[k]))
        if pos > 0:
            d = hull[pos - 1]
            downs.append((name, d, lp.bits[d] - lp.bits[k], lp.damage[d] - lp.damage[k]))
    out = []
    for name, u, dbits, ddmg in ups:
        if dbits <= slack:
            out.append((ddmg, [(name, u)]))
            continue
        fits = [(dd, n, d) for n, d, db, dd in downs if n != name and dbits + db <= slack]
        if fits:
            dd, n, d = min(fits)
            out.append((ddmg + dd, [(name, u), (n, d)]))
    return [moves for _, moves in sorted(out, key=lambda t: t[0])]


def _position(lp: LayerProfile, hull: list[int], k: int) -> int:
    """Where candidate k sits on the frontier: its own index, or the last hull point with no more bits."""
    if k in hull:
        return hull.index(k)
    below = [i for i, h in enumerate(hull) if lp.bits[h] <= lp.bits[k]]
    return below[-1] if below else 0
