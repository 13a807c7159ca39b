"""LDLQ's time per layer (solvers.ldlq: the lattice formats' solver) with its scale codes searched over every code
and coarse to fine (grids.lattice.fit_code, CODE_STRIDE), in one process, and the output error each leaves.

SmolLM2-135M's first block: its real weights and the Hessians of their real inputs (8 calibration windows of the
pydoc split), q_proj (576 → 576) and down_proj (1536 → 576); the double-quantized lattice formats (6-bit scale
codes: where the coarse search applies; 4-bit codes, as IQ2_S's, are always searched whole) and a plain fp16-scale
one for scale. One solve of each (several seconds each; the ratio is the figure, the seconds indicate).

    python benchmarks/ldlq_time.py         writes benchmarks/results/ldlq_time.{md,json}
"""
from __future__ import annotations

import json
import time

import torch

from mixq import data
from mixq.formats import QuantSpec
from mixq.grids import lattice
from mixq.models import load_model
from mixq.solvers import output_error, solve

from common import HERE, provenance

FORMATS = ("iq2-g32-dq6", "iq3-g32-dq6", "iq2-g16-dq4", "iq2-g64")
LAYERS = ("self_attn.q_proj", "mlp.down_proj")


def problems(windows: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (weight, H = E[x xᵀ] of its inputs)} of SmolLM2's first block."""
    model, tok, _ = load_model(None)
    block = model.model.layers[0]
    sums = {}

    def hook(name):
        def record(_, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            h, n = sums.get(name, (0, 0))
            sums[name] = (h + x.T @ x, n + len(x))
        return record

    for name in LAYERS:
        block.get_submodule(name).register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for w in data.calibration_windows(tok)[:windows]:
            model(w.view(1, -1))
    return {n: (block.get_submodule(n).weight.detach().float(), (h / n_).float()) for n, (h, n_) in sums.items()}


def main():
    torch.manual_seed(0)
    rows = []
    for layer, (w, h) in problems().items():
        for name in FORMATS:
            spec = QuantSpec.from_name(name)
            row = {"layer": layer, "shape": list(w.shape), "format": name}
            for stride in (1, lattice.CODE_STRIDE):
                old, lattice.CODE_STRIDE = lattice.CODE_STRIDE, stride
                try:
                    t = time.perf_counter()
                    deq = solve("ldlq", w, h, spec).dequantize()
                    row[f"seconds_{stride}"] = time.perf_counter() - t
                    row[f"error_{stride}"] = float(output_error(w, deq, h).sum())
                finally:
                    lattice.CODE_STRIDE = old
            print(row, flush=True)
            rows.append(row)
    write(rows)


def write(rows):
    out = HERE / "results" / "ldlq_time"
    stride = lattice.CODE_STRIDE
    out.with_suffix(".json").write_text(json.dumps({"code_stride": stride, "rows": rows, "provenance": provenance()},
                                                   indent=1))
    lines = ["# LDLQ per layer: scale codes searched over every code and coarse to fine", "",
             f"SmolLM2-135M's first block, real weights and the Hessians of their inputs (8 calibration windows). "
             f"Every code: each group's scale code tried over all; coarse to fine: every {stride}th code, then the "
             "ones around the best (fit_code; 4-bit codes are always searched whole, so iq2-g16-dq4 and the "
             "fp16-scale iq2-g64 should not change). Output error: Σ diag(ΔW H ΔWᵀ). One solve each. "
             + provenance(), "",
             "| layer | format | every code s | coarse to fine s | speed-up | output error, coarse / every |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} {r['shape'][0]}×{r['shape'][1]} | {r['format']} | {r['seconds_1']:.1f} | "
                     f"{r[f'seconds_{stride}']:.1f} | {r['seconds_1'] / r[f'seconds_{stride}']:.2f} × | "
                     f"{r[f'error_{stride}'] / r['error_1']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
