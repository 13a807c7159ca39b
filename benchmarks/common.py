"""What every benchmark script shares: the protocol's data on the bundled SmolLM2, the provenance line, and the
bpw-against-perplexity plot's frame."""
from __future__ import annotations

import copy
import os
import platform
import subprocess
from pathlib import Path

import torch

from mixq import data
from mixq.allocate import allocate
from mixq.io import save_quantized
from mixq.models import load_model
from mixq.models.load import default_model_path
from mixq.apply import apply_plan, block_linear_bits, pack_model
from mixq.plan import Budget

HERE = Path(__file__).parent
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=HERE).stdout.strip() or os.environ.get("MIXQ_COMMIT") or "unknown"  # (a copy outside git)


def smollm2(windows: int = data.EVAL_WINDOWS):
    """(float model, tokenizer, calibration windows, evaluation windows) by the protocol."""
    model, tok, _ = load_model(None)
    return model, tok, data.calibration_windows(tok), data.evaluation_windows(tok, count=windows)


def packed_at(model, calib, profile, bpw: float):
    """A packed copy of `model`, mixq's allocation of `profile` at `bpw` applied: (model, plan, real bpw)."""
    m = copy.deepcopy(model)
    plan = allocate(profile, Budget(bits=bpw)).plan
    pack_model(m, apply_plan(m, calib, plan))
    bits, weights = block_linear_bits(m)
    return m, plan, bits / weights


def save_packed(model, tok, plan, bpw: float, folder: Path) -> None:
    """A packed SmolLM2 as a mixq folder (the bundled GGUF as its source)."""
    save_quantized(model, tok, plan, folder, {"source": str(default_model_path()), "bpw": bpw}, {})


def provenance() -> str:
    return (f"Commit {COMMIT}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads.")


def finish_bpw_plot(fig, ax, reference: float, path: Path) -> None:
    ax.axhline(reference, color="gray", ls="--", label="float reference")
    ax.set_yscale("log")
    ax.set_xlabel("real block-linear bits per weight")
    ax.set_ylabel("pydoc perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
