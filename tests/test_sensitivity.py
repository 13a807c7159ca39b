"""Damage estimators: what each measures, and that profiling's row sampling keeps sums over rows whole."""
from __future__ import annotations

import pytest
import torch

import mixq.profile
from mixq.capture import LayerStats
from mixq.formats import QuantSpec, quantize
from mixq.plan import Candidate
from mixq.profile import profile_group
from mixq.sensitivity import ESTIMATORS, get_estimator


def _layer(rows=40, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(256, cols, generator=g) * torch.linspace(0.1, 3, cols)
    return w, LayerStats(x.T @ x / x.shape[0], x.shape[0])


def test_weight_only_estimators():
    w, stats = _layer()
    deq = quantize(w, QuantSpec(3, 32)).dequantize()
    err = float(((w - deq) ** 2).sum())
    assert get_estimator("roundoff")(w, deq, stats) == pytest.approx(err)
    assert get_estimator("sqnr")(w, deq, stats) == pytest.approx(err / float((w ** 2).sum()))
    assert get_estimator("roundoff")(w, deq, stats, torch.full((40,), 2.0)) == pytest.approx(2 * err)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_is_zero_for_no_change_and_grows_with_error(name):
    w, stats = _layer()
    fisher = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 0.5
    est = get_estimator(name)
    assert est(w, w.clone(), stats, fisher) == 0
    d3 = est(w, quantize(w, QuantSpec(3, 32)).dequantize(), stats, fisher)
    d2 = est(w, quantize(w, QuantSpec(2, 32)).dequantize(), stats, fisher)
    assert 0 < d3 < d2


@pytest.mark.parametrize("name", ["roundoff", "fisher"])
def test_sampled_rows_stand_for_the_whole_layer(monkeypatch, name):
    """Profiling estimates a sum over rows on a sample of them: scaled up, it matches the whole layer's sum."""
    w, stats = _layer(rows=400, seed=2)
    fisher = {"l": torch.ones(400)} if name == "fisher" else None
    cands = [Candidate(QuantSpec(3, 32), "rtn")]
    monkeypatch.setattr(mixq.profile, "PROFILE_ROWS", 400)
    whole = profile_group({"l": w}, stats, cands, name, fisher)[0].damage[0]
    monkeypatch.setattr(mixq.profile, "PROFILE_ROWS", 100)
    sampled = profile_group({"l": w}, stats, cands, name, fisher)[0].damage[0]
    assert sampled == pytest.approx(whole, rel=0.15)
    assert sampled > 2 * whole / 4  # not the sample's own sum (a quarter of the layer's)
