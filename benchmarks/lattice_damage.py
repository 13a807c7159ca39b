"""The lattice codebooks (iq) against the scalar grids on real weights: the profile's damage of each format over the
first blocks of SmolLM2-135M, as they are and turned by mixq's `rotate` (random orthogonal turns of the residual
stream and the MLP, QuIP#'s incoherence), one profile each.

Each format is filled as the default run fills it (gptq-act+comq; iq by its own LDLQ); the damage is the default
estimator's (oac: the output error it predicts for the model's loss), summed over every linear of the blocks, so
that formats at about the same bpw compare directly. 8 calibration windows, one thread.

    python benchmarks/lattice_damage.py --blocks 3        writes benchmarks/results/lattice_damage.{md,json}
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mixq import data
from mixq.config import DEFAULT_SOLVER, filled
from mixq.formats import QuantSpec
from mixq.models import load_model
from mixq.profile import profile_model
from mixq.sensitivity import DEFAULT_ESTIMATOR
from mixq.transforms import apply_transforms

from common import HERE, provenance

FORMATS = ("int2-g64-min", "bcq2-g64", "iq2-g64", "int2-g32-min-dq6", "iq2-g32-dq6", "int3-g64-min", "iq3-g64",
           "lk3-g32-dq6", "iq3-g32-dq6")


def damages(blocks: int, rotate: bool, names) -> tuple[dict[str, tuple[float, float]], float]:
    """{format: (bpw over the blocks' linears, summed damage)}, and the profile's seconds."""
    model, tok, _ = load_model(None)
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    calib = data.calibration_windows(tok)[:8]
    if rotate:
        apply_transforms(model, ["rotate"], calib)
    t = time.perf_counter()
    prof = profile_model(model, calib, [filled(QuantSpec.from_name(n), DEFAULT_SOLVER) for n in names],
                         DEFAULT_ESTIMATOR)
    seconds = time.perf_counter() - t
    out = {}
    for layer in prof.layers:
        for c, bits, damage in zip(layer.candidates, layer.bits, layer.damage):
            b, d, w = out.get(c.spec.name, (0, 0.0, 0))
            out[c.spec.name] = (b + bits, d + damage, w + layer.rows * layer.cols)
    return {n: (b / w, d) for n, (b, d, w) in out.items()}, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for rotate in (False, True):
        found, seconds = damages(args.blocks, rotate, args.formats)
        for name in args.formats:
            rows.append({"format": name, "rotate": rotate, "bpw": found[name][0], "damage": found[name][1],
                         "profile_seconds": seconds})
        print(rows[-len(args.formats):], flush=True)
    out = HERE / "results" / "lattice_damage"
    out.with_suffix(".json").write_text(json.dumps({"blocks": args.blocks, "rows": rows, "provenance": provenance()},
                                                   indent=1))
    by = {(r["format"], r["rotate"]): r for r in rows}
    lines = ["# Lattice codebooks against scalar grids on SmolLM2's weights, as they are and rotated", "",
             f"The profile's damage ({DEFAULT_ESTIMATOR}: the output error it predicts for the loss) of each format, "
             f"summed over the linears of the first {args.blocks} blocks of SmolLM2-135M, 8 calibration windows; each "
             "format filled as the default run fills it (gptq-act+comq; iq by LDLQ). Rotated: the model turned by "
             "mixq's `rotate` first (the same function, other weights). Lower is better; formats of about the same "
             "bpw compare directly, and the rotated model's damages with the model's as it is (both predict the "
             "same model's loss). " + provenance(), "",
             "| format | bpw | damage | damage, rotated | rotated / as it is |", "|---|---|---|---|---|"]
    for name in args.formats:
        a, b = by[(name, False)], by[(name, True)]
        lines.append(f"| {name} | {a['bpw']:.3f} | {a['damage']:.4g} | {b['damage']:.4g} | "
                     f"{b['damage'] / a['damage']:.2f} × |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
