"""Every per-layer solver (and the useful chains) at uniform formats on SmolLM2-135M, then mixq's allocation with
the solver chains as candidates: perplexity, real bpw, seconds.

Reruns from scratch: `python benchmarks/solvers.py` (hours on 2 cores: each row applies the whole model and
evaluates it). Each finished row is written to the JSON at once and a rerun with the same --windows skips it, so
the script can be stopped and resumed; --solvers / --formats / --budgets pick a subset. Writes
benchmarks/results/solvers.md, .json and .png. Perplexity by the project's protocol (pydoc split, first 64 windows
of 512 tokens of the evaluation split); calibration 32 × 512 tokens of the pydoc calibration split and, as
`mixq quantize --calib-generated` adds, --generated windows of 512 tokens the model samples itself (default 0). A
text unlike the calibration (benchmarks/data/botchan.txt, a novel) checks that calibrating on one text does not
wreck another: its first 32 windows of 512 tokens. Each row records its calibration and GPTQ damping.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

import torch

from mixq import data
from mixq.eval.perplexity import perplexity
from mixq.formats import QuantSpec
from mixq.models import adapter_for
from mixq.allocate import allocate
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.chain import Chain, check_list, parse_list
from mixq.plan import Budget, Candidate, Plan
from mixq.config import default_candidates
from mixq.profile import Profile, merge_profiles, profile_model
from mixq.sensitivity import DEFAULT_ESTIMATOR, ESTIMATORS
from mixq.solvers import DAMP
from mixq.solvers.gptq import PUBLISHED_DAMP
from mixq.transforms import apply_transforms, layer_candidates

from common import HERE, provenance, smollm2

# the four uniform formats, on GPTQ's classic asymmetric grid (integer zeros): 192 and 64 divide every row;
# and two on the grid with a free fp16 offset ("min": HQQ's own format and the default candidates' grid)
FORMATS = {"3-bit g192": QuantSpec.of(3, 192), "3-bit g64": QuantSpec.of(3, 64), "2-bit g64": QuantSpec.of(2, 64),
           "4-bit g192": QuantSpec.of(4, 192), "3-bit g64 min": QuantSpec.of(3, 64, "min"),
           "4-bit g192 min": QuantSpec.of(4, 192, "min")}
SOLVERS = ["rtn", "clip", "gptq-plain", "gptq", "gptq-act", "oac", "aespa", "comq", "gptq-act+bias", "gptq-act+comq",
           "aespa+comq", "gptq-act+comq+bias", "rotate+gptq-act+comq", "rotate+gptq-act+bias", "rotate+aespa+comq",
           "resq+gptq-act+comq"]
ALLOC_SOLVERS = ["gptq-act+comq"]  # the others lose to it at every format above (bias: see the table's note)
UNLIKE = HERE / "data" / "botchan.txt"
UNLIKE_WINDOWS = 32


def run(float_model, calib, evals: dict, plan: Plan, damp: float) -> dict:
    model = copy.deepcopy(float_model)
    t = time.perf_counter()
    apply_transforms(model, plan.transforms, calib)
    pack_model(model, apply_plan(model, calib, plan, damp=damp))
    seconds = time.perf_counter() - t
    bits, weights = block_linear_bits(model)
    return {"bpw": bits / weights, "seconds": seconds, **{k: perplexity(model, v) for k, v in evals.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS, help="evaluation windows (protocol: 64)")
    ap.add_argument("--solvers", nargs="+", default=SOLVERS)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--budgets", type=float, nargs="*", default=[2.5, 3.0, 3.5],
                    help="bpw budgets of mixq's allocation with ALLOC_SOLVERS × the default formats as candidates")
    ap.add_argument("--alloc-solver", default=ALLOC_SOLVERS[0],
                    help="the solver of the allocation's candidates (the profile is shared by solvers profiled "
                    "alike); a comma-separated list: each solver a candidate of every format, each profiled once "
                    "and saved on its own (a rerun reuses it), one solver of those profiled alike")
    ap.add_argument("--generated", type=int, default=0,
                    help="windows the model samples itself, added to the calibration (mixq quantize --calib-generated)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the seed of the --generated windows' sampling (another draw of the same mix)")
    ap.add_argument("--calib-windows", type=int, default=32,
                    help="windows of the pydoc calibration split (mixq quantize --calib-windows)")
    ap.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=sorted(ESTIMATORS),
                    help="the allocation profile's damage estimator (--sensitivity)")
    ap.add_argument("--damp", type=float, default=DAMP,
                    help="GPTQ's (and comq's) damping, a fraction of mean(diag H) (default %(default)g)")
    ap.add_argument("--out", default=str(HERE / "results" / "solvers"), help="results path without suffix")
    args = ap.parse_args()
    try:
        alloc_transforms, alloc_chains = parse_list(args.alloc_solver)
        check_list(alloc_chains)
        for solver in args.solvers:
            Chain.parse(solver)
    except ValueError as e:
        raise SystemExit(f"--alloc-solver {args.alloc_solver} / --solvers: {e}")
    several = len(alloc_chains) > 1  # every solver a candidate of every format, profiled as itself
    shared = Chain.parse(ALLOC_SOLVERS[0]).profiled()
    if not several and alloc_chains[0].profiled() != shared:  # before any long work
        raise SystemExit(f"--alloc-solver {args.alloc_solver} is profiled as {alloc_chains[0].profiled()}, "
                         f"not as {shared}: its rows cannot share the saved profile")
    if not 0 < args.damp < 10:
        raise SystemExit(f"--damp {args.damp:g}: a fraction of mean(diag H), above 0 and below 10")
    damping = args.damp  # every solve of this run (QuantizeConfig.damp)
    out = Path(args.out)
    torch.manual_seed(0)
    model, tok, calib, pydoc = smollm2(args.windows)
    evals = {"ppl": pydoc, "unlike": data.evaluation_windows(tok, UNLIKE, UNLIKE_WINDOWS)}
    if args.calib_windows != len(calib):
        calib = data.calibration_windows(tok, count=args.calib_windows)
    label = "pydoc" if args.calib_windows == 32 else f"pydoc {args.calib_windows}"
    label += f" + {args.generated} generated" if args.generated else ""
    label += f" (seed {args.seed})" if args.generated and args.seed else ""
    if args.generated:
        calib = data.mixed(calib, data.generated_windows(model, data.start_token(tok, model), args.generated,
                                                         seed=args.seed))
    rows = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else []
    rows = [r for r in rows if r["windows"] == args.windows]
    done = {(r["solver"], r["format"], r.get("calib"), r.get("damp")) for r in rows}
    setting = {"calib": label, "damp": damping}
    if not any(r["solver"] == "float" for r in rows):
        rows.append({"solver": "float", "format": "", "windows": args.windows, "bpw": 32.0, "seconds": 0.0,
                     **{k: perplexity(model, v) for k, v in evals.items()}})
        print(rows[-1], flush=True)
    adapter = adapter_for(model)
    names = adapter.layer_names(model)
    for fmt in args.formats:
        for solver in args.solvers:
            parsed = Chain.parse(solver)
            transforms, chain = parsed.transforms, parsed.layer
            damp = PUBLISHED_DAMP if chain.solver == "gptq-plain" else damping  # the damping it solves at
            if (solver, fmt, label, damp) in done:
                continue
            plan = Plan({n: layer_candidates(adapter, transforms, n, model.get_submodule(n).in_features,
                                             [Candidate(FORMATS[fmt], chain)])[0] for n in names}, transforms)
            rows.append({"solver": solver, "format": fmt, "windows": args.windows, **setting, "damp": damp,
                         **run(model, calib, evals, plan, damping)})
            print(rows[-1], flush=True)
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    suffix = f"_gen{args.generated}_damp{damping:g}" if setting != {"calib": "pydoc", "damp": 0.01} else ""
    suffix += f"_calib{args.calib_windows}" if args.calib_windows != 32 else ""
    suffix += f"_seed{args.seed}" if args.generated and args.seed else ""
    suffix += "".join(f"_{t}" for t in alloc_transforms)  # a transformed model has a profile of its own
    suffix += f"_{args.estimator}" if args.estimator != "fisher" else ""
    prof, profile_file, profile_seconds = None, out.with_name(f"{out.name}_profile{suffix}.json"), None
    for budget in args.budgets:
        row_name = "mixq allocation" + ("" if args.alloc_solver == ALLOC_SOLVERS[0] else f" ({args.alloc_solver})")
        row_name += f" [{args.estimator}]" if args.estimator != "fisher" else ""  # earlier rows: fisher
        if (row_name, f"{budget:g} bpw", label, damping) in done:
            continue
        if prof is None:
            parts, seconds = [], {}
            for chain in alloc_chains:  # each solver profiled (and saved) on its own
                alike = str(chain.profiled())
                path = profile_file if alike == str(shared) else \
                    profile_file.with_name(f"{profile_file.stem}_as-{alike}.json")
                if not path.exists():
                    t = time.perf_counter()
                    profiled = copy.deepcopy(model) if alloc_transforms else model
                    apply_transforms(profiled, alloc_transforms, calib)
                    part = profile_model(profiled, calib, [Candidate(c.spec, chain) for c in default_candidates()],
                                         args.estimator, damp=damping, transforms=alloc_transforms)
                    del profiled
                    seconds[alike] = time.perf_counter() - t
                    path.write_text(part.to_json())
                    print(f"profile of {alike}: {seconds[alike]:.0f} s", flush=True)
                part = Profile.from_json(path.read_text())
                for lp in part.layers:  # named by the chain asked for (those profiled alike share a profile)
                    lp.candidates = [Candidate(c.spec, chain) for c in lp.candidates]
                parts.append(part)
            prof = merge_profiles(parts)
            profile_seconds = sum(seconds.values()) if seconds else None
        plan = Plan(allocate(prof, Budget(bits=budget)).plan.layers, alloc_transforms)
        r = run(model, calib, evals, plan, damping)
        rows.append({"solver": row_name, "format": f"{budget:g} bpw", "windows": args.windows, **setting,
                     **r,
                     "profile_seconds": profile_seconds, "profiled": list(seconds),
                     "solvers": dict(Counter(str(c.solver) for c in plan.layers.values()))})
        print(rows[-1], flush=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    write(rows, out, args.windows)


def _label(row) -> str:
    old = (row.get("calib"), row.get("damp")) in (("pydoc", 0.01), (None, None))
    return row["solver"] if old else f"{row['solver']} ({row['calib']}, damp {row['damp']:g})"


def write(rows, out: Path, windows: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    ref = next(r for r in rows if r["solver"] == "float")
    lines = ["# SmolLM2-135M: per-layer solvers at uniform formats", "",
             f"Perplexity on the pydoc evaluation split, {windows} windows × 512 tokens; calibration 32 × 512 "
             f"tokens of the pydoc calibration split, plus windows the model samples itself where the calibration "
             f"column says so (`mixq quantize --calib-generated`); GPTQ and comq damping as the damp column says "
             f"(0.1 by default since d46a6c5; gptq-plain keeps GPTQ's 0.01). Float reference {ref['ppl']:.3f} "
             f"(pydoc), {ref['unlike']:.3f} (unlike: {UNLIKE.name}, {UNLIKE_WINDOWS} windows). " + provenance(), "",
             "| format | solver | calibration | damp | real bpw | pydoc ppl | × reference | unlike-text ppl | "
             "× reference | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["solver"] != "float":
            lines.append(f"| {r['format']} | {r['solver']} | {r['calib']} | {r['damp']:g} | {r['bpw']:.3f} | "
                         f"{r['ppl']:.3f} | "
                         f"{r['ppl'] / ref['ppl']:.3f} | {r['unlike']:.3f} | {r['unlike'] / ref['unlike']:.3f} | "
                         f"{r['seconds']:.0f}{'*' if r.get('shared') else ''} |")
    profiled = {(r["calib"] + (f", {extra}" if (extra := r["solver"].removeprefix("mixq allocation").strip()) else ""),
                 r["damp"]): r["profile_seconds"] for r in rows if r.get("profile_seconds")}
    if profiled:
        lines += ["", f"Allocation rows: candidates {', '.join(ALLOC_SOLVERS)} (or the solvers in brackets: on the "
                  "same profile where they are profiled alike, on their own where they are several or transform the "
                  "model) × the default formats, profiled by fisher (or the estimator in square brackets); seconds of "
                  "the apply; the profile the rows of one calibration share took " +
                  ", ".join(f"{v:.0f} s ({c}, damp {d:g})" for (c, d), v in profiled.items()) + "."]
    several = [r for r in rows if "," in r["solver"] and r.get("solvers")]
    if several:
        lines += ["", "Layers each solver took in the allocations with several candidate solvers (of "
                  f"{sum(several[0]['solvers'].values())}): " + "; ".join(
                      f"{r['format']} {r['solver'].removeprefix('mixq allocation ')} ({r['calib']}): " +
                      ", ".join(f"{s} {n}" for s, n in r["solvers"].items()) for r in several) + "."]
    if any(r.get("shared") for r in rows):
        lines += ["", "\\* the machine was shared with another job during this row: its seconds are inflated (the "
                  "perplexities are not affected)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    uniform = [r for r in rows if r["format"] in FORMATS]
    allocations: dict[str, list] = {}
    for r in rows:
        if r["format"].endswith("bpw"):
            allocations.setdefault(_label(r), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, text in zip(axes, ("ppl", "unlike"), ("pydoc", f"unlike text ({UNLIKE.name})")):
        ax.scatter([r["bpw"] for r in uniform], [r[key] for r in uniform], s=10, color="silver",
                   label="uniform formats, every solver")
        for fmt in FORMATS:  # the best solver of each uniform format at its own bpw (by pydoc), named
            same = [r for r in uniform if r["format"] == fmt]
            least = min((r["bpw"] for r in same), default=0)
            best = min((r for r in same if r["bpw"] < least * 1.001), key=lambda r: r["ppl"], default=None)
            if best:
                ax.scatter(best["bpw"], best[key], s=22, color="black")
                ax.annotate(f"{fmt} {best['solver']}", (best["bpw"], best[key]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        for label, rs in allocations.items():  # the allocations made at every budget: a curve each
            if len(rs) >= 3:
                rs = sorted(rs, key=lambda r: r["bpw"])
                named = rs[0]["solver"].removeprefix("mixq allocation").strip().strip("()") or ALLOC_SOLVERS[0]
                ax.plot([r["bpw"] for r in rs], [r[key] for r in rs], marker="o", ms=4,
                        label=f"allocation: {named} ({rs[0]['calib']}, damp {rs[0]['damp']:g})")
        ax.axhline(ref[key], color="gray", ls="--", label="float reference")
        ax.set_yscale("log")
        ax.set_ylim(ref[key] * 0.9, ref[key] * 6)  # collapsed rows (rtn at 2 bits) lie above
        ax.set_xlabel("real bits per weight (block linears)")
        ax.set_ylabel(f"{text} perplexity")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
