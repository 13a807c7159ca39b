"""Runtime of packed mixq models on this machine: prompt and decode tokens per second against the fp32 model, in
one process, and each model's peak memory, in a process of its own; plus a `--gguf-compatible` mixq plan exported
to GGUF and run by llama.cpp (2 threads).

SmolLM2-135M: mixq at 4.25 / 3.0 / 2.5 bpw (the default candidates, allocated from the committed fisher profile,
applied, saved and loaded back as a user would), and `--gguf-compatible` at 4.2344 bpw (Q4_0 with Q3_K on the
down projections) exported with `mixq export --to gguf`. Prompt: 512 tokens of the pydoc evaluation split; then
128 tokens decoded greedily (batch 1, KV cache). Peak memory: the high-water mark of resident memory (VmHWM) of a
fresh process that loads the model and runs that prompt and decode, and the same less the process's resident
memory before loading (the interpreter, torch and transformers: the same for every model).

    LLAMA_CPP_LIB_PATH=build/llama.cpp/bin PYTHONPATH=llama_cpp_python-0.3.36 python benchmarks/runtime.py
(without the llama.cpp bindings the GGUF row is left out). `--uniform F …`: a model of one format F on every block
linear (round-to-nearest, or the grid's own solver: binary coding's), its tables at the default table format, to
set one format's kernel against another's at the same bits (binary coding's look-up-table product against the
integer kernel). Writes benchmarks/results/runtime.{md,json}; a run replaces the rows it makes and keeps the others,
each with its decode speed against the fp32 model of its own run.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixq import data
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.chain import Chain
from mixq.config import filled, table_candidates
from mixq.eval.speed import speed
from mixq.formats import QuantSpec
from mixq.export.gguf import export_gguf
from mixq.io import load
from mixq.models import adapter_for, load_model
from mixq.models.load import default_model_path
from mixq.plan import Plan
from mixq.profile import Profile

from common import HERE, packed_at, provenance, save_packed

PROMPT, NEW = 512, 128


def quantized(model, tok, calib, profile: Profile, bpw: float, out: Path) -> float:
    m, plan, real = packed_at(model, calib, profile, bpw)
    save_packed(m, tok, plan, real, out)
    return real


def uniform(model, calib, name: str):
    """A packed copy of `model` with format `name` on every block linear and the default table format on the
    tables: (model, plan, real block bpw)."""
    adapter = adapter_for(model)
    table = table_candidates()[0]
    layers = {n: filled(QuantSpec.from_name(name), Chain("rtn")) for n in adapter.layer_names(model)}
    plan = Plan({**{n: table for n in adapter.tables(model)}, **layers})
    m = copy.deepcopy(model)
    pack_model(m, apply_plan(m, calib, plan))
    bits, weights = block_linear_bits(m)
    return m, plan, bits / weights


def llama_cpp_speed(path: Path, prompt: list[int], new: int, threads: int = 2) -> tuple[float, float]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + new + 8, n_batch=len(prompt), n_threads=threads,
                          verbose=False)
    vocab = llm.n_vocab()

    def step(tokens):
        llm.eval(tokens)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    step(prompt[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    token = step(prompt)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(new):
        token = step([token])
    return len(prompt) / prefill, new / (time.perf_counter() - t)


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(kind: str, target: str) -> None:
    """In a fresh process: load, run the prompt and the decode, print {"peak_mb", "base_mb"}."""
    base = _status("VmRSS")
    if kind == "llama.cpp":
        import llama_cpp  # noqa: F401  (its library counts in the baseline, as torch's does for the others)

        base = _status("VmRSS")
        ids = json.loads(Path(target + ".ids").read_text())
        llama_cpp_speed(Path(target), ids, NEW)
    else:
        model = load_model(None)[0] if kind == "fp32" else load(target)
        ids = torch.tensor([json.loads(Path(target.rstrip("/") + ".ids").read_text())])
        speed(model, ids, NEW)
    print(json.dumps({"peak_mb": _status("VmHWM"), "base_mb": base}))


def peak_memory(kind: str, target: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(target)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, nargs="*", default=[4.25, 3.0, 2.5],
                    help="mixq's allocations to run (none: --bits alone)")
    ap.add_argument("--profile", type=Path, default=HERE / "results" / "smollm2_bits_profile.json")
    ap.add_argument("--gguf-profile", type=Path, default=HERE / "results" / "gguf_profile.json")
    ap.add_argument("--gguf-bits", type=float, default=4.2344)
    ap.add_argument("--uniform", nargs="*", default=[], metavar="FORMAT",
                    help="also models of one format everywhere, e.g. bcq2-g64 int2-g64-min")
    ap.add_argument("--out", default=str(HERE / "results" / "runtime"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    torch.manual_seed(0)
    model, tok, _ = load_model(None)
    calib = data.calibration_windows(tok)
    ids = data.evaluation_windows(tok, count=1)[:, :PROMPT]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = {}
        for bpw in args.bits:
            folders[bpw] = work / f"mixq-{bpw:g}"
            real = quantized(model, tok, calib, Profile.from_json(args.profile.read_text()), bpw, folders[bpw])
            print(f"quantized {bpw} → {real:.3f} bpw", flush=True)
        uniforms = {}
        for name in args.uniform:
            uniforms[name] = work / f"uniform-{name}"
            m, plan, real = uniform(model, calib, name)
            save_packed(m, tok, plan, real, uniforms[name])
            print(f"quantized {name} → {real:.3f} bpw", flush=True)
        gguf = None
        try:
            import llama_cpp  # noqa: F401  (only: is it there?)

            g = work / "mixq-gguf"
            quantized(model, tok, calib, Profile.from_json(args.gguf_profile.read_text()), args.gguf_bits, g)
            gguf = work / "mixq.gguf"
            export_gguf(load(g), default_model_path(), gguf)
        except ImportError:
            print("no llama_cpp bindings: the GGUF row is left out", flush=True)
        targets = [("fp32", work / "fp32", "float (fp32)", 32.0)] + \
            [("mixq", f, f"mixq {bpw:g} bpw", json.loads((f / "mixq.json").read_text())["bpw"])
             for bpw, f in folders.items()] + \
            [("mixq", f, f"{name} on every block linear, tables {table_candidates()[0].spec.name}",
              json.loads((f / "mixq.json").read_text())["bpw"]) for name, f in uniforms.items()] + \
            ([("llama.cpp", gguf, f"mixq --gguf-compatible {args.gguf_bits:g} bpw, GGUF in llama.cpp",
               args.gguf_bits)] if gguf else [])
        for kind, target, _, _ in targets:
            Path(str(target).rstrip("/") + ".ids").write_text(json.dumps(ids[0].tolist()))
        for kind, target, label, bpw in targets:  # speeds in this one process
            if kind == "llama.cpp":
                p, d = llama_cpp_speed(target, ids[0].tolist(), NEW)
                resident = None
            else:
                s = speed(model if kind == "fp32" else load(target), ids, NEW)
                p, d, resident = s.prompt_tps, s.decode_tps, s.resident_mb
            rows.append({"model": label, "bpw": bpw, "prompt_tps": p, "decode_tps": d, "resident_mb": resident,
                         **peak_memory(kind, target)})
            print(rows[-1], flush=True)
    write(rows, args)


def write(new: list[dict], args):
    """The rows of this run (the first: its fp32 model), each with its decode speed and peak over baseline against
    that fp32 row, in place of the saved rows of the same name; the other saved rows kept with their own run's."""
    out = Path(args.out)
    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"rows": []}
    for rows, commit in ((saved["rows"], saved.get("provenance", "")), (new, provenance())):
        base = rows[0] if rows else None  # (a run's first row is its fp32 model)
        for r in rows:
            r.setdefault("vs_fp32", r["decode_tps"] / base["decode_tps"])
            r.setdefault("memory_vs_fp32", (r["peak_mb"] - r["base_mb"]) / (base["peak_mb"] - base["base_mb"]))
            r.setdefault("provenance", commit)
    made = {r["model"] for r in new}
    rows = new[:1] + [r for r in saved["rows"] if r["model"] not in made] + new[1:]
    out.with_suffix(".json").write_text(json.dumps({"provenance": provenance(), "rows": rows}, indent=1))
    lines = ["# Runtime on this machine: SmolLM2-135M", "",
             f"{PROMPT}-token prompt (pydoc evaluation split), then {NEW} tokens decoded greedily (batch 1, KV cache); "
             "speeds of one run's models measured in one process, 2 threads; peak memory (VmHWM) of a fresh process "
             "per model that loads it and runs the same prompt and decode, and that peak less the process's resident "
             "memory before loading. Ratios: against the fp32 model of the row's own run (its commit in the last "
             "column; absolute speeds of different runs are not comparable).", "",
             "| model | block bpw | prompt tok/s | decode tok/s | decode vs fp32 | peak MB | peak over baseline MB "
             "(vs fp32) | run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = r["peak_mb"] - r["base_mb"]
        lines.append(f"| {r['model']} | {r['bpw']:.3f} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} | "
                     f"{r['vs_fp32']:.2f} × | {r['peak_mb']:.0f} | {over:.0f} ({r['memory_vs_fp32']:.0%}) | "
                     f"{r['provenance'].split(',')[0].removeprefix('Commit ')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
