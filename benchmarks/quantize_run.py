"""Wall time and peak memory of the whole `mixq quantize --bits 3.0` run on SmolLM2 (capture, fisher, profile of
the default candidates, allocate, apply, pack, save), evaluation off. Writes benchmarks/results/quantize_run.md.

    python benchmarks/quantize_run.py
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


def main():
    from mixq.profile import DEFAULT_FORMATS, DEFAULT_SOLVER, default_candidates

    formats = ", ".join(f"{'row' if g == 0 else f'g{g}'} {k}{f' dq{sb}' if sb != 16 else ''}"
                        for g, k, sb in DEFAULT_FORMATS)
    out = Path(tempfile.mkdtemp()) / "q3"
    cmd = [sys.executable, "-m", "mixq.cli", "quantize", "--bits", "3.0", "--eval-windows", "0", "--out", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    meta = json.loads((out / "mixq.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    lines = ["# `mixq quantize --bits 3.0` on SmolLM2-135M: time and memory", "",
             f"Commit {commit}, {platform.machine()}, 2 cores. Default calibration (32 × 512 pydoc tokens), "
             f"default candidates ({DEFAULT_SOLVER} × bits 2,3,4,5,6,8 × {formats} = {len(default_candidates())} "
             "per layer), "
             "fisher estimator.", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in meta["seconds"].items()]
    lines += [f"| whole command (model load and save included) | {wall:.0f} |", "",
              f"Peak resident memory: {peak_mb:.0f} MB. Real block-linear bpw: {meta['bpw']:.4f}. "
              f"Folder size: {meta['file_bytes'] / 1e6:.1f} MB."]
    (HERE / "results" / "quantize_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
