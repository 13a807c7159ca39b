"""`resq`: a low-rank high-precision subspace of the residual stream (after ResQ, Saxena et al. 2024), for
weight-only quantization.

The residual stream is turned, as `rotate` turns it, by an orthogonal Q, but one measured on the calibration:
Q = U · diag(I, R), U the eigenvectors of E[x̂ x̂ᵀ] (x̂ the stream as the norms read it, before their scale;
capture.residual_covariance) in order of decreasing eigenvalue, R a random rotation of the low-variance part.
After it, a linear that reads the stream sees its input's energy in its first columns, and the layer's input
Hessian is nearly diagonal. The linears that read the stream then store those first `high` columns of every row
at 8 bits (QuantSpec.high: a split row) and the rest at the candidate's width (`split_candidates`); their error
moves into the rest by GPTQ's update (solvers.split). `high` is 1/8 of the width, rounded down to a multiple of 8
where the candidate's groups must divide the rest (576: 72 columns for whole-row groups, 64 for groups of 16, 32,
64 and the 256-weight super-blocks; groups of 96 and 192 leave no split of at most 1/8 and stay whole). The high
part's bits count in the layer's (8 bits a weight, plus a scale and zero a row).

Every other part is `rotate`'s (norms folded into their readers, each head's values turned, a tied head untied):
the model computes the same function and stays a plain Llama; split rows load back in mixq (QuantLinear) but no
GGUF or compressed-tensors type stores them.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..plan import Candidate
from . import Transform, register
from .rotate import SEED, random_rotation, rotate_stream

FRACTION = 8  # the high-precision subspace: 1/8 of the width


def subspace(width: int) -> int:
    """Columns of the high-precision subspace: width / FRACTION, rounded down to a multiple of 8."""
    return width // FRACTION // 8 * 8


def pca_rotation(covariance: torch.Tensor, high: int, gen: torch.Generator) -> torch.Tensor:
    """U · diag(I_high, R): the covariance's eigenvectors by decreasing eigenvalue, the rest turned by R."""
    _, vectors = torch.linalg.eigh(covariance.double())
    u = vectors.flip(1)
    rest = u.shape[0] - high
    return torch.cat([u[:, :high], u[:, high:] @ random_rotation(rest, gen)], 1)


@register
class ResQ(Transform):
    name = "resq"
    summary = ("rotate's turn, into the residual stream's principal components, whose first 1/8 the stream's "
               "readers keep at 8 bits (split rows)")
    splits_rows = True

    def apply(self, model: nn.Module, adapter, calib=None) -> None:
        """Turn `model` in place into the basis of its residual stream's principal components (module docstring)."""
        if calib is None:
            raise ValueError("resq measures the residual stream: it needs calibration windows")
        from ..capture import residual_covariance

        gen = torch.Generator().manual_seed(SEED)
        cov = residual_covariance(model, adapter, calib)
        rotate_stream(model, adapter, pca_rotation(cov, subspace(cov.shape[0]), gen), gen)

    def check(self, adapter) -> None:
        adapter.check_rotation(self.name)

    def layer_candidates(self, adapter, name: str, cols: int, candidates: list[Candidate]) -> list[Candidate]:
        """Split rows for the linears that read the turned stream."""
        return split_candidates(candidates, cols) if adapter.in_block(name) in readers(adapter) else candidates


def high_columns(cols: int, candidate: Candidate) -> int:
    """The split of a `cols`-wide row in `candidate`'s format: the most columns, at most cols / FRACTION and at
    least half that, a multiple of 8, whose rest the format's groups divide; 0 where none does."""
    for high in range(subspace(cols), cols // FRACTION // 2 - 1, -8):
        if high and replace(candidate.spec, high=high).fits(cols):
            return high
    return 0


def split_candidates(candidates: list[Candidate], cols: int) -> list[Candidate]:
    """The candidates of a linear that reads the turned stream: each one's rows split where its format allows."""
    out = []
    for c in candidates:
        high = 0 if c.spec.high else high_columns(cols, c)
        out.append(Candidate(replace(c.spec, high=high), c.solver) if high else c)
    return out


def readers(adapter) -> frozenset[str]:
    """The block linears (names inside a block) that read the residual stream through a norm."""
    return frozenset(n for _, names in adapter.reads for n in names)
