"""Fused matrices as the allocation unit (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value, GPT-2's
c_attn): what does one format for the whole fused matrix cost against a format per part? Measured on SmolLM2, whose
q, k, v and gate, up are separate: its profile is allocated once as it is, once with q/k/v and gate/up tied to one
candidate each (the damage and the bits of a tied unit are its parts' sums), at the same budgets.

    python benchmarks/fused.py [--profile PATH] [--measure]   → benchmarks/results/fused.md

Without --measure (seconds, no model): the predicted total damage of each allocation (what the allocator
minimises). With --measure (about 4 minutes a plan on 2 cores): each plan applied to SmolLM2, and the perplexity by
the protocol on pydoc and on the unlike text (botchan, the first 16 windows).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from common import provenance  # noqa: E402
from mixq.allocate import allocate  # noqa: E402
from mixq.plan import Budget, Plan  # noqa: E402
from mixq.profile import LayerProfile, Profile  # noqa: E402

UNITS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
BUDGETS = (2.5, 3.0, 3.5)
OUT = HERE / "results" / "fused.md"


def fused(prof: Profile) -> tuple[Profile, dict[str, list[str]]]:
    """The profile with each unit of UNITS in a block tied: one layer whose candidates' bits and damage are its
    parts' sums; and unit name → its parts."""
    by_name = {lp.name: lp for lp in prof.layers}
    layers, parts, done = [], {}, set()
    for lp in prof.layers:
        if lp.name in done:
            continue
        prefix, _, local = lp.name.partition(".mlp.") if ".mlp." in lp.name else lp.name.partition(".self_attn.")
        kind = "mlp." if ".mlp." in lp.name else "self_attn."
        unit = next((u for u in UNITS if kind + local in u), None)
        if unit is None:
            layers.append(lp)
            continue
        members = [by_name[f"{prefix}.{m}"] for m in unit]
        assert all(m.candidates == lp.candidates for m in members)
        name = f"{prefix}.{'+'.join(m.rsplit('.', 1)[1] for m in unit)}"
        parts[name] = [m.name for m in members]
        done |= set(parts[name])
        layers.append(LayerProfile(name, sum(m.rows for m in members), lp.cols, lp.candidates,
                                   [sum(m.bits[k] for m in members) for k in range(len(lp.candidates))],
                                   [sum(m.damage[k] for m in members) for k in range(len(lp.candidates))]))
    return Profile(prof.estimator, prof.fixed_bytes, layers, prof.transforms), parts


def expand(plan: Plan, parts: dict[str, list[str]]) -> Plan:
    out = {}
    for name, cand in plan.layers.items():
        for n in parts.get(name, [name]):
            out[n] = cand
    return Plan(out, plan.transforms)


def measure(plans: dict[str, Plan]) -> dict[str, dict]:
    from mixq import data
    from mixq.apply import apply_plan, pack_model
    from mixq.eval.perplexity import perplexity

    from common import smollm2

    model, tok, calib, evals = smollm2()
    novel = data.evaluation_windows(tok, str(HERE / "data" / "botchan.txt"), 16)
    out = {}
    for key, plan in plans.items():
        m = copy.deepcopy(model)
        pack_model(m, apply_plan(m, calib, plan))
        out[key] = {"pydoc": perplexity(m, evals), "novel": perplexity(m, novel)}
        print(key, out[key], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=str(HERE / "results" / "smollm2_bits_profile.json"))
    ap.add_argument("--measure", action="store_true")
    args = ap.parse_args()
    prof = Profile.from_json(Path(args.profile).read_text())
    tied, parts = fused(prof)
    rows, plans = [], {}
    for bpw in BUDGETS:
        split_alloc, tied_alloc = allocate(prof, Budget(bits=bpw)), allocate(tied, Budget(bits=bpw))
        plans[f"parts {bpw}"], plans[f"fused {bpw}"] = split_alloc.plan, expand(tied_alloc.plan, parts)
        rows.append((bpw, split_alloc, tied_alloc))
    measured = measure({k: v for k, v in plans.items() if k.endswith("3.0")}) if args.measure else {}
    lines = ["# Fused matrices as one allocation unit", "",
             "`python benchmarks/fused.py" + (" --measure" if args.measure else "") + "` (its docstring says how). "
             f"Profile: `{Path(args.profile).name}` ({prof.estimator}). " + provenance(), "",
             "| budget bpw | unit | real bpw | predicted damage | × parts' |", "|---|---|---|---|---|"]
    for bpw, a, b in rows:
        lines.append(f"| {bpw} | a format per part | {a.bits_per_weight(prof):.3f} | {a.damage:.4g} | 1 |")
        lines.append(f"| {bpw} | one format per fused matrix | {b.bits_per_weight(tied):.3f} | {b.damage:.4g} | "
                     f"{b.damage / a.damage:.3f} |")
    if measured:
        lines += ["", "Applied at 3.0 bpw (perplexity by the protocol; novel: botchan, 16 windows):", "",
                  "| unit | pydoc | novel |", "|---|---|---|"]
        lines += [f"| {k.split()[0]} | {v['pydoc']:.3f} | {v['novel']:.2f} |" for k, v in measured.items()]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
