"""Non-uniform grids as candidates on SmolLM2-135M: the default menu against the default menu plus normal-float
(NF) formats, and NF alone, allocated from one profile at real block-linear bpw budgets, on the pydoc protocol and
on an unlike text.

One profile of the default solver (gptq-act+comq) over the uniform formats of the default menu and NF at 2, 3 and
4 bits (groups of 32 and 64 with 6-bit scale codes, 192 with fp16 scales, as the uniform ones), by the default
estimator; each variant is that profile with only its candidates, allocated and applied: the uniform menu (the
default before NF), today's default (the uniform menu with nf3-g32-dq6, nf3-g64-dq6 and nf4-g64-dq6), every NF
format beside the uniform ones, and NF alone. Perplexity on the pydoc evaluation split (64
windows × 512 tokens, the protocol) and on benchmarks/data/botchan.txt (a novel; its first 32 windows).

Reruns from scratch: `python benchmarks/grids.py` (about an hour on 2 cores; the profile, grids_profile.json, is
reused when present). Writes benchmarks/results/grids.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from mixq import data
from mixq.allocate import allocate
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.config import DEFAULT_SOLVER, QuantizeConfig, default_specs
from mixq.eval.perplexity import perplexity
from mixq.formats import QuantSpec
from mixq.pipeline import estimator_of
from mixq.plan import Budget, Candidate
from mixq.profile import Profile, profile_model

from common import HERE, provenance, smollm2

UNLIKE, UNLIKE_WINDOWS = HERE / "data" / "botchan.txt", 32
NF = [QuantSpec.of(b, g, "nf", sb) for b in (2, 3, 4) for g, sb in ((32, 6), (64, 6), (192, 16))]
UNIFORM = [s for s in default_specs() if s.grid_type.uniform]  # the default menu before NF joined it
VARIANTS = {"uniform (menu before)": lambda s: s.grid_type.uniform, "default (+ nf3, nf4)": lambda s: s in DEFAULT,
            "uniform + every nf": lambda s: True, "nf only": lambda s: not s.grid_type.uniform}
DEFAULT = set(default_specs())


def only(profile: Profile, keep) -> Profile:
    """The profile with only the candidates `keep` takes."""
    layers = []
    for lp in profile.layers:
        idx = [i for i, c in enumerate(lp.candidates) if keep(c.spec)]
        layers.append(dataclasses.replace(lp, candidates=[lp.candidates[i] for i in idx],
                                          bits=[lp.bits[i] for i in idx], damage=[lp.damage[i] for i in idx]))
    return dataclasses.replace(profile, layers=layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS, help="pydoc windows (protocol: 64)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS)[:2], choices=list(VARIANTS))
    ap.add_argument("--out", default=str(HERE / "results" / "grids"))
    args = ap.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    model, tok, calib, pydoc = smollm2(args.windows)
    evals = {"pydoc": pydoc, "unlike": data.evaluation_windows(tok, str(UNLIKE), UNLIKE_WINDOWS)}
    rows = [{"variant": "float (reference)", "budget": None, "bpw": 32.0,
             **{k: perplexity(model, v) for k, v in evals.items()}}]
    print(rows[-1], flush=True)
    saved = out.with_name(out.name + "_profile.json")
    if saved.exists():
        profile, profile_seconds = Profile.from_json(saved.read_text()), None
    else:
        t = time.perf_counter()
        estimator = estimator_of(model, QuantizeConfig(budget=Budget(bits=3.0)))
        profile = profile_model(model, calib, [Candidate(s, DEFAULT_SOLVER) for s in UNIFORM + NF], estimator)
        profile_seconds = time.perf_counter() - t
        saved.write_text(profile.to_json())
    for budget in args.budgets:
        for name in args.variants:
            plan = allocate(only(profile, VARIANTS[name]), Budget(bits=budget)).plan
            m = copy.deepcopy(model)
            t = time.perf_counter()
            pack_model(m, apply_plan(m, calib, plan))
            seconds = time.perf_counter() - t
            bits, weights = block_linear_bits(m)
            nf = sum(c.spec.grid == "nf" for c in plan.layers.values())
            rows.append({"variant": name, "budget": budget, "bpw": bits / weights, "nf_layers": nf,
                         "layers": len(plan.layers), "seconds": seconds,
                         **{k: perplexity(m, v) for k, v in evals.items()}})
            print(rows[-1], flush=True)
            del m
    write(rows, out, args.windows, profile.estimator, profile_seconds)


def write(rows, out: Path, windows: int, estimator: str, profile_seconds: float | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    ref = rows[0]
    lines = ["# Normal-float grids as candidates: SmolLM2-135M", "",
             f"Perplexity on the pydoc evaluation split ({windows} windows × 512 tokens) and on an unlike text "
             f"(botchan.txt, {UNLIKE_WINDOWS} windows); calibration 32 × 512 tokens of the pydoc calibration split. "
             f"One profile ({estimator}, gptq-act+comq; "
             + (f"{profile_seconds:.0f} s" if profile_seconds else "reused from grids_profile.json")
             + ") over the uniform menu and NF at 2–4 bits; each variant allocates among its own candidates. "
             + provenance(), "",
             "| budget | candidates | real bpw | NF layers | pydoc ppl | × ref | unlike ppl | × ref | apply s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = "" if r["budget"] is None else f"{r['budget']:g}"
        nf = f"{r['nf_layers']} / {r['layers']}" if "layers" in r else ""
        lines.append(f"| {b} | {r['variant']} | {r['bpw']:.3f} | {nf} | {r['pydoc']:.3f} | "
                     f"{r['pydoc'] / ref['pydoc']:.3f} | {r['unlike']:.3f} | {r['unlike'] / ref['unlike']:.3f} | "
                     f"{r.get('seconds', 0):.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, text in zip(axes, ("pydoc", "unlike")):
        for name in VARIANTS:
            pts = sorted((r["bpw"], r[text]) for r in rows[1:] if r["variant"] == name)
            if pts:
                ax.plot(*zip(*pts), "o-", label=name)
        ax.axhline(ref[text], color="gray", ls="--", label="float reference")
        ax.set_title(f"{text} text")
        ax.set_xlabel("real block-linear bits per weight")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
