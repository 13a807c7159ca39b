"""Which damage estimator predicts real damage? Rank correlation with real perplexity, and what each one's
allocation reaches, on SmolLM2-135M.

Reruns from scratch: `python benchmarks/sensitivity.py` (about an hour on 2 cores). Writes
benchmarks/results/sensitivity.{md,json,png}.

1. Every block linear is solved once for every benchmark candidate (GPTQ, bits 2–5 × {g64 min dq6, g192 min}),
   on the Hessians of the float model, whole rows; every estimator scores those very weights (the cost of each
   is timed on its own; the solves are shared).
2. 30 random plans at 3.0 real bpw (the exact knapsack on random per-layer sensitivities, so every plan fills the
   budget but spends it differently) plus each estimator's own allocation at 2.5 / 3.0 / 3.5 bpw are put into the
   model (each layer its solved weights) and evaluated by the protocol.
3. Spearman's ρ between each estimator's predicted total damage (the sum the allocator minimises) and the real
   perplexity, over the 3.0 bpw plans.

The plans here are applied with weights solved on the float model's inputs (no sequential re-calibration), so
that 45 plans cost 45 evaluations instead of 45 quantization runs; `mixq quantize` calibrates each block on the
outputs of the blocks already quantized, which lowers every perplexity a little.

`--add oac` scores a new estimator on the saved run instead (minutes, not the hour of a rerun): the same plans
(the random ones are seeded; the allocations come from the saved profiles) keep their saved perplexities, the
candidates are solved again as the saved run solved them (GPTQ damping `--damp`: 0.01 for runs before d46a6c5)
and checked against the saved fisher scores (it stops if any plan's total differs by more than ADD_DRIFT: the
weights would not be the ones evaluated), the new estimator scores them, and its own allocations are evaluated and added.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from mixq import data
from mixq.allocate import allocate
from mixq.capture import FISHER_WINDOWS, float_block_stats, output_energy, output_fisher
from mixq.eval.perplexity import perplexity
from mixq.formats import QuantSpec
from mixq.models import adapter_for
from mixq.plan import Budget, Candidate
from mixq.profile import Profile, fixed_bytes, layer_costs
from mixq.sensitivity import get_estimator
from mixq.sensitivity.kl import KLProbe
from mixq.sensitivity.oac import oac_stats
from mixq.solvers import DAMP, solve

from common import HERE, provenance, smollm2

CANDIDATES = [Candidate(QuantSpec.of(b, g, "min", sb), "gptq") for b in (2, 3, 4, 5) for g, sb in ((64, 6), (192, 16))]
ESTIMATORS = ("fisher", "oac", "hessian", "kl", "roundoff", "sqnr")


ADD_DRIFT = 0.005  # --add: how far the solved-again weights' fisher scores may be from the saved run's


def solve_and_score(model, calib, estimators, damp: float | None = None):
    """(dequantized weights: layer → one fp16 tensor per candidate, profile per estimator, seconds per stage)."""
    adapter = adapter_for(model)
    names = adapter.layer_names(model)
    seconds = {e: 0.0 for e in estimators} | {"solve": 0.0}
    fisher = probe = energy = None
    t = time.perf_counter()
    if "fisher" in estimators:  # the backward passes count for fisher and oac, the reference logits for kl
        fisher = output_fisher(model, adapter, calib[:FISHER_WINDOWS])
        seconds["fisher"] += time.perf_counter() - t
    t = time.perf_counter()
    if "oac" in estimators:
        energy = output_energy(model, adapter, calib[:FISHER_WINDOWS])
        seconds["oac"] += time.perf_counter() - t
    t = time.perf_counter()
    if "kl" in estimators:
        probe = KLProbe(model, adapter, calib)
        seconds["kl"] += time.perf_counter() - t
    profiles = {e: Profile(e, fixed_bytes(model, names)) for e in estimators}
    deqs = {}
    keep = calib[:FISHER_WINDOWS].numel() if energy else 0
    damp = DAMP if damp is None else damp
    for i, block, stats in float_block_stats(model, adapter, calib, keep):
        for group in adapter.groups:
            for n in group:
                name, lin = f"{adapter.blocks}.{i}.{n}", block.get_submodule(n)
                w, st = lin.weight.detach(), stats[group[0]]
                t = time.perf_counter()
                deq = [solve(c.solver, w, st, c.spec, damp).dequantize() for c in CANDIDATES]
                seconds["solve"] += time.perf_counter() - t
                deqs[name] = [d.half() for d in deq]
                for e in estimators:
                    context = {"fisher": fisher[name] if fisher else None,
                               "kl": probe.layer(lin) if probe else None}.get(e)
                    t = time.perf_counter()
                    judged = oac_stats(st.inputs, energy[name], st.mean)[False] if e == "oac" else st
                    lp = layer_costs(name, *w.shape, CANDIDATES)
                    lp.damage = [get_estimator(e)(w, d, judged, context) for d in deq]
                    seconds[e] += time.perf_counter() - t
                    profiles[e].layers.append(lp)
        if probe:
            probe.advance()
        print(f"block {i}: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), flush=True)
    return deqs, profiles, seconds


def random_plans(profile: Profile, count: int, bpw: float, seed: int = 0):
    """Plans that fill the budget exactly but spend it differently: the exact knapsack on random sensitivities
    (a log-uniform scale per layer over four decades, the usual 4^-bits fall-off, ±2× noise per candidate)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scale = 10 ** rng.uniform(-2, 2, len(profile.layers))
        fake = replace(profile, layers=[
            replace(lp, damage=[float(s * 4.0 ** -c.spec.bits * 2 ** rng.uniform(-1, 1)) for c in lp.candidates])
            for s, lp in zip(scale, profile.layers)])
        yield allocate(fake, Budget(bits=bpw)).plan


def evaluate(model, deqs, plan, evals) -> float:
    """Perplexity with each layer's solved weights for its candidate in the plan (float weights restored after)."""
    saved = {}
    for name, cand in plan.layers.items():
        lin = model.get_submodule(name)
        saved[name] = lin.weight.data
        lin.weight.data = deqs[name][CANDIDATES.index(cand)].float()
    try:
        return perplexity(model, evals)
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


def predicted(profile: Profile, plan) -> float:
    return sum(lp.damage[lp.candidates.index(plan.layers[lp.name])] for lp in profile.layers)


def plan_bpw(profile: Profile, plan) -> float:
    return sum(lp.bits[lp.candidates.index(plan.layers[lp.name])] for lp in profile.layers) / profile.weights


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", type=int, default=30, help="random plans at --bpw")
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS)
    ap.add_argument("--out", default=str(HERE / "results" / "sensitivity"))
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the table and plot from the saved JSON")
    ap.add_argument("--add", nargs="+", metavar="ESTIMATOR", help="score these estimators on the saved run (see "
                    "above) and add their allocations")
    ap.add_argument("--damp", type=float, default=0.01, help="with --add: the GPTQ damping the saved run solved at")
    args = ap.parse_args()
    if args.rewrite or args.add:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        args.estimators = [e for e in args.estimators if e in saved["spearman"] or e in (args.add or [])]
        if args.add:
            return add(saved, args)
        return write(saved["rows"], saved["seconds"], saved["reference"], args, saved["provenance"])
    torch.manual_seed(0)
    model, tok, calib, evals = smollm2(args.windows)
    reference = perplexity(model, evals)
    print(f"reference {reference:.3f}", flush=True)
    deqs, profiles, seconds = solve_and_score(model, calib, args.estimators)
    for e, p in profiles.items():
        Path(args.out).with_name(f"sensitivity_profile_{e}.json").write_text(p.to_json())
    any_profile = profiles[args.estimators[0]]
    rows = []
    partial = Path(args.out).with_suffix(".json")
    for k, plan in enumerate(random_plans(any_profile, args.plans, args.bpw)):
        rows.append({"plan": f"random {k}", "budget": args.bpw, "bpw": plan_bpw(any_profile, plan),
                     "ppl": evaluate(model, deqs, plan, evals),
                     "predicted": {e: predicted(p, plan) for e, p in profiles.items()}})
        print(rows[-1], flush=True)
        partial.write_text(json.dumps({"reference": reference, "seconds": seconds, "rows": rows,
                                       "provenance": provenance()}))
    for e in args.estimators:
        for budget in args.budgets:
            plan = allocate(profiles[e], Budget(bits=budget)).plan
            rows.append({"plan": f"{e} allocation", "budget": budget, "bpw": plan_bpw(any_profile, plan),
                         "ppl": evaluate(model, deqs, plan, evals),
                         "predicted": {f: predicted(p, plan) for f, p in profiles.items()}})
            print(rows[-1], flush=True)
            partial.write_text(json.dumps({"reference": reference, "seconds": seconds, "rows": rows,
                                       "provenance": provenance()}))
    write(rows, seconds, reference, args, provenance())


def add(saved: dict, args):
    """--add: the saved run's plans and perplexities, scored by more estimators (module docstring)."""
    out, old = Path(args.out), [e for e in saved["spearman"]]
    profiles = {e: Profile.from_json(out.with_name(f"sensitivity_profile_{e}.json").read_text()) for e in old}
    plans = list(random_plans(profiles[old[0]], args.plans, args.bpw))
    plans += [allocate(profiles[e], Budget(bits=b)).plan for e in old for b in args.budgets]
    rows = saved["rows"]
    if len(plans) != len(rows) or any(abs(plan_bpw(profiles[old[0]], p) - r["bpw"]) > 1e-9
                                      for p, r in zip(plans, rows)):
        raise SystemExit("the saved rows are not the plans this script makes: rerun the benchmark instead")
    torch.manual_seed(0)
    model, tok, calib, evals = smollm2(args.windows)
    deqs, new, seconds = solve_and_score(model, calib, ["fisher", *args.add], args.damp)
    again = np.array([predicted(new["fisher"], p) for p in plans])
    drift = float(np.max(np.abs(again / np.array([r["predicted"]["fisher"] for r in rows]) - 1)))
    if drift > ADD_DRIFT:
        raise SystemExit(f"solved again at damping {args.damp:g}, the fisher scores differ from the saved ones by up "
                         f"to {drift:.2%}: these are not the weights the saved run evaluated")
    profiles |= {e: new[e] for e in args.add}
    for plan, r in zip(plans, rows):
        r["predicted"] |= {e: predicted(new[e], plan) for e in args.add}
    for e in args.add:
        out.with_name(f"sensitivity_profile_{e}.json").write_text(new[e].to_json())
        for budget in args.budgets:
            plan = allocate(new[e], Budget(bits=budget)).plan
            rows.append({"plan": f"{e} allocation", "budget": budget, "bpw": plan_bpw(new[e], plan),
                         "ppl": evaluate(model, deqs, plan, evals),
                         "predicted": {f: predicted(p, plan) for f, p in profiles.items()}})
            print(rows[-1], flush=True)
    seconds = saved["seconds"] | {e: seconds[e] for e in args.add}
    write(rows, seconds, saved["reference"], args, saved["provenance"] + f" Added {', '.join(args.add)} on weights "
          f"solved again (their fisher scores within {drift:.2%} of the saved ones): " + provenance())


def correlations(rows, estimators, bpw):
    pool = [r for r in rows if r["budget"] == bpw]
    ppl = [r["ppl"] for r in pool]
    return {e: float(spearmanr([r["predicted"][e] for r in pool], ppl).statistic) for e in estimators}, len(pool)


def write(rows, seconds, reference, args, machine: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    rho, pooled = correlations(rows, args.estimators, args.bpw)
    out.with_suffix(".json").write_text(json.dumps({"provenance": machine, "reference": reference,
                                                    "seconds": seconds, "spearman": rho,
                                                    "rows": rows}, indent=1))
    lines = ["# Damage estimators against real perplexity on SmolLM2-135M", "",
             f"Perplexity on the pydoc evaluation split, {args.windows} windows × 512 tokens (reference "
             f"{reference:.3f}); calibration 32 × 512 tokens of the pydoc calibration split. Candidates: GPTQ, bits "
             f"2–5 × {{g64 min dq6, g192 min}}, solved once on the float model's inputs and shared by every plan "
             f"(see the script's docstring). " + machine, "",
             f"## Rank correlation with perplexity ({pooled} plans at {args.bpw:g} bpw: {args.plans} random + the "
             "allocations)", "", "| estimator | Spearman ρ | seconds (scoring, on top of the shared solves) |",
             "|---|---|---|"]
    for e in args.estimators:
        lines.append(f"| {e} | {rho[e]:.3f} | {seconds[e]:.0f} |")
    lines += ["", f"Shared solves: {seconds['solve']:.0f} s.", "", "## Each estimator's allocation", "",
              "| estimator | " + " | ".join(f"{b:g} bpw: real bpw, ppl" for b in args.budgets) + " |",
              "|---|" + "---|" * len(args.budgets)]
    for e in args.estimators:
        cells = []
        for b in args.budgets:
            r = next(r for r in rows if r["plan"] == f"{e} allocation" and r["budget"] == b)
            cells.append(f"{r['bpw']:.3f}, {r['ppl']:.2f}")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    rand = [r["ppl"] for r in rows if r["plan"].startswith("random")]
    if rand:
        lines += ["", f"Random plans at {args.bpw:g} bpw: perplexity {min(rand):.2f} to {max(rand):.2f} "
                  f"(median {float(np.median(rand)):.2f})."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(args.estimators), figsize=(3.2 * len(args.estimators), 3.4), sharey=True)
    for ax, e in zip(np.atleast_1d(axes), args.estimators):
        pool = [r for r in rows if r["budget"] == args.bpw]
        rnd = [r for r in pool if r["plan"].startswith("random")]
        alloc = [r for r in pool if not r["plan"].startswith("random")]
        ax.scatter([r["predicted"][e] for r in rnd], [r["ppl"] for r in rnd], s=14, label="random plans")
        ax.scatter([r["predicted"][e] for r in alloc], [r["ppl"] for r in alloc], s=30, marker="*",
                   label="allocations")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.set_title(f"{e}: ρ = {rho[e]:.2f}")
        ax.set_xlabel("predicted total damage")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(f"pydoc perplexity ({args.bpw:g} bpw)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
