"""How a family's norms normalise and how their scale folds into the linears that read them, by kind:
    rms     x / rms(x) · γ          (Llama, Qwen, Mistral, Phi-3)
    rms1p   x / rms(x) · (1 + γ)    (Gemma: the stored weight is the scale's offset from one)
    layer   (x − mean x) / std(x) · γ + β   (LayerNorm: GPT-2, GPT-NeoX, BERT)
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("rms", "rms1p", "layer")
CHUNK = 4096  # rows folded (or turned: transforms.rotate) at a time: float64 copies of a slice, not of a 128k-row
# table


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; known: {', '.join(KINDS)}")


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def normalised(kind: str, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as `norm` sees it before its scale (and shift), its epsilon included."""
    _check(kind)
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm))


def scale(kind: str, norm: nn.Module) -> torch.Tensor:
    """The scale γ the norm multiplies by (float64)."""
    _check(kind)
    w = norm.weight.detach().double()
    return 1 + w if kind == "rms1p" else w


def fold(kind: str, norm: nn.Module, readers: list[nn.Linear]) -> None:
    """The norm's scale γ (and a LayerNorm's shift β) into its readers, in float64: W → W diag(γ), b → b + W β; the
    norm then scales by one and shifts by zero (the model computes the same function)."""
    gamma = scale(kind, norm)
    shift = getattr(norm, "bias", None)
    with torch.no_grad():
        for lin in readers:
            if shift is not None and lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
            for a in range(0, lin.out_features, CHUNK):  # (float64 copies of a slice of rows: a head is 128k rows)
                w = lin.weight[a:a + CHUNK].double()
                if shift is not None:
                    lin.bias[a:a + CHUNK] = lin.bias[a:a + CHUNK].double() + w @ shift.detach().double()
                lin.weight[a:a + CHUNK] = w * gamma
        one = torch.zeros_like(gamma) if kind == "rms1p" else torch.ones_like(gamma)  # a scale of one, as stored
        norm.weight.copy_(one.to(norm.weight.dtype))
        if shift is not None:
            shift.zero_()
