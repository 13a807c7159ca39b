"""Uniform RTN / clip / GPTQ against mixq's mixed precision on SmolLM2-135M at real block-linear bpw budgets.

Reruns from scratch: `python benchmarks/smollm2_bits.py` (about an hour on 2 cores; more with the lattice formats).
Writes benchmarks/results/smollm2_bits.md, .json and .png. Perplexity by the project's protocol (pydoc split, first
64 windows of 512 tokens of the evaluation split) and on an unlike text (benchmarks/data/botchan.txt, a novel, its
first 32 windows); bpw counts every stored byte of the block linears. mixq's candidates: `--formats` (as `mixq
quantize --formats` reads them; by default the default menu plus the lattice codebooks iq2-g64 and iq3-g64 and
binary coding's bcq2-g64, each filled by its grid's own solver where it has one), its label naming what it adds
to the default menu.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from mixq import data
from mixq.allocate import allocate, bit_limits
from mixq.eval.perplexity import perplexity
from mixq.formats import QuantSpec
from mixq.models import adapter_for
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.profile import Profile, profile_model
from mixq.plan import Budget, Candidate, Plan
from mixq.config import DEFAULT_SOLVER, default_specs, filled, parse_formats
from mixq.sensitivity import DEFAULT_ESTIMATOR, ESTIMATORS

from common import HERE, finish_bpw_plot, provenance, smollm2

REFERENCE_PPL = 12.63  # the dequantized Q4_1 model in fp32, by the protocol
UNLIKE, UNLIKE_WINDOWS = HERE / "data" / "botchan.txt", 32
FORMATS = "default,iq2-g64,iq3-g64,bcq2-g64"


def uniform_spec(model, budget_bits: float) -> QuantSpec | None:
    """The format (bits, group, grid, scale codes) of largest real bpw ≤ budget that fits every block linear (None:
    none is that small; 2-bit codes with one scale a row already take more than 2.0)."""
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
    return None if best is None else best[1]


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
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.25])
    ap.add_argument("--formats", default=FORMATS, help="mixq's candidate formats, comma-separated ('default': the "
                    "default menu)")
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS)
    ap.add_argument("--methods", nargs="+", default=["rtn", "clip", "gptq", "mixq"])
    ap.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=sorted(ESTIMATORS),
                    help="the mixq profile's damage estimator")
    ap.add_argument("--out", default=str(HERE / "results" / "smollm2_bits"))
    ap.add_argument("--profile", type=Path, help="reuse this saved profile (an earlier run's OUT_profile.json, of "
                    "--estimator, with these --formats among its candidates: only they are allocated) instead of "
                    "profiling again")
    ap.add_argument("--profile-seconds", type=float, default=0.0,
                    help="with --profile: the seconds it took (its run printed them), for the table")
    ap.add_argument("--update", action="store_true",
                    help="keep OUT.json's rows of the methods and budgets this run does not redo")
    args = ap.parse_args()
    saved = Path(args.out).with_suffix(".json")
    if args.update and not saved.exists():  # before the model loads
        raise SystemExit(f"--update: no {saved} to update")
    if args.profile is not None and not args.profile.is_file():
        raise SystemExit(f"--profile: no file {args.profile}")
    old = json.loads(saved.read_text()) if args.update else []
    try:
        specs = parse_formats(args.formats)  # (a bad name: one line, before the model loads)
    except ValueError as e:
        raise SystemExit(f"--formats: {e}") from None
    added = [s.name for s in specs if s not in default_specs()]
    prof, profile_seconds = None, args.profile_seconds
    if "mixq" in args.methods and args.profile is not None:  # (checked before the model loads)
        prof = Profile.from_json(args.profile.read_text())
        wanted = {filled(s, DEFAULT_SOLVER) for s in specs}
        if prof.estimator != args.estimator or not wanted <= {c for lp in prof.layers for c in lp.candidates}:
            raise SystemExit(f"--profile: {args.profile} is not a profile of these --formats by {args.estimator}")
        for lp in prof.layers:  # (a profile of more formats: these alone)
            keep = [i for i, c in enumerate(lp.candidates) if c in wanted]
            lp.candidates, lp.bits, lp.damage = ([xs[i] for i in keep] for xs in (lp.candidates, lp.bits, lp.damage))
    torch.manual_seed(0)
    model, tok, calib, evals = smollm2(args.windows)
    evals = {"ppl": evals, "unlike": data.evaluation_windows(tok, str(UNLIKE), UNLIKE_WINDOWS)}
    rows = old[:1] if old and "unlike" in old[0] else []
    rows = rows or [{"method": "float (reference)", "budget": None, "bpw": 32.0, "seconds": 0.0,
                     **{k: perplexity(model, v) for k, v in evals.items()}}]
    print(rows[-1], flush=True)
    save(rows, old, Path(args.out), args.windows)
    if "mixq" in args.methods and prof is None:
        t = time.perf_counter()
        prof = profile_model(model, calib, [filled(s, DEFAULT_SOLVER) for s in specs], args.estimator)
        profile_seconds = time.perf_counter() - t
        Path(args.out).with_name(Path(args.out).name + "_profile.json").write_text(prof.to_json())
        print(f"profile: {profile_seconds:.0f} s", flush=True)
    names = adapter_for(model).layer_names(model)
    for budget in args.budgets:
        for method in args.methods:
            if method == "mixq":
                t = time.perf_counter()
                smallest = bit_limits(prof, tables=True)[0] / prof.weights
                if budget < smallest:  # (the menu's 2-bit formats all store more than 2.0 bits a weight)
                    print(f"mixq at {budget:g}: the menu's smallest model is {smallest:.3f} bpw; that one", flush=True)
                plan = allocate(prof, Budget(bits=max(budget, np.ceil(smallest * 1e4) / 1e4))).plan
                extra = profile_seconds + time.perf_counter() - t
                label = f"mixq mixed ({args.estimator}{', + ' + ', '.join(added) if added else ''})"
            else:
                spec = uniform_spec(model, budget)
                if spec is None:
                    print(f"uniform {method} at {budget:g}: no uniform format is that small", flush=True)
                    continue
                plan = Plan({n: Candidate(spec, method) for n in names})
                extra, label = 0.0, f"uniform {method} {spec.name}"
            r = run(model, calib, evals, plan)
            r["seconds"] += extra
            rows.append({"method": label, "budget": budget, **r,
                         **({"profile_seconds": profile_seconds} if method == "mixq" else {})})
            print(rows[-1], flush=True)
            save(rows, old, Path(args.out), args.windows)  # (after every row: a stopped run keeps its rows)
    save(rows, old, Path(args.out), args.windows)


def save(rows, old, out: Path, windows: int):
    """This run's rows (the reference first), with `old`'s rows of the methods and budgets it has not redone."""
    redone = {(family(r), r["budget"]) for r in rows[1:]}
    kept = [r for r in old[1:] if (family(r), r["budget"]) not in redone]
    write(rows[:1] + sorted(kept + rows[1:], key=lambda r: (r["budget"], r["method"].startswith("mixq"))), out,
          windows)


def write(rows, out: Path, windows: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    ref = rows[0]["ppl"]
    lines = ["# SmolLM2-135M: uniform vs mixed precision at real block-linear bpw budgets", "",
             f"Perplexity on the pydoc evaluation split, {windows} windows × 512 tokens, and on botchan.txt (a novel "
             f"unlike the calibration, its first {UNLIKE_WINDOWS} windows); calibration: 32 × 512 tokens of the pydoc "
             "calibration split. Block linears only (the tables stay float here; default_runs.md has whole files). "
             + provenance(), "",
             "| budget | method | real bpw | pydoc ppl | × reference | botchan ppl | × reference | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    unlike_ref = rows[0].get("unlike")
    for r in rows:
        b = "" if r["budget"] is None else f"{r['budget']:g}"
        u = f"{r['unlike']:.2f} | {r['unlike'] / unlike_ref:.3f}" if "unlike" in r and unlike_ref else "— | —"
        lines.append(f"| {b} | {r['method']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['ppl'] / ref:.3f} | {u} | "
                     f"{r['seconds']:.0f} |")
    profiles = sorted({(r["method"], round(r["profile_seconds"])) for r in rows if "profile_seconds" in r})
    lines += ["", "A budget below the smallest model mixq's menu can make (2.0: every 2-bit format stores its scales "
              "too) is run at that smallest model: its real bpw says where. Seconds: the apply, and for mixq rows "
              "also the one profile of the default candidates their budgets share ("
              + ", ".join(f"{s} s for {m}" for m, s in profiles) + "). Rows may come from several "
              "runs (`--update`); on a 2-core machine other work may have shared, so seconds are indicative only. "
              "The profile of the last run's estimator is `smollm2_bits_profile.json` (`mixq allocate` reads it). The "
              "targets are judged on the default estimator's rows where there are any.", ""]
    default = [r for r in rows if r["method"].startswith(f"mixq mixed ({DEFAULT_ESTIMATOR}")]
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
