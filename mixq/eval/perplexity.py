"""Perplexity over non-overlapping windows: exp of the mean next-token negative log-likelihood."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BATCH = 4


def perplexity(model, windows: torch.Tensor, progress=None) -> float:
    """`windows` is n × length token ids; each window is scored on its own (no context carried over)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(BATCH):
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            target = batch[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            count += target.numel()
            if progress:
                progress(len(batch))
    return math.exp(nll / count)
