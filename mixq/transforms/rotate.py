"""`rotate`: an orthogonal change of basis of the residual stream and of each attention head's values, folded into
the weights (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024), so that a few large channels no longer
dominate the groups they share and every weight row sees inputs of even scale.

A Llama block reads the residual stream x through an RMSNorm (x / rms(x) ⊙ γ) and writes back through its output
and down projections (the adapter's `reads` and `writes`). rms(xQ) = rms(x) for an orthogonal Q, so once each
norm's γ is folded into the columns of the linears that read it (adapter.fold_norm), the whole model computes the
same function on the rotated stream xQ with
  embedding E → E Q,   readers W → W Q,   writers W → Qᵀ W,   head W → W diag(γ_final) Q.
Inside attention, each head's values v_h and the output projection's columns that read them turn by one more
orthogonal R
(attention weights mix tokens, not channels). The down projection's input follows a SiLU gate and cannot be
rotated without an online transform; it is left as is, so that the saved model stays a plain Llama.

The rotation is a Hadamard matrix with random signs where one of the width is built here (2^a · 12^b: 576 = 12² · 4),
else a random orthogonal matrix; seeded, so a run is reproducible. A head tied to the embedding table is untied
(the head needs diag(γ_final) folded in and the table does not): the saved model then stores a second table,
which its file size counts.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.norms import CHUNK  # rows (or columns) turned at a time: float64 copies of a slice
from ..models.stream import change_units, untie_head
from . import Transform, register

SEED = 0


def hadamard(n: int) -> torch.Tensor | None:
    """An n × n matrix of ±1 with H Hᵀ = n I, built from 2 × 2 (Sylvester) and 12 × 12 (Paley) factors; None
    where n is not 2^a · 12^b."""
    h, left = torch.ones(1, 1, dtype=torch.float64), n
    while left > 1:
        if left % 12 == 0:
            h, left = torch.kron(h, _paley12()), left // 12
        elif left % 2 == 0:
            h, left = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)), left // 2
        else:
            return None
    return h


def _paley12() -> torch.Tensor:
    """Paley's construction for q = 11 (≡ 3 mod 4): H = I + [[0, 1ᵀ], [−1, J]], J the Jacobsthal matrix."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1, -1
    for i in range(q):
        for j in range(q):
            s[i + 1, j + 1] = chi[(j - i) % q]
    return s + torch.eye(q + 1, dtype=torch.float64)


def random_rotation(n: int, generator: torch.Generator) -> torch.Tensor:
    """An orthogonal n × n matrix (float64): a Hadamard matrix with random column signs, scaled by 1/√n, where
    one is built here; else the Q of a Gaussian matrix's QR (sign-corrected: Haar-distributed)."""
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return h * signs / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotate_inputs(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """W Q: the weight that reads the rotated input xQ and returns what W returned from x (in float64, a slice
    of rows at a time)."""
    out = torch.empty_like(weight)
    for a in range(0, weight.shape[0], CHUNK):
        out[a:a + CHUNK] = weight[a:a + CHUNK].double() @ q
    return out


def rotate_outputs(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Qᵀ W: the weight whose output is W's output rotated (y → yQ) (in float64, a slice of columns at a time)."""
    out = torch.empty_like(weight)
    for a in range(0, weight.shape[1], CHUNK):
        out[:, a:a + CHUNK] = q.T @ weight[:, a:a + CHUNK].double()
    return out


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


@register
class Rotate(Transform):
    name = "rotate"
    summary = ("a seeded randomised Hadamard rotation of the residual stream and of each head's values, folded into "
               "the weights; unties a tied head")

    def apply(self, model: nn.Module, adapter, calib=None) -> None:
        """Rotate `model` in place (see the module docstring); its outputs stay the same up to rounding."""
        gen = torch.Generator().manual_seed(SEED)
        width = model.get_submodule(adapter.embed).weight.shape[1]
        rotate_stream(model, adapter, random_rotation(width, gen), gen)

    def check(self, adapter) -> None:
        adapter.check_rotation(self.name)


def rotate_stream(model: nn.Module, adapter, q: torch.Tensor, gen: torch.Generator) -> None:
    """Turn the residual stream x → xQ (Q orthogonal, float64), norms folded first, and each head's values by a
    random rotation drawn from `gen`; in place, one unit (the table, the head, a block) at a time, so that a
    streamed model is turned as it is read (stream.change_units)."""
    untie_head(model)  # the head takes γ_final, the table does not
    final = model.get_submodule(adapter.norm)
    scale = copy.deepcopy(final)  # γ_final, for the head's turn
    adapter.fold_norm(final, [])  # (the final norm now scales by one)
    r = random_rotation(adapter.head_dim(model), gen)

    def turn(unit: str, module: nn.Module) -> None:
        if unit == adapter.embed:  # rows of E are inputs to the stream: E Q
            _set(module.weight, rotate_inputs(module.weight.detach(), q))
        elif unit == adapter.head:
            adapter.fold_norm(copy.deepcopy(scale), [module])
            _set(module.weight, rotate_inputs(module.weight.detach(), q))
        else:
            _rotate_block(module, adapter, q, r)

    change_units(model, turn)


def _rotate_block(block: nn.Module, adapter, q: torch.Tensor, r: torch.Tensor) -> None:
    for norm, names in adapter.reads:
        readers = [block.get_submodule(n) for n in names]
        adapter.fold_norm(block.get_submodule(norm), readers)
        for lin in readers:
            _set(lin.weight, rotate_inputs(lin.weight.detach(), q))
    for n in adapter.writes:
        lin = block.get_submodule(n)
        _set(lin.weight, rotate_outputs(lin.weight.detach(), q))
        if lin.bias is not None:
            _set(lin.bias, lin.bias.detach().double() @ q)
    if adapter.value is not None:  # a value projection fused with q and k keeps its basis
        _rotate_values(block.get_submodule(adapter.value), block.get_submodule(adapter.attn_out), r)


def _rotate_values(v: nn.Linear, o: nn.Linear, r: torch.Tensor) -> None:
    """Each head's values v_h → v_h R (the value projection's rows: Rᵀ W_h) and the output projection's columns
    that read them → W R."""
    d = r.shape[0]
    w = v.weight.detach().double().reshape(-1, d, v.in_features)
    _set(v.weight, torch.einsum("ji,hjc->hic", r, w).reshape(v.weight.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.detach().double().reshape(-1, d) @ r).reshape(-1))
    wo = o.weight.detach().double().reshape(o.out_features, -1, d)
    _set(o.weight, (wo @ r).reshape(o.weight.shape))
