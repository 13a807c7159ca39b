"""The whole file: what quantizing SmolLM2-135M's tables buys. Its tied 49152 × 576 embedding table (also the head)
is 57 MB in fp16, more than half of a 3-bit model's file. At `--bits B` (block linears) each row is the exact
allocation with the table fp16 (`--float-tables`, the default before), and with the table's own budget
(`--table-bits`, default 6.5); then whole-file size budgets (`--size`), where blocks and table share the bytes.
Each is applied by the real pipeline (table first, then the blocks calibrated on it), saved (the size is that of
the model.safetensors written; bits per parameter divide it by every parameter of the model, the table once) and
evaluated by the protocol on pydoc and on the unlike text.

The profile is a default run's (`mixq quantize --bits 3.0`, the table included: its profile.json, copied to
benchmarks/results/embeddings_profile.json); without it, this profiles first (about 6 minutes).

`python benchmarks/embeddings.py [--bits 3.0] [--table-bits 4.5 6.5 8.5] [--sizes 60]` writes
benchmarks/results/embeddings.{md,json}.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=3.0, help="block-linear bpw of the --bits rows")
    ap.add_argument("--table-bits", type=float, nargs="+", default=[4.5, 6.5, 8.5])
    ap.add_argument("--sizes", type=float, nargs="*", default=[60], help="whole-file budgets in MB")
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
    rows = [{"budget": "float (reference)", **{k: perplexity(model, v) for k, v in evals.items()}}]
    print(rows[-1], flush=True)
    budgets = [(f"--bits {args.bits:g} --float-tables", blocks_only(model, profile), Budget(bits=args.bits))]
    budgets += [(f"--bits {args.bits:g} --table-bits {t:g}", profile, Budget(bits=args.bits, table_bits=t))
                for t in args.table_bits]
    budgets += [(f"--size {s:g}MB", profile, Budget(bytes=int(s * 1e6))) for s in args.sizes]
    for label, prof, budget in budgets:
        plan = allocate(prof, budget).plan
        m = copy.deepcopy(model)
        pack_model(m, apply_plan(m, calib, plan))
        with tempfile.TemporaryDirectory() as tmp:
            save_quantized(m, tok, plan, Path(tmp) / "q", {"source": "benchmark"}, {})
            file_bytes = (Path(tmp) / "q" / "model.safetensors").stat().st_size
        assert parameter_count(m) == params
        bits, weights = block_linear_bits(m)
        table = plan.layers.get(profile.tables[0]) if profile.tables else None
        rows.append({"budget": label, "table": table.spec.name if table else "fp16", "file_mb": file_bytes / 1e6,
                     "file_bpp": file_bytes * 8 / params, "block_bpw": bits / weights,
                     **{k: perplexity(m, v) for k, v in evals.items()}})
        print(rows[-1], flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "parameters": params, "provenance": provenance()}, indent=1))
    write(rows, args)


def write(rows, args) -> None:
    ref = rows[0]
    lines = ["# The whole file: SmolLM2-135M's tied embedding table and head", "",
             f"Perplexity on the pydoc evaluation split ({args.windows} windows × 512 tokens, float "
             f"{ref['pydoc']:.3f}) "
             f"and on botchan.txt (a novel, {UNLIKE_WINDOWS} windows, float {ref['unlike']:.2f}). File: the "
             "model.safetensors written; bits per parameter: its bits over every parameter (the table once). "
             f"Profile `{args.profile.name}` (a default run's). " + provenance(), "",
             "| budget | table | file MB | whole-file bits/param | block-linear bpw | pydoc ppl | botchan ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        lines.append(f"| `{r['budget']}` | {r['table']} | {r['file_mb']:.2f} | {r['file_bpp']:.3f} | "
                     f"{r['block_bpw']:.3f} | {r['pydoc']:.3f} ({r['pydoc'] / ref['pydoc']:.3f} ×) | "
                     f"{r['unlike']:.2f} ({r['unlike'] / ref['unlike']:.3f} ×) |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
