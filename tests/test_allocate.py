"""Allocation (exact multiple-choice knapsack) against brute force; Budget, Plan, Candidate and Profile JSON."""
from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.allocate import BudgetError, allocate, bit_limits, budget_bits, pareto, uniform
from mixq.formats import QuantSpec
from mixq.plan import Budget, Candidate, Plan
from mixq.profile import LayerProfile, Profile

ROWS, COLS = 8, 16  # 128 weights per layer
CANDIDATES = [Candidate(QuantSpec(b, 0), s) for b in (2, 3, 4, 8) for s in ("rtn",)] + [
    Candidate(QuantSpec(3, 32, True), "gptq")]


@st.composite
def profiles(draw):
    """3–4 layers × 3–4 candidates; damages on a 1/1000 grid so that any suboptimal choice is visibly worse."""
    n_layers = draw(st.integers(3, 4))
    n_cands = draw(st.integers(3, 4))
    layers = []
    for i in range(n_layers):
        cands = draw(st.permutations(CANDIDATES))[:n_cands]
        bits = draw(st.lists(st.integers(ROWS * COLS, 9 * ROWS * COLS), min_size=n_cands, max_size=n_cands))
        damage = draw(st.lists(st.integers(0, 1000), min_size=n_cands, max_size=n_cands))
        layers.append(LayerProfile(f"model.layers.{i}.mlp.down_proj", ROWS, COLS, list(cands), bits,
                                   [d / 1000 for d in damage]))
    return Profile("hessian", fixed_bytes=draw(st.integers(0, 4096)), layers=layers)


def brute_force(profile: Profile, limit: int):
    """Least damage over every combination whose bits fit `limit` (None if none fits)."""
    best = None
    for choice in itertools.product(*(range(len(lp.bits)) for lp in profile.layers)):
        bits = sum(lp.bits[c] for lp, c in zip(profile.layers, choice))
        if bits <= limit:
            damage = sum(lp.damage[c] for lp, c in zip(profile.layers, choice))
            best = damage if best is None else min(best, damage)
    return best


def _chosen(profile: Profile, plan: Plan) -> list[int]:
    return [lp.candidates.index(plan.layers[lp.name]) for lp in profile.layers]


@settings(max_examples=40)
@given(profile=profiles(), fraction=st.floats(0, 1))
def test_allocate_equals_brute_force(profile, fraction):
    lo, hi = bit_limits(profile)
    bpw = (lo + fraction * (hi - lo)) / profile.weights
    budget = Budget(bits=bpw + 1e-9)
    limit = budget_bits(profile, budget)
    alloc = allocate(profile, budget)

    chosen = _chosen(profile, alloc.plan)
    assert alloc.bits == sum(lp.bits[c] for lp, c in zip(profile.layers, chosen))
    assert alloc.damage == pytest.approx(sum(lp.damage[c] for lp, c in zip(profile.layers, chosen)))
    assert alloc.bits <= limit
    assert alloc.bits_per_weight(profile) <= budget.bits
    assert alloc.damage == pytest.approx(brute_force(profile, limit), abs=1e-9)


@settings(max_examples=20)
@given(profile=profiles(), extra=st.integers(0, 3000))
def test_size_budget_counts_fixed_bytes(profile, extra):
    lo, _ = bit_limits(profile)
    size = profile.fixed_bytes + -(-lo // 8) + extra
    budget = Budget(bytes=size)
    alloc = allocate(profile, budget)
    assert alloc.bits <= (size - profile.fixed_bytes) * 8
    assert alloc.damage == pytest.approx(brute_force(profile, (size - profile.fixed_bytes) * 8), abs=1e-9)


@settings(max_examples=15)
@given(profile=profiles())
def test_exact_is_never_worse_than_any_uniform_choice(profile):
    """Any single-index-per-layer allocation that fits the same bits is at least as damaging."""
    for k in range(min(len(lp.bits) for lp in profile.layers)):
        u = uniform(profile, lambda lp: k)
        exact = allocate(profile, Budget(bits=u.bits / profile.weights + 1e-9))
        assert exact.bits <= u.bits
        assert exact.damage <= u.damage + 1e-9


@settings(max_examples=10)
@given(profile=profiles())
def test_pareto_is_monotone(profile):
    curve = pareto(profile, points=6)
    assert len(curve) == 6
    for (b0, d0), (b1, d1) in zip(curve, curve[1:]):
        assert d1 <= d0 + 1e-9
    lo, hi = bit_limits(profile)
    assert curve[0][0] == pytest.approx(lo / profile.weights)
    assert min(d for _, d in curve) == pytest.approx(brute_force(profile, hi), abs=1e-9)


def _fixed_profile() -> Profile:
    cands = CANDIDATES[:3]  # 2, 3, 4 bits
    layers = [LayerProfile(f"l{i}", ROWS, COLS, cands, [c.spec.storage_bits(ROWS, COLS) for c in cands],
                           [4.0, 2.0, 1.0]) for i in range(3)]
    return Profile("hessian", 1000, layers)


def test_impossible_budget_names_smallest_and_largest():
    prof = _fixed_profile()
    lo, hi = bit_limits(prof)
    with pytest.raises(BudgetError) as e:
        allocate(prof, Budget(bits=1.0))
    msg = str(e.value)
    assert f"{lo / prof.weights:.3f}" in msg and f"{hi / prof.weights:.3f}" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(BudgetError, match=f"{lo / prof.weights:.3f}"):
        allocate(prof, Budget(bytes=prof.fixed_bytes + 10))
    # a budget just at the smallest model is feasible and picks it
    smallest = allocate(prof, Budget(bytes=prof.fixed_bytes + lo // 8))
    assert smallest.bits == lo


def test_larger_budget_picks_least_damage():
    prof = _fixed_profile()
    a = allocate(prof, Budget(bits=32))
    assert a.damage == 3.0
    assert all(c.spec.bits == 4 for c in a.plan.layers.values())


def test_budget_parse():
    assert Budget.parse(size="60MB") == Budget(bytes=60_000_000)
    assert Budget.parse(size="60 mb") == Budget(bytes=60_000_000)
    assert Budget.parse(size="58MiB") == Budget(bytes=58 * 1024**2)
    assert Budget.parse(size="1.5GB") == Budget(bytes=1_500_000_000)
    assert Budget.parse(size="2KiB") == Budget(bytes=2048)
    assert Budget.parse(size="123") == Budget(bytes=123)
    assert Budget.parse(bits=3.0) == Budget(bits=3.0)
    for bad in ("sixty MB", "60 XB", "", "-5MB", "1.2.3MB"):
        with pytest.raises(ValueError):
            Budget.parse(size=bad)


@pytest.mark.parametrize("kwargs", [{}, {"bits": 3.0, "bytes": 100}, {"bits": 0.0}, {"bits": -1.0},
                                    {"bits": 33.0}, {"bytes": 0}, {"bytes": -10}])
def test_budget_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        Budget(**kwargs)


def test_budget_bits_from_bytes():
    prof = _fixed_profile()
    assert budget_bits(prof, Budget(bytes=prof.fixed_bytes + 100)) == 800
    assert budget_bits(prof, Budget(bits=2.5)) == int(2.5 * prof.weights)


def _plan() -> Plan:
    return Plan({"model.layers.0.self_attn.q_proj": Candidate(QuantSpec(3, 64), "gptq"),
                 "model.layers.0.mlp.down_proj": Candidate(QuantSpec(8, 0, True), "rtn"),
                 "model.layers.1.mlp.up_proj": Candidate(QuantSpec(2, 192), "clip")})


def test_plan_json_round_trip():
    plan = _plan()
    text = plan.to_json()
    d = json.loads(text)
    assert d["version"] == 1
    assert d["layers"]["model.layers.0.mlp.down_proj"] == {"solver": "rtn", "bits": 8, "group_size": 0,
                                                           "symmetric": True}
    assert Plan.from_json(text) == plan
    assert list(Plan.from_json(text).layers) == list(plan.layers)  # order kept


def test_plan_reads_the_readme_example():
    text = ('{"version": 1, "layers": {"model.layers.0.mlp.down_proj": {"solver": "gptq", "bits": 4, '
            '"group_size": 64, "symmetric": false}}}')
    assert Plan.from_json(text).layers["model.layers.0.mlp.down_proj"] == Candidate(QuantSpec(4, 64), "gptq")


@pytest.mark.parametrize("text, match", [
    ('{"version": 1, "layers": {}, "scheme": 1}', "unknown"),
    ('{"version": 1, "layers": {"a": {"solver": "rtn", "bits": 4, "qconfig": 1}}}', "unknown"),
    ('{"version": 2, "layers": {}}', "version"),
    ('{"version": 1}', "layers"),
    ('[1, 2]', "layers"),
    ('{"version": 1, "layers": {"a": {"solver": "rtn", "bits": 7}}}', "bits"),
    ('{"version": 1, "layers": {"a": {"solver": "rtn", "bits": 4, "group_size": 48}}}', "group_size"),
])
def test_plan_rejects_bad_json(text, match):
    with pytest.raises(ValueError, match=match):
        Plan.from_json(text)


@pytest.mark.parametrize("text", ['{"version": 1, "layers": {"a": {"solver": "rtn"}}}',
                                  '{"version": 1, "layers": [1]}'])
def test_plan_malformed_layers_raise_value_error(text):
    with pytest.raises(ValueError):
        Plan.from_json(text)


def test_candidate_round_trip():
    for c in _plan().layers.values():
        assert Candidate.from_dict(c.to_dict()) == c
    assert Candidate(QuantSpec(3, 64), "clip").name == "clip:int3-g64-asym"
    with pytest.raises(ValueError, match="unknown"):
        Candidate.from_dict({"solver": "rtn", "bits": 4, "recipe": "x"})


def test_profile_json_round_trip():
    prof = _fixed_profile()
    back = Profile.from_json(prof.to_json())
    assert back == prof
    assert back.weights == 3 * ROWS * COLS
    d = json.loads(prof.to_json())
    d["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Profile.from_json(json.dumps(d))
    assert allocate(back, Budget(bits=4.5)) == allocate(prof, Budget(bits=4.5))


def test_layers_no_group_divides_fall_back_to_whole_rows():
    from mixq.config import default_candidates
    from mixq.profile import layer_costs

    cands = default_candidates()
    lp = layer_costs("odd", 10, 100, cands)  # 100 is divided by none of 32, 64, 192
    assert lp.candidates and all(c.spec.group_size == 0 for c in lp.candidates)
    assert {c.spec.bits for c in lp.candidates} == {c.spec.bits for c in cands}
    assert lp.bits == [c.spec.storage_bits(10, 100) for c in lp.candidates]
    assert all(c.spec.group_size for c in layer_costs("even", 10, 576, cands).candidates)


def test_a_bits_budget_with_tables_is_spent_over_blocks_and_tables_together():
    """Blocks at --bits and the table at --table-bits make the budget; the exact allocation moves bits to where
    they lower the damage most: here from a table that loses little at 4 bits to the blocks."""
    two, four = Candidate(QuantSpec(2, 0), "rtn"), Candidate(QuantSpec(4, 0), "rtn")
    eight = Candidate(QuantSpec(8, 0), "rtn")
    blocks = [LayerProfile(f"model.layers.{i}.mlp.up_proj", ROWS, COLS, [two, four], [256, 512], [1.0, 0.1])
              for i in range(2)]
    table = LayerProfile("model.embed_tokens", ROWS, COLS, [four, eight], [512, 1024], [0.01, 0.0])
    prof = Profile("hessian", 0, blocks + [table], tables=("model.embed_tokens",))
    assert (prof.weights, prof.table_weights) == (256, 128)
    assert budget_bits(prof, Budget(bits=3.0, table_bits=6.0)) == 3 * 256 + 6 * 128
    a = allocate(prof, Budget(bits=3.0, table_bits=6.0))  # the table held at 6 bits would leave the blocks 768
    assert (a.bits, a.table_bits, a.damage) == (1024, 512, pytest.approx(0.21))
    assert a.bits_per_weight(prof) == 4.0
    a = allocate(prof, Budget(bits=3.0, table_bits=2.0))
    assert (a.bits, a.table_bits, a.damage) == (512, 512, pytest.approx(2.01))
    with pytest.raises(BudgetError, match="below the smallest possible model"):
        allocate(prof, Budget(bits=2.0, table_bits=1.0))
