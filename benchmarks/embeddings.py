"""What `--include-embeddings` buys under a size budget: SmolLM2-135M, whose tied 49152 × 576 embedding table is
more than half of an fp16-embedding model's file. At each size the exact allocation with the table fp16 (the
default) and with the table as a candidate (4 / 6 / 8 bits), applied by the real pipeline, saved (the size is that
of the model.safetensors written) and evaluated by the protocol.

The block layers' profile is the saved one (`smollm2_bits_profile.json`, fisher); the table's is computed here by
`profile.profile_tables`, as `mixq quantize --include-embeddings` does.

`python benchmarks/embeddings.py [--sizes 60 75 90 100]` writes benchmarks/results/embeddings.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mixq import data
from mixq.allocate import BudgetError, allocate
from mixq.capture import FISHER_WINDOWS, block_inputs, output_fisher, run_block
from mixq.eval.perplexity import perplexity
from mixq.io import save_quantized
from mixq.models import adapter_for
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.profile import fixed_bytes, profile_tables
from mixq.plan import Budget
from mixq.profile import Profile

from common import HERE, provenance, smollm2


def table_profile(model, calib, blocks_profile: Profile) -> tuple[Profile, float]:
    """The saved block profile plus the table's rows, and the seconds the table's profile took."""
    t = time.perf_counter()
    adapter = adapter_for(model)
    x, calls = block_inputs(model, adapter, calib)
    for block, call in zip(adapter.block_list(model), calls):
        x = run_block(block, x, call)
    fisher = output_fisher(model, adapter, calib[:FISHER_WINDOWS], tables=True)
    layers = profile_tables(model, calib, x, blocks_profile.estimator, fisher, None)
    names = adapter.layer_names(model) + adapter.tables(model)
    return replace(blocks_profile, fixed_bytes=fixed_bytes(model, names),
                   layers=blocks_profile.layers + layers), time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[60, 75, 90, 100], help="budgets in MB")
    ap.add_argument("--profile", type=Path, default=HERE / "results" / "smollm2_bits_profile.json")
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS)
    ap.add_argument("--out", default=str(HERE / "results" / "embeddings"))
    args = ap.parse_args()
    model, tok, calib, evals = smollm2(args.windows)
    blocks = Profile.from_json(args.profile.read_text())
    with_tables, table_seconds = table_profile(model, calib, blocks)
    table = with_tables.layers[-1]
    print(f"table profile {table_seconds:.0f} s: " + ", ".join(
        f"{c.spec.name} {d:.4g}" for c, d in zip(table.candidates, table.damage)), flush=True)
    rows = [{"size_mb": None, "table": "fp16 (float model)", "ppl": perplexity(model, evals)}]
    for size in args.sizes:
        for label, profile in (("fp16", blocks), ("allocated", with_tables)):
            budget = Budget(bytes=int(size * 1e6))
            try:
                alloc = allocate(profile, budget)
            except BudgetError as e:
                rows.append({"size_mb": size, "table": label, "ppl": None, "note": str(e).split(";")[0]})
                print(rows[-1], flush=True)
                continue
            m = copy.deepcopy(model)
            pack_model(m, apply_plan(m, calib, alloc.plan))
            with tempfile.TemporaryDirectory() as tmp:
                save_quantized(m, tok, alloc.plan, Path(tmp) / "q", {"source": "benchmark"}, {})
                file_mb = (Path(tmp) / "q" / "model.safetensors").stat().st_size / 1e6
            bits, weights = block_linear_bits(m)
            spec = alloc.plan.layers.get(table.name)
            rows.append({"size_mb": size, "table": spec.spec.name if spec else label, "file_mb": file_mb,
                         "block_bpw": bits / weights, "ppl": perplexity(m, evals)})
            print(rows[-1], flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "table_profile_seconds": table_seconds, "provenance": provenance()}, indent=1))
    write(rows, args, table_seconds)


def write(rows, args, table_seconds: float) -> None:
    lines = ["# `--include-embeddings` under a size budget: SmolLM2-135M", "",
             f"Perplexity on the pydoc evaluation split, {args.windows} windows × 512 tokens (float reference "
             f"{rows[0]['ppl']:.3f}). Size: the model.safetensors written. Block profile `{args.profile.name}` "
             f"(fisher); the table's profile took {table_seconds:.0f} s. " + provenance(), "",
             "| budget MB | embedding table | file MB | block-linear bpw | ppl |", "|---|---|---|---|---|"]
    for r in rows[1:]:
        if r["ppl"] is None:
            lines.append(f"| {r['size_mb']:g} | {r['table']} | - | - | impossible: {r['note']} |")
        else:
            lines.append(f"| {r['size_mb']:g} | {r['table']} | {r['file_mb']:.2f} | {r['block_bpw']:.3f} | "
                         f"{r['ppl']:.2f} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
