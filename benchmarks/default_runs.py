"""What a user gets from one `mixq quantize --bits B` on SmolLM2-135M (no other flag, or the options given), judged
on both texts: the pydoc evaluation split (64 windows × 512 tokens, the protocol) and an unlike text
(benchmarks/data/botchan.txt, a novel: its first 32 windows), with the whole file's size and bits per parameter
beside the block linears' bpw, and the command's own seconds. Each (options, B) is a row of
benchmarks/results/default_runs.{md,json}; a rerun replaces its row.

    python benchmarks/default_runs.py --bits 3.0                          # the default command
    python benchmarks/default_runs.py --bits 2.5 3.0 -- --calib-generated 16   # options after -- go to mixq
    python benchmarks/default_runs.py --bits 3.0 2.0 2.5 --share-profile  # one profile: the first budget's

With --share-profile the budgets after the first are allocated from the first run's profile (`mixq allocate`,
then `mixq quantize --plan`): the same file as their own command writes (the profile does not depend on the
budget; tests/test_cli.py checks it), for the apply's time instead of a whole run's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "default_runs"
UNLIKE, UNLIKE_WINDOWS = HERE / "data" / "botchan.txt", 32
REFERENCE = {"pydoc": 12.631, "unlike": 34.890}  # the float model (grids.md, solvers.md)


def main():
    argv = sys.argv[1:]
    options = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--share-profile", action="store_true",
                    help="allocate the budgets after the first from the first run's profile")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if any(o.split("=")[0] in ("--out", "--bits", "--size", "--latency", "--eval-windows", "--plan")
           for o in options):
        raise SystemExit("default_runs.py sets --out, --bits, --plan and --eval-windows itself")
    with tempfile.TemporaryDirectory() as keep:
        profile = Path(keep) / "profile.json"
        for i, bits in enumerate(args.bits):
            if not args.share_profile:
                run(bits, options)
            elif i == 0:
                run(bits, options, keep=profile)
            else:
                run(bits, options, profile=profile, first=args.bits[0])


def run(bits: float, options: list[str], profile: Path | None = None, first: float | None = None,
        keep: Path | None = None) -> None:
    """One row: `mixq quantize --bits B` and its evaluation; with `profile`, the budget allocated from it (the run
    at `first`'s) and applied with --plan; `keep`: where to copy the run's profile."""
    from mixq.eval import evaluate

    work = Path(tempfile.mkdtemp())
    out = work / "q"
    budget = ["--bits", str(bits)]
    t = time.perf_counter()
    if profile is not None:
        plan = work / "plan.json"
        if subprocess.run([sys.executable, "-m", "mixq.cli", "allocate", str(profile), *budget, "--out",
                           str(plan)]).returncode:
            shutil.rmtree(work)
            raise SystemExit(f"mixq allocate failed at {bits:g}")
        budget = ["--plan", str(plan)]
    cmd = [sys.executable, "-m", "mixq.cli", "quantize", *budget, "--eval-windows", "0", "--out", str(out), *options]
    rc = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t
    if rc:  # mixq quantize said why; no row is written
        shutil.rmtree(work)
        raise SystemExit(rc)
    try:
        if keep is not None:
            shutil.copy(out / "profile.json", keep)
        meta = json.loads((out / "mixq.json").read_text())
        pydoc = evaluate(str(out))
        unlike = evaluate(str(out), str(UNLIKE), UNLIKE_WINDOWS)
    finally:
        shutil.rmtree(work)
    from common import COMMIT
    row = {"options": " ".join(options) or "(defaults)", "bits": bits, "commit": COMMIT, "bpw": meta["bpw"],
           "file_mb": meta["weight_bytes"] / 1e6, "file_bpp": meta["weight_bytes"] * 8 / meta["parameters"],
           "tables": meta.get("tables", {}), "pydoc": pydoc["ppl"], "unlike": unlike["ppl"],
           "work_seconds": meta["seconds"]["total"], "command_seconds": wall}
    if profile is not None:
        row["note"] = (f"allocated from the {first:g} run's profile (`mixq allocate`, then `--plan`: the file the "
                       "command writes): its seconds are the allocation and the apply, no profile")
    print(row, flush=True)
    saved = RESULTS.with_suffix(".json")
    rows = json.loads(saved.read_text())["rows"] if saved.exists() else []
    rows = [r for r in rows if (r["options"], r["bits"]) != (row["options"], bits)] + [row]
    rows.sort(key=lambda r: (r["bits"], r["options"] != "(defaults)", r["options"]))
    saved.write_text(json.dumps({"rows": rows, "reference": REFERENCE}, indent=1))
    write(rows)


def write(rows) -> None:
    import platform

    ref = REFERENCE
    lines = ["# One `mixq quantize --bits B` on SmolLM2-135M, judged on two texts", "",
             f"Pydoc: the evaluation split, 64 windows × 512 tokens (float {ref['pydoc']:.3f}); botchan: "
             f"benchmarks/data/botchan.txt, a novel unlike the calibration, its first {UNLIKE_WINDOWS} windows (float "
             f"{ref['unlike']:.2f}). File: the model.safetensors written (tables, norms and headers included); "
             "bits/param: its bits over every parameter, the tied table once. Seconds: the run's work (load to "
             f"save, evaluation off) and the whole command, on {platform.machine()} with 2 cores.", "",
             "| options | bits | block-linear bpw | file MB | whole-file bits/param | tables | pydoc ppl | botchan ppl "
             "| work s | command s | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tables = ", ".join(r["tables"].values()) or "fp16"
        lines.append(f"| `{r['options']}` | {r['bits']:g} | {r['bpw']:.3f} | {r['file_mb']:.2f} | {r['file_bpp']:.3f} "
                     f"| {tables} | {r['pydoc']:.3f} ({r['pydoc'] / ref['pydoc']:.3f} ×) | {r['unlike']:.2f} "
                     f"({r['unlike'] / ref['unlike']:.3f} ×) | {r['work_seconds']:.0f} | {r['command_seconds']:.0f} | "
                     f"{r['commit']} |")
    lines += [""] + [f"`{r['options']}` at {r['bits']:g}: {r['note']}  " for r in rows if r.get("note")]
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
