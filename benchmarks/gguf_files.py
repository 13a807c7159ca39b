"""Whole GGUF files for llama.cpp: mixq's `--compatible gguf` allocation (blocks and the embedding table, one exact
solve) against llama.cpp's own importance-matrix types, every file run in llama.cpp, on both texts.

llama.cpp's files: `llama-quantize --imatrix` (the imatrix from `llama-imatrix` over the pydoc calibration split
mixq calibrates on, 32 × 512 tokens) of the bundled SmolLM2 GGUF, each type with llama.cpp's own choice for the
token embeddings (tied: the head too). mixq's: one `mixq quantize --compatible gguf --size S` (the default solver
and estimator; its profile is reused for the other sizes through `mixq allocate --size` and `mixq quantize
--plan`), then `mixq export --to gguf`. Every file is judged by llama.cpp (llama-cpp-python) on the pydoc protocol's
windows (64 × 512 tokens, each from an empty cache) and on benchmarks/data/botchan.txt (a novel, its first 32
windows). Bits per parameter: the file's tensor bits over its parameters (the tied table once; the tokenizer and
other metadata left out, as they are the same in every file); block bpw: the block linears' alone.

Needs llama.cpp's tools and bindings, built from the llama-cpp-python sdist (no wheel here):
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON
    cmake --build build -j2 --target llama-quantize llama-imatrix llama        (about 25 minutes on 2 cores)
    LLAMA_CPP_LIB_PATH=build/bin PYTHONPATH=llama_cpp_python-0.3.36 \\
        python benchmarks/gguf_files.py --llama-cpp build/bin --sizes 70 80 90
Writes benchmarks/results/gguf_files.{md,json}; a rerun replaces the rows it makes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixq import data
from mixq.models import load_model
from mixq.models.load import default_model_path

from common import HERE, provenance
from gguf_export import llama_cpp_perplexity
from peers import gguf_block_bits, imatrix_for

LLAMA_TYPES = ("IQ2_M", "Q2_K", "IQ3_XXS", "Q3_K_S", "IQ3_S", "Q3_K_M", "IQ4_XS", "Q4_0", "Q4_K_M", "Q5_K_M")
UNLIKE, UNLIKE_WINDOWS = HERE / "data" / "botchan.txt", 32
RESULTS = HERE / "results" / "gguf_files"


def file_bits(path: Path) -> tuple[float, float]:
    """(bits per parameter of the file's tensors, their megabytes)."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    stored, params = sum(int(t.n_bytes) for t in tensors) * 8, sum(int(t.n_elements) for t in tensors)
    return stored / params, stored / 8e6


def table_type(path: Path) -> str:
    from gguf import GGUFReader

    return next((t.tensor_type.name for t in GGUFReader(path).tensors if t.name == "token_embd.weight"), "")


def judged(path: Path, evals: dict, method: str, seconds: float, threads: int = 2) -> dict:
    bpp, mb = file_bits(path)
    bpw, types = gguf_block_bits(path)
    row = {"method": method, "bpp": bpp, "tensor_mb": mb, "bpw": bpw, "types": types, "table": table_type(path),
           "seconds": seconds, **{name: llama_cpp_perplexity(path, w, threads) for name, w in evals.items()}}
    print(row, flush=True)
    return row


def mixq(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mixq.cli", *cmd], check=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="folder with llama-quantize and llama-imatrix")
    ap.add_argument("--types", nargs="*", default=list(LLAMA_TYPES), help="llama.cpp's types to make")
    ap.add_argument("--sizes", type=float, nargs="*", default=[], help="mixq's whole-file budgets, MB")
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (perplexity does not depend on them)")
    args = ap.parse_args()
    _, tok, _ = load_model(None)
    evals = {"pydoc": data.evaluation_windows(tok, count=args.windows),
             "unlike": data.evaluation_windows(tok, str(UNLIKE), UNLIKE_WINDOWS)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.types:
            imatrix, _ = imatrix_for(args.llama_cpp, tok, work)
        for kind in args.types:
            out = work / f"llama-{kind}.gguf"
            t = time.perf_counter()
            subprocess.run([str(args.llama_cpp / "llama-quantize"), "--allow-requantize", "--imatrix", str(imatrix),
                            str(default_model_path()), str(out), kind, str(args.threads)], check=True,
                           capture_output=True)
            rows.append(judged(out, evals, f"llama.cpp {kind} (imatrix)", time.perf_counter() - t, args.threads))
            out.unlink()
            write(rows)  # (each row kept as it comes)
        first = None
        for size in args.sizes:
            folder = work / f"mixq-{size:g}"
            if first is None:
                seconds = mixq(["quantize", "--compatible", "gguf", "--size", f"{size:g}MB", "--eval-windows",
                                      "0", "--out", str(folder)])
                first = folder
            else:
                plan = work / f"plan-{size:g}.json"
                seconds = mixq(["allocate", str(first / "profile.json"), "--size", f"{size:g}MB", "--out",
                                      str(plan)])
                seconds += mixq(["quantize", "--plan", str(plan), "--eval-windows", "0", "--out", str(folder)])
            path = work / f"mixq-{size:g}.gguf"
            mixq(["export", str(folder), str(path), "--to", "gguf"])
            rows.append(judged(path, evals, f"mixq --compatible gguf --size {size:g}MB", seconds, args.threads))
            write(rows)


def write(new: list[dict]) -> None:
    saved = RESULTS.with_suffix(".json")
    old = json.loads(saved.read_text())["rows"] if saved.exists() else []
    made = {r["method"] for r in new}
    for r in new:
        r["provenance"] = provenance()
    rows = sorted([r for r in old if r["method"] not in made] + new, key=lambda r: r["bpp"])
    saved.write_text(json.dumps({"rows": rows}, indent=1))
    ours = [r for r in rows if r["method"].startswith("mixq")]
    lines = ["# Whole GGUF files: mixq's allocation against llama.cpp's imatrix types, all run in llama.cpp", "",
             "SmolLM2-135M. Perplexity by llama.cpp (llama-cpp-python, 2 threads) on the pydoc protocol's windows "
             f"(64 × 512 tokens; float 12.631) and on botchan.txt (a novel, {UNLIKE_WINDOWS} windows; float 34.89). "
             "Bits/param: the file's tensor bits over its parameters, the tied table once (tokenizer metadata, the "
             "same in every file, left out). Block bpw: the block linears alone. Best mixq: the best mixq file at "
             "no more bits/param, on each text. " + provenance(), "",
             "| file | bits/param | tensor MB | block bpw | table | block types (share of weights) | pydoc | botchan "
             "| best mixq at ≤ bits/param: pydoc / botchan |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v:.0%}" for k, v in r["types"].items())
        cell = ""
        if not r["method"].startswith("mixq"):
            fits = [m for m in ours if m["bpp"] <= r["bpp"] + 1e-9]
            if fits:
                p, u = min(m["pydoc"] for m in fits), min(m["unlike"] for m in fits)
                cell = " / ".join(f"**{a:.3f}**" if a < b else f"{a:.3f}" for a, b in ((p, r["pydoc"]),
                                                                                    (u, r["unlike"])))
            else:
                cell = "(below mixq's smallest)" if ours else "(no mixq file measured yet)"
        lines.append(f"| {r['method']} | {r['bpp']:.3f} | {r['tensor_mb']:.2f} | {r['bpw']:.3f} | {r['table']} | "
                     f"{types} | {r['pydoc']:.3f} | {r['unlike']:.2f} | {cell} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
