"""What every benchmark script shares: the protocol's data on the bundled SmolLM2, the provenance line, and the
bpw-against-perplexity plot's frame."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from mixq import data
from mixq.models import load_model

HERE = Path(__file__).parent
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=HERE).stdout.strip()


def smollm2(windows: int = data.EVAL_WINDOWS):
    """(float model, tokenizer, calibration windows, evaluation windows) by the protocol."""
    model, tok, _ = load_model(None)
    return model, tok, data.calibration_windows(tok), data.evaluation_windows(tok, count=windows)


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
