"""Uniform RTN / clip / GPTQ against mixq's mixed precision on SmolLM2-135M at real block-linear bpw budgets.

Reruns from scratch: `python benchmarks/smollm2_bits.py` (about an hour on 2 cores). Writes
benchmarks/results/smollm2_bits.md, .json and .png. Perplexity by the project's protocol (pydoc split, first 64
windows of 512 tokens of the evaluation split); bpw counts every stored byte of the block linears.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from mixq import data
from mixq.allocate import allocate
from mixq.eval.perplexity import perplexity
from mixq.formats import QuantSpec
from mixq.models import adapter_for
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.profile import profile_model
from mixq.plan import Budget, Candidate, Plan
from mixq.config import default_candidates
from mixq.sensitivity import DEFAULT_ESTIMATOR, ESTIMATORS

from common import HERE, finish_bpw_plot, provenance, smollm2

REFERENCE_PPL = 12.63  # the dequantized Q4_1 model in fp32, by the protocol


def uniform_spec(model, budget_bits: float) -> QuantSpec:
    """The format (bits, group, grid, scale codes) of largest real bpw ≤ budget that fits every block linear."""
    adapter = adapter_for(model)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in adapter.layer_names(model)]
    total = sum(r * c for r, c in shapes)
    best = None
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64, 96, 192, 0):
            for grid, scale_bits in (("int", 16), ("sym", 16), ("min", 16), ("sym", 6), ("min", 6)):
                spec = QuantSpec.of(bits, group, grid, scale_bits)
                if not all(spec.fits(c) for _, c in shapes):
                    continue
                bpw = sum(spec.storage_bits(r, c) for r, c in shapes) / total
                if bpw <= budget_bits + 1e-9 and (best is None or bpw > best[0]):
                    best = (bpw, spec)
    return best[1]


def real_bpw(model) -> float:
    bits, weights = block_linear_bits(model)
    return bits / weights


def family(row) -> str:
    """A row's method without its uniform format ("uniform gptq int2-g32-sym" -> "uniform gptq"): one line of the
    plot, and what a rerun of a budget replaces."""
    return row["method"].split(" int")[0]


def run(float_model, calib, evals, plan: Plan) -> dict:
    model = copy.deepcopy(float_model)
    t = time.perf_counter()
    qt = apply_plan(model, calib, plan)
    pack_model(model, qt)
    seconds = time.perf_counter() - t
    return {"bpw": real_bpw(model), "seconds": seconds, **{k: perplexity(model, v) for k, v in evals.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.25])
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS)
    ap.add_argument("--methods", nargs="+", default=["rtn", "clip", "gptq", "mixq"])
    ap.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=sorted(ESTIMATORS),
                    help="the mixq profile's damage estimator")
    ap.add_argument("--out", default=str(HERE / "results" / "smollm2_bits"))
    ap.add_argument("--update", action="store_true",
                    help="keep OUT.json's rows of the methods and budgets this run does not redo")
    args = ap.parse_args()
    saved = Path(args.out).with_suffix(".json")
    if args.update and not saved.exists():  # before the model loads
        raise SystemExit(f"--update: no {saved} to update")
    old = json.loads(saved.read_text()) if args.update else []
    torch.manual_seed(0)
    model, tok, calib, evals = smollm2(args.windows)
    evals = {"ppl": evals}
    rows = old[:1] or [{"method": "float (reference)", "budget": None, "bpw": 32.0, "seconds": 0.0,
                        "ppl": perplexity(model, evals["ppl"])}]
    print(rows[-1], flush=True)
    prof = None
    if "mixq" in args.methods:
        t = time.perf_counter()
        prof = profile_model(model, calib, default_candidates(), args.estimator)
        profile_seconds = time.perf_counter() - t
        Path(args.out).with_name(Path(args.out).name + "_profile.json").write_text(prof.to_json())
        print(f"profile: {profile_seconds:.0f} s", flush=True)
    names = adapter_for(model).layer_names(model)
    for budget in args.budgets:
        for method in args.methods:
            if method == "mixq":
                t = time.perf_counter()
                plan = allocate(prof, Budget(bits=budget)).plan
                extra = profile_seconds + time.perf_counter() - t
                label = f"mixq mixed ({args.estimator})"
            else:
                spec = uniform_spec(model, budget)
                plan = Plan({n: Candidate(spec, method) for n in names})
                extra, label = 0.0, f"uniform {method} {spec.name}"
            r = run(model, calib, evals, plan)
            r["seconds"] += extra
            rows.append({"method": label, "budget": budget, **r,
                         **({"profile_seconds": profile_seconds} if method == "mixq" else {})})
            print(rows[-1], flush=True)
    redone = {(family(r), r["budget"]) for r in rows[1:]}
    kept = [r for r in old[1:] if (family(r), r["budget"]) not in redone]
    rows = rows[:1] + sorted(kept + rows[1:], key=lambda r: (r["budget"], r["method"].startswith("mixq")))
    write(rows, Path(args.out), args.windows)



def write(rows, out: Path, windows: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    ref = rows[0]["ppl"]
    lines = ["# SmolLM2-135M: uniform vs mixed precision at real block-linear bpw budgets", "",
             f"Perplexity on the pydoc evaluation split, {windows} windows × 512 tokens; calibration: 32 × 512 tokens "
             f"of the pydoc calibration split. " + provenance(), "",
             "| budget | method | real bpw | ppl | × reference | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        b = "" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {b} | {r['method']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['ppl'] / ref:.3f} | "
                     f"{r['seconds']:.0f} |")
    profiles = sorted({(r["method"], round(r["profile_seconds"])) for r in rows if "profile_seconds" in r})
    lines += ["", "Seconds: the apply, and for mixq rows also the one profile of the default candidates their "
              "budgets share (" + ", ".join(f"{s} s for {m}" for m, s in profiles) + "). Rows may come from several "
              "runs (`--update`); on a 2-core machine other work may have shared, so seconds are indicative only. "
              "The profile of the last run's estimator is `smollm2_bits_profile.json` (`mixq allocate` reads it). The "
              "targets are judged on the default estimator's rows where there are any.", ""]
    default = [r for r in rows if r["method"] == f"mixq mixed ({DEFAULT_ESTIMATOR})"]
    mixq = default or [r for r in rows if r["method"].startswith("mixq")]
    for budget, limit in ((3.0, 1.5), (2.5, 2.5), (4.25, 1.04)):
        best = min((r["ppl"] / ref for r in mixq if r["budget"] == budget), default=None)
        if best is not None:
            lines.append(f"- issue 3's target at {budget} bpw, ≤ {limit} × reference: "
                         f"{'met' if best <= limit else 'NOT met'} ({best:.3f} ×)")
    ours = min((r["ppl"] for r in mixq if r["budget"] == 3.0), default=None)
    uniform = min((r["ppl"] for r in rows if r["budget"] == 3.0 and r["method"].startswith("uniform")), default=None)
    if ours and uniform:
        lines.append(f"- issue 4's target at 3.0 bpw, ≥ 10 % below the best uniform method at ≤ 3.0 bpw: "
                     f"{'met' if ours <= 0.9 * uniform else 'NOT met'} ({1 - ours / uniform:.1%} below)")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({family(r) for r in rows[1:]}):
        pts = sorted((r["bpw"], r["ppl"]) for r in rows[1:] if family(r) == method)
        ax.plot(*zip(*pts), "o-", label=method)
    finish_bpw_plot(fig, ax, ref, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
