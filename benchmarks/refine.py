"""Does interaction refinement (`--refine`) lower real perplexity? SmolLM2-135M, the exact allocation from one
saved profile, with and without N rounds of the measured-KL search, each applied by the real pipeline
(sequential GPTQ) and evaluated by the protocol.

`python benchmarks/refine.py [--budgets 2.5 3.0 3.5] [--rounds 4]` writes benchmarks/results/refine.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from mixq import data
from mixq.allocate import allocate
from mixq.eval.perplexity import perplexity
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.plan import Budget
from mixq.profile import Profile
from mixq.refine import refine

from common import HERE, provenance, smollm2



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--profile", type=Path, default=HERE / "results" / "smollm2_bits_profile.json")
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS)
    ap.add_argument("--out", default=str(HERE / "results" / "refine"))
    args = ap.parse_args()
    model, tok, calib, evals = smollm2(args.windows)
    profile = Profile.from_json(args.profile.read_text())
    rows = []
    for budget in args.budgets:
        alloc = allocate(profile, Budget(bits=budget))
        t = time.perf_counter()
        r = refine(model, calib, profile, alloc, Budget(bits=budget), rounds=args.rounds)
        refine_seconds = time.perf_counter() - t
        for label, plan in (("allocation", alloc.plan), (f"+ refine ({args.rounds} rounds)", r.allocation.plan)):
            m = copy.deepcopy(model)
            pack_model(m, apply_plan(m, calib, plan))
            bits, weights = block_linear_bits(m)
            rows.append({"budget": budget, "method": label, "bpw": bits / weights, "ppl": perplexity(m, evals)})
            if label != "allocation":
                rows[-1] |= {"kl_before": r.kl_before, "kl_after": r.kl_after, "measured": r.measured,
                             "trades": r.trades, "seconds": refine_seconds}
            print(rows[-1], flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["# Interaction refinement on SmolLM2-135M", "",
             f"Perplexity on the pydoc evaluation split, {args.windows} windows × 512 tokens; plans from "
             f"`{args.profile.name}`, applied by the real pipeline. Measured KL on 4 × 512 calibration tokens. "
             + provenance(), "",
             "| budget | plan | real bpw | ppl | measured KL before → after | trades kept | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl_before']:.4f} → {r['kl_after']:.4f}" if "kl_before" in r else ""
        kept = str(len(r["trades"])) if "trades" in r else ""
        secs = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(f"| {r['budget']:g} | {r['method']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {kl} | {kept} | {secs} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
