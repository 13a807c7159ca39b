"""mixq's GGUF export against llama.cpp's own importance-matrix quantizations, every file run in llama.cpp.

For each budget, `mixq quantize --gguf-compatible` (GPTQ into Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0, and Q3_K / Q6_K on
rows of a multiple of 256, allocated by the fisher profile) is saved, loaded back, evaluated by mixq, exported with
`mixq export --to gguf`, and the GGUF is evaluated by llama.cpp on the very same token windows (the pydoc
protocol: 64 windows of 512 tokens, each scored on its own). llama.cpp's `llama-quantize` with an imatrix over the
same calibration split makes its own types from the source GGUF; they are evaluated the same way. Token
embeddings are F16 in every file.

Needs llama.cpp: the `llama_cpp` Python bindings (llama-cpp-python) and, for the peers, `llama-quantize` and
`llama-imatrix`. Without a wheel, build them from the llama-cpp-python sdist (see benchmarks/peers.py) with the
shared library, and point the bindings at it:
    LLAMA_CPP_LIB_PATH=build/llama.cpp/bin PYTHONPATH=llama_cpp_python-0.3.36 \\
        python benchmarks/gguf_export.py --llama-cpp build/llama.cpp/bin        (about 45 minutes on 2 cores)
Writes benchmarks/results/gguf_export.{md,json} (and gguf_profile.json, the profile, reused when present).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixq.eval.perplexity import perplexity
from mixq.export.gguf import export_gguf, gguf_specs
from mixq.io import load
from mixq.models.load import default_model_path
from mixq.plan import Candidate
from mixq.config import DEFAULT_SOLVER
from mixq.profile import Profile, profile_model

from common import HERE, packed_at, provenance, save_packed, smollm2
from peers import gguf_block_bits, imatrix_for

LLAMA_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ3_S", "IQ4_XS", "Q4_0", "Q4_K_M")
PROMPT = "The capital of France is"


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int = 2) -> float:
    """Perplexity by the protocol, llama.cpp computing the logits: each window evaluated from an empty cache."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                          n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[:len(w) - 1], dtype=np.float32))
        nll += F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
        count += len(w) - 1
    return math.exp(nll / count)


def llama_cpp_text(path: Path, prompt: str = PROMPT, tokens: int = 24) -> str:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    return llm.create_completion(prompt, max_tokens=tokens, temperature=0)["choices"][0]["text"]


def run_mixq(model, tok, calib, evals, profile: Profile, bpw: float, work: Path) -> dict:
    t = time.perf_counter()
    m, plan, real = packed_at(model, calib, profile, bpw)
    seconds = time.perf_counter() - t
    folder = work / f"mixq-{bpw:g}"
    save_packed(m, tok, plan, real, folder)
    saved = load(folder)
    own = perplexity(saved, evals)
    path = work / f"mixq-{bpw:g}.gguf"
    export_gguf(saved, default_model_path(), path)
    real, types = gguf_block_bits(path)
    return {"tool": "mixq", "method": f"mixq --gguf-compatible --bits {bpw:g}", "bpw": real, "types": types,
            "mixq_ppl": own, "ppl": llama_cpp_perplexity(path, evals), "seconds": seconds,
            "text": llama_cpp_text(path), "file_mb": path.stat().st_size / 1e6}


def run_llama_cpp(tools: Path, kind: str, imatrix: Path, evals, work: Path) -> dict:
    out = work / f"llama-{kind}.gguf"
    t = time.perf_counter()
    subprocess.run([str(tools / "llama-quantize"), "--allow-requantize", "--imatrix", str(imatrix),
                    "--token-embedding-type", "f16", str(default_model_path()), str(out), kind, "2"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - t
    real, types = gguf_block_bits(out)
    return {"tool": "llama.cpp", "method": f"llama.cpp {kind} (imatrix)", "bpw": real, "types": types,
            "ppl": llama_cpp_perplexity(out, evals), "seconds": seconds, "file_mb": out.stat().st_size / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, help="folder with llama-quantize and llama-imatrix (the peers)")
    ap.add_argument("--bits", type=float, nargs="+", default=[4.2344, 4.438, 4.634, 5.534])
    ap.add_argument("--profile", type=Path, default=HERE / "results" / "gguf_profile.json",
                    help="mixq's fisher profile over the ggml candidates: reused when present, else written")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "gguf_export"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok, calib, evals = smollm2(args.windows)
    rows = [{"tool": "float", "method": "reference (source GGUF dequantized, in mixq)", "bpw": 32.0,
             "ppl": perplexity(model, evals), "seconds": 0.0}]
    if args.profile.exists():
        profile = Profile.from_json(args.profile.read_text())
    else:
        t = time.perf_counter()
        profile = profile_model(model, calib, [Candidate(s, DEFAULT_SOLVER) for s in gguf_specs()], "fisher")
        print(f"profile {time.perf_counter() - t:.0f} s", flush=True)
        args.profile.write_text(profile.to_json())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for bpw in args.bits:
            rows.append(run_mixq(model, tok, calib, evals, profile, bpw, work))
            print(rows[-1], flush=True)
        if args.llama_cpp:
            imatrix, _ = imatrix_for(args.llama_cpp, tok, work)
            for kind in LLAMA_TYPES:
                rows.append(run_llama_cpp(args.llama_cpp, kind, imatrix, evals, work))
                print(rows[-1], flush=True)
    write(rows, args)


def write(rows, args):
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"provenance": provenance(), "rows": rows}, indent=1))
    ours = [r for r in rows if r["tool"] == "mixq"]
    lines = ["# mixq's GGUF export against llama.cpp's imatrix quantizations, all run in llama.cpp", "",
             f"SmolLM2-135M; perplexity computed by llama.cpp (llama-cpp-python, 2 threads) on the pydoc protocol's "
             f"windows ({args.windows} × 512 tokens, each scored on its own). Real bpw: stored bits of the block "
             f"linears in the file. {provenance()}", "",
             "| file | real bpw | ggml types (share of block weights) | llama.cpp ppl | mixq's own ppl | best mixq "
             "at ≤ that bpw |", "|---|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{k} {v:.0%}" for k, v in r.get("types", {}).items())
        own = f"{r['mixq_ppl']:.3f} ({(r['ppl'] / r['mixq_ppl'] - 1) * 100:+.2f} %)" if "mixq_ppl" in r else ""
        better = [m for m in ours if m["bpw"] <= r["bpw"] + 1e-9]
        best = min(better, key=lambda m: m["ppl"]) if better and r["tool"] == "llama.cpp" else None
        cell = f"**{best['ppl']:.3f}** ({best['bpw']:.3f})" if best else ""
        lines.append(f"| {r['method']} | {r['bpw']:.3f} | {types} | {r['ppl']:.3f} | {own} | {cell} |")
    lines += ["", "Greedy continuation of " + repr(PROMPT) + " by llama.cpp:", ""]
    lines += [f"- {r['method']}: {r['text']!r}" for r in ours]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
