"""Memory and time of quantizing models larger than memory: random-weight models with Llama-3-8B's shapes (hidden
4096, MLP 14336, 32 query / 8 key-value heads, vocab 128256, untied head) and 2, 4, 8 or 32 blocks, written in
bf16 as sharded Hugging Face folders one block at a time (writing them is bounded too), each quantized by
`mixq quantize` in a process of its own with a cheap setting (`--solver rtn --sensitivity hessian
--calib-windows 4 --bits 3 --eval-windows 0`), streamed (`--stream`) and, where it fits, in memory. Peak RSS and
wall time come from /usr/bin/time -v. Mode `stream 2 processes` streams with `--workers 2`: each rank's peak RSS
is sampled too (the main rank streams the model; the other reads nothing from disk).

    python benchmarks/scale.py [--blocks 2,4,8,32] [--modes stream,memory,"stream 2 processes"] [--models DIR]
        → benchmarks/results/scale.{md,json,png}

With `--smollm2`, the bundled SmolLM2-135M is quantized with the default settings (`mixq quantize --bits 3.0`:
the oac estimator's backward passes, the 64-window evaluation before and after) in memory, streamed and in two
processes (`--workers 2`, torch.distributed with gloo): the same plan (plan.json's bytes) and perplexity, and the
time and memory of each (the peak RSS of the largest process, and of each rank).

    python benchmarks/scale.py --smollm2 --blocks ''

Rows of earlier runs are kept in scale.json (the newest run of each mode and block count is shown)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from common import provenance  # noqa: E402

OUT = HERE / "results" / "scale"
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2)
EQUAL = ["--bits", "3.0", "--sensitivity", "hessian", "--calib-windows", "4", "--eval-windows", "0"]
SETTING = ["--solver", "rtn", "--sensitivity", "hessian", "--calib-windows", "4", "--bits", "3",
           "--eval-windows", "0"]
H, M, V = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
KV = H // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]  # the key and value projections' rows
BLOCK_PARAMS = 2 * H * H + 2 * KV * H + 3 * H * M  # q, o; k, v; the MLP
FP32_BLOCK_GB = 4 * BLOCK_PARAMS / 1e9


def write_model(folder: Path, blocks: int) -> None:
    """A random-weight Llama-3-8B-shaped model of `blocks` blocks: one bf16 shard per block (and one for the
    tables), written one at a time, with its index, config and a byte-level tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from mixq.testing import make_byte_tokenizer

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    n = blocks + 1
    weight_map = {}

    def shard(k: int, tensors: dict) -> None:
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    def rand(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    h, m, kv = H, M, KV
    shard(0, {"model.embed_tokens.weight": rand(V, h), "lm_head.weight": rand(V, h),
              "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for i in range(blocks):
        p = f"model.layers.{i}."
        shard(i + 1, {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                      p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                      p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
                      p + "mlp.down_proj.weight": rand(h, m),
                      p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    LlamaConfig(num_hidden_layers=blocks, dtype="bfloat16", **SHAPE).save_pretrained(folder)
    make_byte_tokenizer(merge=True).save_pretrained(folder)


def run(folder: Path | None, mode: str, setting: list[str] = SETTING, scratch: Path | None = None,
        env: dict | None = None) -> dict:
    """One `mixq quantize` of the folder (None: the bundled default model) in its own process (`env`: added to its
    environment): peak RSS (GB), wall seconds, the stage times, the evaluation and the digests of plan.json and
    model.safetensors."""
    with tempfile.TemporaryDirectory(dir=scratch or folder.parent) as tmp:
        out = Path(tmp) / "q"
        if "rotate" in mode:  # the solver behind the transform: the model turned first (streamed: once, to scratch)
            setting = [f"rotate+{a}" if k and setting[k - 1] == "--solver" else a for k, a in enumerate(setting)]
        workers = re.search(r"(\d+) processes", mode)
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "mixq", "quantize",
               *(["--model", str(folder)] if folder else []), "--out", str(out), *setting,
               *(["--stream"] if mode.startswith("stream") else []),
               *(["--workers", workers.group(1)] if workers else [])]
        t0 = time.perf_counter()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}) as proc:
            ranks = _RankPeaks(proc.pid) if workers else None
            _, stderr = proc.communicate()
        res = subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)
        wall = time.perf_counter() - t0
        peaks = {"rank_peaks_gb": ranks.stop()} if ranks else {}
        if res.returncode:
            tail = " ".join(res.stderr.strip().splitlines()[-1:])[:200]
            return {"ok": False, "error": tail, "peak_gb": _peak_gb(res.stderr), "wall_s": wall}
        meta = json.loads((out / "mixq.json").read_text())
        loaded = _load_peak(out) if mode.startswith("stream") and folder else {}
        return {"ok": True, **loaded, **peaks, "peak_gb": _peak_gb(res.stderr), "wall_s": wall,
                "seconds": meta.get("seconds"),
                "bpw": meta.get("bpw"), "eval": meta.get("eval"),
                "plan_sha": hashlib.sha256((out / "plan.json").read_bytes()).hexdigest()[:12],
                "model_sha": _digest(out),
                "size_gb": sum(f.stat().st_size for f in out.iterdir()) / 1e9}


class _RankPeaks:
    """The peak RSS (GB) of each rank of a run of several processes (the launcher's children, told apart by their
    RANK), sampled every 0.2 s while it runs: /usr/bin/time gives only the largest process's."""

    def __init__(self, pid: int):
        import threading

        self.peaks: dict[str, float] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(pid,), daemon=True)
        self.thread.start()

    def _sample(self, pid: int) -> None:
        import psutil

        while not self.done.wait(0.2):
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                try:
                    rank, rss = child.environ().get("RANK"), child.memory_info().rss / 1e9
                except psutil.Error:
                    continue
                if rank is not None:
                    self.peaks[rank] = max(self.peaks.get(rank, 0.0), rss)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.thread.join()
        return dict(sorted(self.peaks.items()))


def _digest(out: Path) -> str:
    """sha256 of the saved model's tensors (every model*.safetensors, in name order)."""
    h = hashlib.sha256()
    for f in sorted(out.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _load_peak(out: Path) -> dict:
    """Peak RSS (GB) of `mixq.load` of a saved folder and one forward pass of 8 tokens, in a process of its own:
    bounded by the packed model (its folder's size), not by the float one."""
    code = f"import torch, mixq; m = mixq.load({str(out)!r}); m(torch.zeros(1, 8, dtype=torch.long))"
    res = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
    return {"load_peak_gb": _peak_gb(res.stderr)} if res.returncode == 0 else {}


def _peak_gb(stderr: str) -> float | None:
    """The peak RSS /usr/bin/time -v reports, in GB."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(rss.group(1)) / 1e6 if rss else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="2,4,8,32")
    ap.add_argument("--modes", default="stream,memory", help="stream, memory, stream rotate (--solver rotate+rtn) "
                    "or stream N processes (--workers N)")
    ap.add_argument("--models", default="/tmp/mixq-scale", help="where the random-weight models are written")
    ap.add_argument("--smollm2", action="store_true", help="the default run on SmolLM2, in memory and streamed")
    ap.add_argument("--smollm2-modes", default="memory,stream,2 processes,1 thread,2 processes 1 thread",
                    help="which SmolLM2 runs: memory, stream, N processes (--workers N); with '1 thread', at one "
                    "thread a process and the equal-threads setting")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").exists() else []
    if args.smollm2:
        for mode in args.smollm2_modes.split(","):
            equal = "1 thread" in mode  # the equal-threads comparison: one thread a process, a cheaper setting
            row = {"mode": mode, "blocks": 0, "model": "smollm2", "provenance": provenance(),
                   **run(None, mode, EQUAL if equal else ["--bits", "3.0"], Path(tempfile.gettempdir()),
                         {"OMP_NUM_THREADS": "1"} if equal else None)}
            print(json.dumps(row), flush=True)
            results = [r for r in results if (r["mode"], r.get("model")) != (mode, "smollm2")] + [row]
            write(results)
    for blocks in (int(b) for b in args.blocks.split(",") if b):
        folder = Path(args.models) / f"llama3-8b-shape-{blocks}"
        t0 = time.perf_counter()
        write_model(folder, blocks)
        print(f"{blocks} blocks written in {time.perf_counter() - t0:.0f} s", flush=True)
        for mode in args.modes.split(","):
            if mode == "memory" and 4e-9 * _params(blocks) > 8:  # fp32 over 8 GB: its run would not fit, not tried
                continue
            row = {"mode": mode, "blocks": blocks, "provenance": provenance(), **run(folder, mode)}
            print(json.dumps(row), flush=True)
            results = [r for r in results if (r["mode"], r["blocks"]) != (mode, blocks)] + [row]
            write(results)


def _params(blocks: int) -> int:
    return 2 * V * H + blocks * BLOCK_PARAMS  # the table and the head, untied


def write(results: list[dict]) -> None:
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=1))
    equal = {r["mode"]: r for r in results if r.get("model") == "smollm2" and "1 thread" in r["mode"]}
    small = [r for r in results if r.get("model") == "smollm2" and r["mode"] not in equal]
    rows = sorted((r for r in results if r.get("model") != "smollm2"), key=lambda r: (r["mode"], r["blocks"]))
    lines = ["# Quantizing models larger than memory", "",
             "Random-weight models with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32/8 heads, vocab 128256, untied "
             "head), bf16, one shard per block; `mixq quantize " + " ".join(SETTING) + "`, streamed (`--stream`) or "
             f"in memory, each in a process of its own (torch's default threads: 2 on this machine; the provenance "
             f"column is the benchmark's own). One block's fp32 weights: {FP32_BLOCK_GB:.2f} GB. Produced by "
             "`python benchmarks/scale.py`.",
             " Load: the peak RSS of `mixq.load` of the streamed run's output and a forward pass of 8 tokens, in a "
             "process of its own (the packed model, not the float one).",
             "", "| mode | blocks | float params (B) | peak RSS (GB) | wall (s) | s per block (profile + apply) | "
             "output (GB) | load peak (GB) | provenance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("seconds") or {}
        per = (s.get("profile", 0) + s.get("apply", 0)) / r["blocks"] if s else None
        cells = [r["mode"], str(r["blocks"]), f"{_params(r['blocks']) / 1e9:.2f}",
                 _peak(r), f"{r['wall_s']:.0f}", f"{per:.1f}" if per else "-",
                 f"{r['size_gb']:.2f}" if r.get("size_gb") else f"✗ {r.get('error', '')}",
                 (f"✗ {r['load_peak_gb']:.1f} (killed)" if r.get("load_failed") else
                  f"{r['load_peak_gb']:.2f}") if r.get("load_peak_gb") else "-",
                 r["provenance"] + (" (note)" if r.get("note") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [_growth(rows, mode) for mode in ("stream", "memory") if _growth(rows, mode)]
    lines += ["", "Until fb295d7 the streamed peak grew with the blocks: 6.16 GB at 2 blocks and 7.68 GB at 32 "
              "(+1.52 GB, 1.74 blocks' fp32 weights). glibc served the tensors under its mmap threshold (which "
              "rises to 32 MB as large blocks are freed) from its heap, and the holes freed blocks left stayed "
              "resident; a streamed run now returns them after each block (malloc_trim). The table read into place "
              "is converted a slice of rows at a time (its fp16 rounding had held four copies of Llama-3-8B's "
              "embedding at once)."]
    if any(r["mode"] == "stream rotate" for r in rows):
        lines += ["", "stream rotate: `--solver rotate+rtn --stream`: the model is turned once (in float64, a slice at "
                  "a time), each block and table read, turned and written as float32 to a scratch folder beside the "
                  "output, which the run reads from and removes. Its wall time includes the turning, its seconds per "
                  "block do not: " + _turning(rows) + "."]
    lines += _processes(rows)
    lines += [f"Note on the {r['mode']} row of {r['blocks']} blocks: {r['note']}." for r in rows if r.get("note")]
    big = [r for r in rows if r["mode"] == "stream" and r["blocks"] == 32 and r.get("ok")]
    if big:
        lines.append(f"The 32-block model (16 GB in bf16, 32 GB in fp32: more than this machine's 24 GB) quantizes "
                     f"streamed with a peak of {big[0]['peak_gb']:.2f} GB (the issue's bound: 8 GB).")
    else:
        lines.append("The 32-block model (16 GB in bf16, 32 GB in fp32) has no row yet.")
    if small:
        lines += ["", "## SmolLM2-135M, default settings", "",
                  "`mixq quantize --bits 3.0` (the oac estimator's backward passes: streamed, each block is recomputed "
                  "as the gradient reaches it), in memory and `--stream`; perplexity by the protocol (64 windows of "
                  "pydoc's evaluation split); two processes: `--workers 2`. `python benchmarks/scale.py --smollm2 "
                  "--blocks ''`.", "",
                  "| mode | plan.json sha256 | real bpw | ppl before | ppl after | profile (s) | apply (s) | "
                  "wall (s) | peak RSS (GB) | provenance |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(small, key=lambda r: r["mode"]):
            e, s = r.get("eval") or {}, r.get("seconds") or {}
            lines.append("| " + " | ".join([
                r["mode"], r.get("plan_sha", "-"), f"{r['bpw']:.3f}" if r.get("bpw") else "-",
                f"{e['ppl_before']:.3f}" if "ppl_before" in e else "-",
                f"{e['ppl_after']:.5f}" if "ppl_after" in e else f"✗ {r.get('error', '')}",
                f"{s.get('profile', 0):.0f}", f"{s.get('apply', 0):.0f}", f"{r['wall_s']:.0f}",
                _peak(r), r["provenance"]]) + " |")
        same = {r.get("plan_sha") for r in small}
        if len(small) > 1 and all(r.get("ok") for r in small):
            lines += ["", "Same plan in every mode: " + ("yes" if len(same) == 1 else "**no**") + ". On 2 cores, two "
                      "processes share them (one thread each) and are not faster; the figure that counts is on more "
                      "cores or GPUs. The main rank alone loads the model and runs the forward and backward passes "
                      "and the evaluations (on one thread, while the other rank waits); the other rank solves the "
                      "share of each block it is sent, and holds only that (its peak: rank 1's). Where the "
                      "perplexities differ in their last digits, the ranks computed with one thread each against the "
                      "single process's two. At equal threads: `tests/test_distributed.py` (bit-identical "
                      "models), and on SmolLM2 " + _equal_threads(equal) + ". At 6df8e19, when every rank "
                      "loaded the model and ran every block's forward passes, two processes took 723 s and each "
                      "rank peaked near 3.73 GB."]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows)


def _equal_threads(rows: dict) -> str:
    """The equal-threads comparison: one process against two, one thread each (`--smollm2-modes '1 thread,2
    processes 1 thread'`)."""
    one, two = rows.get("1 thread"), rows.get("2 processes 1 thread")
    if not (one and two and one.get("ok") and two.get("ok")):
        return "the equal-threads rows have not been run"
    same = one.get("model_sha") == two.get("model_sha") and one.get("model_sha") is not None
    return (f"one process against `--workers 2`, one thread each (`{' '.join(EQUAL)}`, OMP_NUM_THREADS=1): "
            f"model.safetensors {'the same' if same else '**not the same**'} (sha256 {one.get('model_sha')} and "
            f"{two.get('model_sha')}), {one['wall_s']:.0f} s against {two['wall_s']:.0f} s, a ratio of "
            f"{one['wall_s'] / two['wall_s']:.2f} ({two['provenance']}; at abc3c69, when every rank ran every block's "
            "forward passes: 379 s against 304 s)")


def _processes(rows: list[dict]) -> list[str]:
    """What the runs of several processes show: each rank's peak, and the plan against one process's."""
    out = []
    for r in (r for r in rows if "processes" in r["mode"] and r.get("rank_peaks_gb")):
        one = [o for o in rows if o["mode"] == "stream" and o["blocks"] == r["blocks"] and o.get("plan_sha")]
        peaks = r["rank_peaks_gb"]
        others = max(v for k, v in peaks.items() if k != "0")
        out += ["", f"{r['mode']} ({r['blocks']} blocks): `--stream --workers {len(peaks)}`, one thread a rank. The "
                "main rank streams the model and runs the forward passes; the others read nothing from disk and "
                "solve the profile calls and layers they are sent (the weights or row samples and the group's "
                f"statistics). Peak RSS: main rank {peaks['0']:.2f} GB, the others at most {others:.2f} GB (the "
                "down projection's 14336 × 14336 Hessian, 0.82 GB, and its solves). Plan against one process's: "
                + ("the same" if one and one[0]["plan_sha"] == r["plan_sha"] else "**not the same**" if one else
                   "no single-process row") + (f"; wall {r['wall_s']:.0f} s against its {one[0]['wall_s']:.0f} s "
                                               "(one process, two threads)" if one else "") + ". Until 6f8f674 a "
                "serving rank kept every Hessian it was sent (5.52 GB); until 68de78f it waited for the main rank to "
                "take each result before its next unit (284 s)."]
    return out


def _peak(row: dict) -> str:
    """The peak RSS cell: the largest process's, and each rank's where there were several."""
    if not row.get("peak_gb"):
        return "-"
    ranks = row.get("rank_peaks_gb")
    return f"{row['peak_gb']:.2f}" + (" (" + ", ".join(f"rank {k}: {v:.2f}" for k, v in ranks.items()) + ")"
                                      if ranks else "")


def _turning(rows: list[dict]) -> str:
    """The seconds of the run outside its profile and apply (the turning, for a transformed one), against the plain
    streamed run's of as many blocks."""
    def rest(r):
        s = r.get("seconds") or {}
        return s.get("total", 0) - s.get("profile", 0) - s.get("apply", 0) - s.get("allocate", 0)
    out = []
    for r in (r for r in rows if r["mode"] == "stream rotate" and r.get("ok")):
        plain = [p for p in rows if p["mode"] == "stream" and p["blocks"] == r["blocks"] and p.get("ok")]
        out.append(f"{r['blocks']} blocks, {rest(r):.0f} s outside the profile and apply" +
                   (f" against {rest(plain[0]):.0f} s unturned" if plain else ""))
    return "; ".join(out)


def _growth(rows: list[dict], mode: str) -> str:
    """How the peak RSS of `mode` grows from its fewest to its most blocks, against one block's fp32 weights."""
    pts = sorted((r["blocks"], r["peak_gb"]) for r in rows if r["mode"] == mode and r.get("ok"))
    if len(pts) < 2:
        return ""
    (b0, p0), (b1, p1) = pts[0], pts[-1]
    over = mode == "stream" and p1 - p0 > FP32_BLOCK_GB
    return (f"{mode}: from {b0} to {b1} blocks the peak RSS changes by {p1 - p0:+.2f} GB "
            f"({(p1 - p0) / FP32_BLOCK_GB:+.2f} blocks' fp32 weights)" +
            (": more than the one block a streamed run may grow by (open)." if over else ".") + "  ")


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({r["mode"] for r in rows}):
        pts = [(r["blocks"], r["peak_gb"]) for r in rows if r["mode"] == mode and r.get("ok")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xlabel("blocks (Llama-3-8B shapes)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
