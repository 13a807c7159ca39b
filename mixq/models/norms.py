"""How a family's norms normalise and how their scale folds into the linears that read them, by kind."""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("rms",)


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; known: {', '.join(KINDS)}")


def normalised(kind: str, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as `norm` sees it before its scale: x / rms(x) for an RMSNorm (its epsilon included)."""
    _check(kind)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def fold(kind: str, norm: nn.Module, readers: list[nn.Linear]) -> None:
    """An RMSNorm's scale γ into the input columns of its readers (in float64); γ becomes 1."""
    _check(kind)
    gamma = norm.weight.detach().double()
    with torch.no_grad():
        for lin in readers:
            lin.weight.copy_((lin.weight.double() * gamma).to(lin.weight.dtype))
        norm.weight.copy_(torch.ones_like(gamma).to(norm.weight.dtype))
