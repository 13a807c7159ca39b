"""The whole file: what quantizing SmolLM2-135M's tables buys. Its tied 49152 × 576 embedding table (also the head)
is 57 MB in fp16, more than half of a 3-bit model's file. At `--bits B` (the block linears' average), each row is
an exact allocation, applied by the real pipeline (table first, then the blocks calibrated on it), saved (the size
is that of the model.safetensors written; bits per parameter divide it by every parameter of the model, the table
once) and evaluated by the protocol on pydoc and on the unlike text:
- `--float-tables`: the table fp16, outside the budget (the default before);
- "table held at ≤ T bits": the blocks allocated at B alone and the table given its least-damage format within T
  bits a weight, each on its own budget;
- `--bits B --table-bits T` (the default, T = 6.5): the stored bits of blocks at B and table at T, spent over both
  by one exact allocation;
- `--size S`: a whole-file size, spent over both.

The profile is a default run's (`mixq quantize --bits 3.0`, the table included: its profile.json, copied to
benchmarks/results/embeddings_profile.json); without it, this profiles first (about 6 minutes).

`python benchmarks/embeddings.py [--bits 3.0] [--held 4.5 6.5 8.5] [--table-bits 6.5] [--sizes 60]` writes
benchmarks/results/embeddings.{md,json}; `--only LABEL ...` runs those rows alone and keeps the others saved.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from mixq import data
from mixq.allocate import allocate
from mixq.apply import apply_plan, block_linear_bits, pack_model, parameter_count
from mixq.config import QuantizeConfig
from mixq.eval.perplexity import perplexity
from mixq.io import save_quantized
from mixq.pipeline import estimator_of
from mixq.plan import Budget
from mixq.profile import Profile, fixed_bytes, profile_model

from common import HERE, provenance, smollm2

UNLIKE, UNLIKE_WINDOWS = HERE / "data" / "botchan.txt", 32


def blocks_only(model, profile: Profile) -> Profile:
    """The profile without its tables (they stay fp16, outside the budget)."""
    names = [lp.name for lp in profile.layers if lp.name not in profile.tables]
    return dataclasses.replace(profile, layers=[lp for lp in profile.layers if lp.name not in profile.tables],
                               tables=(), fixed_bytes=fixed_bytes(model, names))


def held_apart(model, profile: Profile, bits: float, table_bits: float):
    """The plan with the blocks allocated at `bits` alone and each table given its least-damage format within
    `table_bits` a weight."""
    plan = allocate(blocks_only(model, profile), Budget(bits=bits)).plan
    for lp in profile.layers:
        if lp.name in profile.tables:
            fits = [k for k, b in enumerate(lp.bits) if b <= table_bits * lp.rows * lp.cols]
            plan.layers[lp.name] = lp.candidates[min(fits, key=lambda k: lp.damage[k])]
    return plan


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=3.0, help="block-linear bpw of the --bits rows")
    ap.add_argument("--held", type=float, nargs="*", default=[4.5, 6.5, 8.5], help="table bits held apart")
    ap.add_argument("--table-bits", type=float, nargs="*", default=[6.5], help="--table-bits of joint rows")
    ap.add_argument("--sizes", type=float, nargs="*", default=[60], help="whole-file budgets in MB")
    ap.add_argument("--only", nargs="+", help="run only the rows of these labels, keep the others saved")
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS, help="pydoc windows (protocol: 64)")
    ap.add_argument("--profile", type=Path, default=HERE / "results" / "embeddings_profile.json")
    ap.add_argument("--out", default=str(HERE / "results" / "embeddings"))
    args = ap.parse_args()
    model, tok, calib, pydoc = smollm2(args.windows)
    evals = {"pydoc": pydoc, "unlike": data.evaluation_windows(tok, str(UNLIKE), UNLIKE_WINDOWS)}
    if args.profile.exists():
        profile = Profile.from_json(args.profile.read_text())
    else:
        from mixq.config import default_candidates

        estimator = estimator_of(model, QuantizeConfig(budget=Budget(bits=args.bits)))
        profile = profile_model(model, calib, default_candidates(), estimator, tables=True)
        args.profile.write_text(profile.to_json())
    params = sum(p.numel() for p in model.parameters())
    b = f"--bits {args.bits:g}"
    plans = {f"{b} --float-tables": lambda: allocate(blocks_only(model, profile), Budget(bits=args.bits)).plan}
    plans |= {f"{b}, table held at ≤ {t:g} bits": (lambda t=t: held_apart(model, profile, args.bits, t))
              for t in args.held}
    plans |= {f"{b} --table-bits {t:g}": (lambda t=t: allocate(profile, Budget(bits=args.bits, table_bits=t)).plan)
              for t in args.table_bits}
    plans |= {f"--size {s:g}MB": (lambda s=s: allocate(profile, Budget(bytes=int(s * 1e6))).plan)
              for s in args.sizes}
    saved = Path(args.out).with_suffix(".json")
    rows = {r["budget"]: r for r in json.loads(saved.read_text())["rows"]} if args.only and saved.exists() else {}
    if "float (reference)" not in rows:
        rows["float (reference)"] = {"budget": "float (reference)", **{k: perplexity(model, v)
                                                                      for k, v in evals.items()}}
    for label, make in plans.items():
        if args.only and label not in args.only:
            continue
        plan = make()
        m = copy.deepcopy(model)
        pack_model(m, apply_plan(m, calib, plan))
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(m, tok, plan, Path(tmp) / "q", {"source": "benchmark"}, {})
            file_bytes = (Path(tmp) / "q" / "model.safetensors").stat().st_size
        assert parameter_count(m) == params
        bits, weights = block_linear_bits(m)
        table = plan.layers.get(profile.tables[0]) if profile.tables else None
        rows[label] = {"budget": label, "table": table.spec.name if table else "fp16", "file_mb": file_bytes / 1e6,
                       "file_bpp": file_bytes * 8 / params, "block_bpw": bits / weights, "provenance": provenance(),
                       **{k: perplexity(m, v) for k, v in evals.items()}}
        print(rows[label], flush=True)
    order = ["float (reference)", *plans]
    rows = sorted(rows.values(), key=lambda r: order.index(r["budget"]) if r["budget"] in order else len(order))
    saved.write_text(json.dumps({"rows": rows, "parameters": params}, indent=1))
    write(rows, args)


def write(rows, args) -> None:
    ref = rows[0]
    lines = ["# The whole file: SmolLM2-135M's tied embedding table and head", "",
             f"Perplexity on the pydoc evaluation split ({args.windows} windows × 512 tokens, float "
             f"{ref['pydoc']:.3f}) and on botchan.txt (a novel, {UNLIKE_WINDOWS} windows, float {ref['unlike']:.2f}). "
             "File: the model.safetensors written; bits per parameter: its bits over every parameter (the table "
             f"once). Profile `{args.profile.name}` (a default run's). The script's docstring says what each row "
             "is.", "",
             "| budget | table | file MB | whole-file bits/param | block-linear bpw | pydoc ppl | botchan ppl | run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        lines.append(f"| `{r['budget']}` | {r['table']} | {r['file_mb']:.2f} | {r['file_bpp']:.3f} | "
                     f"{r['block_bpw']:.3f} | {r['pydoc']:.3f} ({r['pydoc'] / ref['pydoc']:.3f} ×) | "
                     f"{r['unlike']:.2f} ({r['unlike'] / ref['unlike']:.3f} ×) | {r['provenance']} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
