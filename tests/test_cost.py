"""The latency budget: parsing, the measured cost table, and the exact allocation under predicted seconds."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings

from mixq.allocate import BudgetError, allocate, budget_bits
from mixq.cost import CostTable, measure
from mixq.formats import QuantSpec
from mixq.plan import Budget
from mixq.config import default_candidates

from test_allocate import profiles

NS_PER_BIT = 1e-12


def _bits(spec, rows, cols) -> int:
    """Made-up stored bits that, as times do, depend on the format and the shape alone."""
    return rows * cols * spec.bits + 7 * spec.group_size + 3 * spec.symmetric


def _real_bits(profile):
    return replace(profile, layers=[replace(lp, bits=[_bits(c.spec, lp.rows, lp.cols) for c in lp.candidates])
                                    for lp in profile.layers])


def _table(profile, rest=1e-3, float_token=2e-3) -> CostTable:
    """A made-up table whose time is proportional to each candidate's stored bits."""
    formats = {}
    for lp in profile.layers:
        for c in lp.candidates:
            formats.setdefault(c.spec.name, {})[f"{lp.rows}x{lp.cols}"] = _bits(c.spec, lp.rows, lp.cols) * NS_PER_BIT
    return CostTable("test", 1, rest, float_token, formats)


def test_parse_latency():
    assert Budget.parse(latency="0.6x") == Budget(of_float=0.6)
    assert Budget.parse(latency="25ms").seconds == pytest.approx(0.025)
    assert Budget.parse(latency="0.02 s").seconds == pytest.approx(0.02)
    assert "ms per token" in str(Budget(seconds=0.025)) and "float" in str(Budget(of_float=0.5))
    for bad in ("fast", "25", "-1x"):
        with pytest.raises(ValueError):
            Budget.parse(latency=bad)
    with pytest.raises(ValueError, match="exactly one"):
        Budget(bits=3, seconds=0.1)


@settings(max_examples=25)
@given(profiles())
def test_latency_proportional_to_bits_allocates_as_the_bits_budget(profile):
    """With time ∝ stored bits, a latency budget is a bits budget in other units: the same optimum."""
    profile = _real_bits(profile)
    table = _table(profile)
    for bpw in (3.0, 5.0, 8.0):
        try:
            by_bits = allocate(profile, Budget(bits=bpw))
        except BudgetError:
            continue
        limit = budget_bits(profile, Budget(bits=bpw))
        by_time = allocate(profile, Budget(seconds=table.rest + (limit + 0.5) * NS_PER_BIT), table)
        assert by_time.damage == pytest.approx(by_bits.damage)
        assert table.predicted(profile, by_time.plan) - table.rest <= (limit + 0.5) * NS_PER_BIT * (1 + 1e-6)


@settings(max_examples=10)
@given(profiles())
def test_impossible_latency_names_the_fastest_model(profile):
    table = _table(profile, rest=1e-3, float_token=1e-3 + 1e-9)
    with pytest.raises(BudgetError, match="fastest possible model"):
        allocate(profile, Budget(seconds=0.9e-3), table)
    with pytest.raises(BudgetError, match="needs a cost table"):
        allocate(profile, Budget(of_float=0.5))


def test_measure_times_every_fitting_format(tiny_model):
    candidates = default_candidates(groups=(32, 0))
    table = measure(tiny_model, candidates)
    assert set(table.formats) == {c.spec.name for c in candidates}
    assert all(set(t) == {"128x64", "64x64", "64x128", "32x64"} and min(t.values()) > 0
               for t in table.formats.values())
    # the tiny model's linears are a few % of its time: on a busy machine rest and float_token can swap order
    assert 0 < table.rest < 1.25 * table.float_token
    assert CostTable.from_json(table.to_json()) == table
    assert isinstance(tiny_model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # the stubs are gone again


def test_measure_times_the_whole_row_formats_where_no_group_fits(tiny_model):
    """Rows of 64 take no group of 192: layer_costs falls back to whole rows, and the table has those times."""
    table = measure(tiny_model, default_candidates(bits=(3,), formats=((192, "min", 16),)))
    assert set(table.formats) == {QuantSpec.of(3, 0, "min").name}
    assert len(table.formats[QuantSpec.of(3, 0, "min").name]) == 4  # every shape
