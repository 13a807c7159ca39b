"""OAC: the output-adaptive Hessian is E_t[‖g_t‖² x_t x_tᵀ] / E_t[‖g_t‖²] of each linear, and GPTQ on it leaves less
loss-weighted output error than GPTQ on XᵀX; plans with oac apply, pack and profile."""
from __future__ import annotations

import copy

import torch

from mixq.capture import output_adaptive_hessians
from mixq.config import QuantizeConfig
from mixq.formats import QuantSpec
from mixq.models import adapter_for
from mixq.pipeline import run
from mixq.plan import Budget
from mixq.solvers import output_error, solve

from conftest import apply_uniform

LAYER = "model.layers.1.mlp.down_proj"


def test_output_adaptive_hessian_matches_a_direct_computation(tiny_model, calib_ids):
    ids = calib_ids[:2]
    got = output_adaptive_hessians(tiny_model, adapter_for(tiny_model), ids, [LAYER])[LAYER]
    num, den = 0, 0
    for window in ids.split(1):
        seen = {}

        def keep(_module, args, out):
            out.retain_grad()
            seen.update(x=args[0].detach(), y=out)

        handle = tiny_model.get_submodule(LAYER).register_forward_hook(keep)
        logits = tiny_model(window).logits[:, :-1]
        handle.remove()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1),
                                          reduction="sum").backward()
        x, g = seen["x"][0].double(), seen["y"].grad[0].double()
        e = (g ** 2).sum(1)
        num = num + (x.T * e) @ x
        den = den + e.sum()
    tiny_model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got, (num / den).float(), rtol=1e-4, atol=1e-6)


def test_the_apply_gets_the_output_adaptive_hessians_a_block_at_a_time(tiny_model, calib_ids):
    """OutputHessians keeps a number a token from the backward passes and makes each block's matrices from the
    float block as the apply reaches it: the matrices of output_adaptive_hessians, never all at once."""
    from mixq.capture import OutputHessians, block_inputs, fisher_windows, run_block

    adapter = adapter_for(tiny_model)
    names = adapter.layer_names(tiny_model)
    whole = output_adaptive_hessians(tiny_model, adapter, fisher_windows(adapter, calib_ids), names)
    per = OutputHessians(tiny_model, adapter, calib_ids, names)
    assert all(e.dim() == 1 for losses in per.energy.values() for window in losses for e in window)
    x, calls = block_inputs(tiny_model, adapter, calib_ids)
    got = {}
    for i, block in enumerate(adapter.block_list(tiny_model)):
        quantized = x if i == 0 else x + 0.1  # (the apply's later blocks see quantized inputs: not what H reads)
        more = per.block(block, f"{adapter.blocks}.{i}", quantized, calls[i])
        assert set(more) == {n for n in names if n.startswith(f"{adapter.blocks}.{i}.")}
        got.update({n: v["output_hessian"] for n, v in more.items()})
        x = run_block(block, x, calls[i])
    assert set(got) == set(whole)
    for n in names:
        torch.testing.assert_close(got[n], whole[n], rtol=1e-5, atol=1e-7)


def test_oac_lowers_the_loss_weighted_output_error(tiny_model, calib_ids):
    """GPTQ minimises tr(ΔW H ΔWᵀ) for the H it is given: on the output-adaptive H, oac must beat gptq-act."""
    adapter = adapter_for(tiny_model)
    names = adapter.layer_names(tiny_model)
    hs = output_adaptive_hessians(tiny_model, adapter, calib_ids, names)
    from mixq.capture import float_block_stats

    plain = {}
    for i, block, stats in float_block_stats(tiny_model, adapter, calib_ids):
        for group in adapter.groups:
            for n in group:
                plain[f"{adapter.blocks}.{i}.{n}"] = stats[group[0]].hessian
    spec = QuantSpec.of(2, 32)
    totals = torch.zeros(2)
    for n in names:
        w = tiny_model.get_submodule(n).weight.detach()
        errs = [float(output_error(w, solve(s, w, h, spec).dequantize(), hs[n]).sum())
                for s, h in (("oac", hs[n]), ("gptq-act", plain[n]))]
        totals += torch.tensor(errs) / errs[1]  # each layer counts alike
    assert totals[0] < 0.97 * totals[1], totals  # 7 % lower on average here


def test_oac_plans_apply_pack_and_allocate(tiny_model, calib_ids):
    names = adapter_for(tiny_model).layer_names(tiny_model)
    spec = QuantSpec.of(3, 32)
    applied = {s: apply_uniform(tiny_model, calib_ids, s, spec)[names[0]].codes for s in ("oac", "gptq-act")}
    assert not torch.equal(applied["oac"], applied["gptq-act"])  # the apply really used the other Hessian
    result = run(copy.deepcopy(tiny_model), calib_ids, QuantizeConfig(
        budget=Budget(bits=3.0), solvers=("oac+comq",), formats=tuple(QuantSpec.of(b, 32) for b in (2, 3, 4)),
        tables=False))
    assert {str(c.solver) for c in result.plan.layers.values()} == {"oac+comq"}
