"""The report: `report.md` plus PNGs (bits per layer, the Pareto curve) written into a saved model's folder."""
from __future__ import annotations

import json
from pathlib import Path

from ..allocate import pareto
from ..io import MARKER, SavedModelError, atomic_write_text, file_bits
from ..plan import Plan
from ..profile import Profile


SUMMARY_COLUMNS = ("model", "perplexity", "block-linear bpw", "whole-file bits/param", "weights MB")
ENCODER_COLUMNS = ("model", "cosine / similarity Spearman", "block-linear bpw", "whole-file bits/param",
                   "weights MB")


def summary(meta: dict) -> tuple[tuple[str, ...], list[list[str]], list[str]]:
    """A run's mixq.json as the columns and rows of the before/after table and the notes beside it: what
    `mixq quantize` prints and report.md opens with (a decoder's perplexity, an encoder's embedding fidelity)."""
    ev = meta.get("eval", {})
    size = f"{meta['weight_bytes'] / 1e6:.2f}" if "weight_bytes" in meta else ""
    whole = "" if (b := file_bits(meta)) is None else f"{b:.3f}"
    notes = []
    if "cosine" in ev:
        rows = [["float (before)", "1 / 1", "float", "", ""],
                ["mixq (after)", f"{ev['cosine']:.4f} / {ev['spearman']:.4f}", f"{meta['bpw']:.3f}", whole, size]]
        notes.append(f"Mean cosine to the float embeddings of {ev.get('sentences')} {ev.get('text')}; Spearman of "
                     f"{ev.get('pairs')} pair similarities.")
        columns = ENCODER_COLUMNS
    else:
        rows = [["float (before)", f"{ev['ppl_before']:.3f}", "float", "", ""]] if "ppl_before" in ev else []
        rows.append(["mixq (after)", f"{ev['ppl_after']:.3f}" if "ppl_after" in ev else "-", f"{meta['bpw']:.3f}",
                     whole, size])
        columns = SUMMARY_COLUMNS
        if ev:
            notes.append(f"Perplexity over {ev.get('windows')} windows of {ev.get('text')}.")
    if meta.get("latency"):
        lat = meta["latency"]
        notes.append(f"ms per token: predicted {lat['predicted_ms']:.2f}, measured {lat['measured_ms']:.2f} "
                     f"(float {lat['float_ms']:.2f}, {lat['threads']} threads)")
    if meta.get("tables"):
        notes.append("tables: " + ", ".join(f"`{n}` {spec}" for n, spec in meta["tables"].items()))
    if meta.get("seconds"):
        notes.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items()))
    return columns, rows, notes


def write_report(folder: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    if not (folder / MARKER).exists():
        raise SavedModelError(f"{folder} is not a mixq model folder (no {MARKER})")
    meta = json.loads((folder / MARKER).read_text())
    plan = Plan.from_json((folder / "plan.json").read_text())
    prof = Profile.from_json((folder / "profile.json").read_text()) if (folder / "profile.json").exists() else None
    layers = list(plan.layers)
    shapes = meta.get("shapes", {})
    bits = [plan.layers[n].spec.bits_per_weight(*shapes[n]) for n in layers]

    fig, ax = plt.subplots(figsize=(12, 4))
    kinds = sorted({n.rsplit(".", 1)[-1] for n in layers})
    for k in kinds:
        idx = [i for i, n in enumerate(layers) if n.endswith("." + k)]
        ax.scatter(idx, [bits[i] for i in idx], label=k, s=14)
    ax.set_xlabel("layer (block order)")
    ax.set_ylabel("stored bits per weight")
    ax.set_title("bits per layer")
    ax.legend(ncol=len(kinds), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "bits_per_layer.png", dpi=110)
    plt.close(fig)

    columns, rows, notes = summary(meta)
    lines = ["# mixq report", "", f"Model: `{meta.get('source')}`  ", f"Budget: {meta.get('budget')}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""] + [f"{n}  " for n in notes]
    lines += ["", "![bits per layer](bits_per_layer.png)", ""]
    if prof is not None:
        curve = pareto(prof)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "o-", ms=3, label="exact optimum (Pareto)")
        here = sum(lp.bits[lp.candidates.index(plan.layers[lp.name])] for lp in prof.layers
                   if lp.name not in prof.tables) / prof.weights
        ax.axvline(here, color="gray", ls="--", label="this model")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight of the block linears")
        ax.set_ylabel(f"estimated damage ({prof.estimator})")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=110)
        plt.close(fig)
        lines += ["## Pareto curve (size against estimated damage)", "", "![pareto](pareto.png)", "",
                  "| bpw | damage |", "|---|---|"] + [f"| {b:.3f} | {d:.4g} |" for b, d in curve]
    lines += ["", "## Bits per layer", "", "| layer | candidate | bpw |", "|---|---|---|"]
    lines += [f"| {n} | {plan.layers[n].name} | {b:.3f} |" for n, b in zip(layers, bits)]
    out = folder / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
