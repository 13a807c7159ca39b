"""Interaction refinement: the frontier it walks, and a search that never worsens the measured KL, keeps the
budget and repairs a misleading profile."""
from __future__ import annotations

import copy

import pytest
import torch

from mixq.allocate import allocate, check_budget
from mixq.formats import QuantSpec
from mixq.profile import profile_model
from mixq.plan import Budget, Candidate
from mixq.config import default_candidates
from mixq.profile import LayerProfile
from mixq.refine import frontier, refine

from conftest import random_ids


def test_frontier_is_the_lower_convex_hull():
    c = [Candidate(QuantSpec(b, 32)) for b in (2, 3, 4, 5, 6)]
    lp = LayerProfile("l", 4, 64, c, [10, 20, 25, 30, 40], [5.0, 2.0, 3.0, 1.9, 0.5])
    # 25 bits is dominated (more bits, more damage than 20); 30 lies above the segment 20 → 40
    assert frontier(lp) == [0, 1, 4]


@pytest.fixture(scope="module")
def setting(_tiny_model_pristine):
    model = copy.deepcopy(_tiny_model_pristine)
    calib = random_ids(4, 48, seed=7)
    cands = default_candidates("rtn", bits=(2, 3, 4, 8), groups=(32,))
    prof = profile_model(model, calib, cands, "hessian")
    return model, calib, prof


def _floats(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_refine_never_worsens_keeps_the_budget_and_leaves_the_model_float(setting):
    model, calib, prof = setting
    budget = Budget(bits=3.3)
    alloc = allocate(prof, budget)
    before = _floats(model)
    r = refine(model, calib, prof, alloc, budget, rounds=3, pairs=4)
    assert r.kl_after <= r.kl_before
    assert r.allocation.bits <= check_budget(prof, budget)
    assert r.measured >= 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_refine_repairs_a_misleading_profile(setting):
    """Scale each layer's estimated damages by a wrong factor: the exact solve follows the estimate into a poor
    plan, and the measured search must find trades that lower the real KL."""
    model, calib, prof = setting
    g = torch.Generator().manual_seed(0)
    wrong = copy.deepcopy(prof)
    for lp in wrong.layers:
        f = float(10 ** (4 * torch.rand((), generator=g) - 2))
        lp.damage = [d * f for d in lp.damage]
    budget = Budget(bits=3.3)
    r = refine(model, calib, wrong, allocate(wrong, budget), budget, rounds=4, pairs=6)
    assert r.trades
    assert r.kl_after < 0.9 * r.kl_before
    assert r.allocation.bits <= check_budget(wrong, budget)
