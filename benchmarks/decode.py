"""Decode and prompt speed of saved mixq models against their float source, in one process (`eval/speed.py`, as
`mixq bench` measures), plus the predicted and measured time per token that a `--latency` run recorded.

`python benchmarks/decode.py out/smollm2-3.0 out/lat08` writes benchmarks/results/decode.{md,json};
`python benchmarks/decode.py out/fp16-tables out/smollm2-3.0 --out benchmarks/results/decode_tables` what the
quantized table buys (a run with --float-tables beside the default one).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixq import data
from mixq.eval.speed import speed
from mixq.io import MARKER, file_bits, load
from mixq.models import load_model

from common import HERE, provenance


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="mixq output folders (same float source)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(HERE / "results" / "decode"))
    args = ap.parse_args()
    metas = {f: json.loads((f / MARKER).read_text()) for f in args.folders}
    float_model, tok, _ = load_model(next(iter(metas.values()))["source"])
    ids = data.evaluation_windows(tok, count=1)[:, :args.prompt_tokens]
    base = speed(float_model, ids, args.new_tokens)
    rows = [{"model": "float (fp32)", "prompt_tps": base.prompt_tps, "decode_tps": base.decode_tps,
             "resident_mb": base.resident_mb}]
    for folder, meta in metas.items():
        s = speed(load(folder), ids, args.new_tokens)
        tables = ", ".join(meta.get("tables", {}).values()) or "fp16 tables"
        rows.append({"model": f"{folder.name} ({meta['budget']}, {meta['bpw']:.3f} bpw, {tables})",
                     "prompt_tps": s.prompt_tps, "decode_tps": s.decode_tps, "resident_mb": s.resident_mb,
                     "file_bpp": file_bits(meta), "latency": meta.get("latency")})
        print(rows[-1], flush=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "provenance": provenance()}, indent=1))
    lines = ["# Decode speed on this machine: SmolLM2-135M", "",
             f"{args.prompt_tokens}-token prompt from the pydoc evaluation split, then {args.new_tokens} tokens "
             "decoded "
             "greedily (batch 1, KV cache), every model in one process. " + provenance(), "",
             "| model | whole-file bits/param | prompt tok/s | decode tok/s | decode vs fp32 | resident MB | "
             "--latency: predicted / measured ms per token |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r.get("latency")
        bpp = f"{r['file_bpp']:.3f}" if r.get("file_bpp") else ("32 (fp32)" if r is rows[0] else "")
        lines.append(f"| {r['model']} | {bpp} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} | "
                     f"{r['decode_tps'] / base.decode_tps:.2f} × | {r['resident_mb']:.1f} | "
                     + (f"{lat['predicted_ms']:.1f} / {lat['measured_ms']:.1f} (float {lat['float_ms']:.1f}) |"
                        if lat else "|"))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
