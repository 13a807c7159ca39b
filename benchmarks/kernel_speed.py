"""The CPU kernel's matrix-vector product (batch 1, what decoding runs) per format, against the integer kernel at the
same bits in the same process: level grids (normal-float, IQ4_NL: a look-up of each code's level), binary coding
(BiQGEMM's look-up tables of the signed sums of every 8 inputs, at the integer format's bpw) and lattice codebooks
(iq: IQ2_S's and IQ3_S's points) against the uniform grids, on SmolLM2's shapes (576 → 1536, 1536 → 576) and a
Llama-3-8B one (4096 → 14336). Median of repeated calls after a warm-up; one thread and two. Random weights: the
time does not depend on their values.

`python benchmarks/kernel_speed.py` writes benchmarks/results/kernel_speed.{md,json} (not "kernels.py": a
script's folder comes first on sys.path, and transformers imports a package of that name).
"""
from __future__ import annotations

import json

import torch

from mixq.cost import median_seconds
from mixq.formats import QuantizedTensor, QuantSpec, quantize
from mixq.grids.lattice import RUN, codebook
from mixq.runtime.cpu import kernel
from mixq.runtime.qlinear import QuantLinear

from common import HERE, provenance

SHAPES = [(1536, 576), (576, 1536), (14336, 4096)]  # (out, in)
PAIRS = [("int3-g64-min-dq6", "nf3-g64-dq6"), ("int4-g64-min-dq6", "nf4-g64-dq6"), ("int4-g32-min", "iq4nl-g32"),
         ("int2-g64-min", "bcq2-g64"), ("int3-g64-min", "bcq3-g64"), ("int4-g32-min", "bcq4-g64"),
         ("int2-g64-min", "iq2-g64"), ("int3-g64-min", "iq3-g64")]
# (bcq against the integer format of the same bpw: 2.5 and 5.0; at 3 bits, of the same codes and groups, 3.5 against
# 3.75 bpw, as no group that tiles 576, 1536 and 4096 gives both the same bpw; iq at the same bpw, 2.5 and 3.5)


def layer(w: torch.Tensor, name: str) -> QuantLinear:
    """A packed layer of that format (binary coding and lattice codebooks: random codes and scales, as their fits of
    a 14336-row layer take minutes and the time does not depend on the values)."""
    spec = QuantSpec.from_name(name)
    grid = spec.grid_type
    if grid.solver is None:
        return QuantLinear.from_quantized(quantize(w, spec))
    rows, cols = w.shape
    groups = cols // spec.group(cols)
    if grid.name == "iq":  # random points of the codebook, random signs
        places = codebook(spec.bits)[1]
        runs = places[torch.randint(0, len(places), (rows, cols // RUN[spec.bits]))].reshape(rows, cols)
        codes = (runs * 2 + torch.randint(0, 2, (rows, cols))).to(torch.uint8)
    else:
        codes = torch.randint(0, 1 << spec.bits, (rows, cols), dtype=torch.uint8)
    scales = torch.rand(rows, groups * grid.scales_per_group(spec.bits)).half() * 0.01
    return QuantLinear.from_quantized(QuantizedTensor(codes, scales, torch.zeros(rows, groups, dtype=torch.uint8),
                                                      spec))


def main():
    if kernel() is None:
        raise SystemExit("the CPU kernel did not build: nothing to time")
    torch.manual_seed(0)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f) * 0.02
            x = torch.randn(1, in_f)
            repeats = 200 if out_f * in_f < 10**7 else 30
            for base, other in PAIRS:
                t = {}
                for name in (base, other):
                    t[name] = median_seconds(layer(w, name), x, repeats, warmup=3)
                rows.append({"threads": threads, "shape": [out_f, in_f], "integer": base, "levels": other,
                             "integer_us": t[base] * 1e6, "levels_us": t[other] * 1e6})
                print(rows[-1], flush=True)
    out = HERE / "results" / "kernel_speed"
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "provenance": provenance()}, indent=1))
    lines = ["# The CPU kernel's matrix-vector product: look-up formats against the integer grid at the same bits", "",
             "Batch 1 (decoding), random weights, median of repeated calls after a warm-up, both formats timed in one "
             "process. A level grid looks each code's level up in registers (two permutes and a blend for 16 levels) "
             "where the integer grid converts the code. Binary coding (bcq, at the integer format's bpw) forms the 256 "
             "signed sums of every 8 inputs once per call and gathers one per plane byte of 8 rows (BiQGEMM); bcq3-g64 "
             "stores 3.75 bpw against int3-g64-min's 3.5, the other pairs the same bpw. Lattice codebooks (iq, the "
             "same bpw) decode each run of 8 or 4 weights from its point index, high bits and signs (an 8-float "
             "load from the codebook, a sign XOR, a scale multiply) and multiply with FMAs. "
             + provenance(), "",
             "| threads | out × in | integer format | µs | look-up format | µs | look-up / integer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['shape'][0]} × {r['shape'][1]} | {r['integer']} | "
                     f"{r['integer_us']:.1f} | "
                     f"{r['levels']} | {r['levels_us']:.1f} | {r['levels_us'] / r['integer_us']:.2f} × |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
