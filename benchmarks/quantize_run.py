"""Wall time and peak memory of a whole `mixq quantize --bits 3.0` run on SmolLM2 (sampling where asked, capture,
profile of the candidates, allocate, apply, pack, save), evaluation off: the issue's limit is 15 minutes on this
2-core machine. Options after the script's go to `mixq quantize` as they are, and each set of options is a row of
benchmarks/results/quantize_run.md (and .json; a rerun replaces its row):

    python benchmarks/quantize_run.py                      # the default run
    python benchmarks/quantize_run.py --solver aespa+comq --sensitivity fisher --calib-windows 36 --calib-generated 24
"""
from __future__ import annotations

import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quantize_run"


def main():
    options = sys.argv[1:]
    if any(o.split("=")[0] in ("--out", "--bits", "--eval-windows") for o in options):
        raise SystemExit("quantize_run.py sets --out, --bits 3.0 and --eval-windows 0 itself")
    out = Path(tempfile.mkdtemp()) / "q3"
    cmd = [sys.executable, "-m", "mixq.cli", "quantize", "--bits", "3.0", "--eval-windows", "0", "--out", str(out),
           *options]
    t = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t
    if rc:  # mixq quantize said why; no row is written
        shutil.rmtree(out.parent)
        raise SystemExit(rc)
    meta = json.loads((out / "mixq.json").read_text())
    shutil.rmtree(out.parent)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    row = {"options": " ".join(options) or "(defaults)", "commit": commit, "seconds": meta["seconds"],
           "wall": wall, "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
           "bpw": meta["bpw"], "mb": meta["file_bytes"] / 1e6}
    path = RESULTS.with_suffix(".json")
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["options"] != row["options"]]
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1))
    stages = list(dict.fromkeys(k for r in rows for k in r["seconds"]))
    lines = ["# `mixq quantize --bits 3.0` on SmolLM2-135M: time and memory", "",
             f"{platform.machine()}, 2 cores; evaluation off (`--eval-windows 0`: the two evaluations of 64 windows "
             "add about 2.5 minutes). Seconds of each stage as the command reports them, then the whole command "
             "(model load and save included).", "",
             "| options | commit | " + " | ".join(stages) + " | whole command | peak MB | real bpw | folder MB |",
             "|---" * (len(stages) + 6) + "|"]
    for r in rows:
        lines.append(f"| `{r['options']}` | {r['commit']} | " +
                     " | ".join(f"{r['seconds'][k]:.0f}" if k in r["seconds"] else "" for k in stages) +
                     f" | {r['wall']:.0f} | {r['peak_mb']:.0f} | {r['bpw']:.4f} | {r['mb']:.1f} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
