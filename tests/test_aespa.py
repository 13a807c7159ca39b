"""aespa: the value projection's attention-aware Hessians match a direct computation from the model's own attention
probabilities, solving on them lowers the error of the attention output (what o_proj reads), and aespa plans
apply, pack and profile."""
from __future__ import annotations

import copy

import torch

from mixq.capture import QUERY_STRIDE, LayerStats, attention_hessians, block_inputs, hessians, run_block
from mixq.config import QuantizeConfig
from mixq.formats import QuantSpec
from mixq.models import adapter_for
from mixq.pipeline import run
from mixq.plan import Budget
from mixq.solvers import solve

from conftest import apply_uniform


def _block_stats(model, ids, index: int):
    adapter = adapter_for(model)
    x, calls = block_inputs(model, adapter, ids)
    blocks = adapter.block_list(model)
    for block, call in zip(blocks[:index], calls):
        x = run_block(block, x, call)
    block = blocks[index]
    with hessians(block, adapter) as stats, attention_hessians(block, adapter) as attn:
        run_block(block, x, calls[index])
    return x, calls[index], block, stats, attn


def solve_heads(chain: str, w, heads, spec):
    """aespa's solve of a value projection with attention Hessians (heads × cols × cols)."""
    return solve(chain, w, LayerStats(torch.eye(w.shape[1]), 0, attention=heads), spec)


def test_attention_hessians_match_the_eager_attention_probabilities(tiny_model, calib_ids):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ids = calib_ids[:3]
    impl = tiny_model.config._attn_implementation
    before = ALL_ATTENTION_FUNCTIONS.get_interface(impl, None)
    _, _, block, _, attn = _block_stats(tiny_model, ids, 1)
    assert ALL_ATTENTION_FUNCTIONS.get_interface(impl, None) is before  # the wrapper is gone
    got = attn["self_attn.v_proj"]

    eager = copy.deepcopy(tiny_model)
    eager.set_attn_implementation("eager")
    seen = {}
    handle = eager.model.layers[1].self_attn.v_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        probs = eager(ids, output_attentions=True, use_cache=False).attentions[1]  # windows × heads × t × t
    handle.remove()
    xbar = (probs.double()[:, :, ::QUERY_STRIDE] @ seen["x"].double()[:, None])  # windows × heads × t × cols
    kv = eager.config.num_key_value_heads
    per = xbar.shape[1] // kv
    want = torch.stack([(lambda v: v.T @ v / len(v))(xbar[:, g * per:(g + 1) * per].reshape(-1, xbar.shape[-1]))
                        for g in range(kv)])
    assert got.shape == (kv, 64, 64)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def _attention_output_error(block, x, call, deq: torch.Tensor) -> float:
    """Σ ‖Δ(attention output)‖² over the windows when v_proj's weight becomes `deq` (the o_proj input moves)."""
    v, seen = block.self_attn.v_proj, []
    handle = block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    run_block(block, x, call)
    w = v.weight.data
    v.weight.data = deq
    run_block(block, x, call)
    v.weight.data = w
    handle.remove()
    n = len(seen) // 2
    return float(sum(((a - b) ** 2).sum() for a, b in zip(seen[:n], seen[n:])))


def test_aespa_lowers_the_attention_output_error(tiny_model, calib_ids):
    """GPTQ on each head's attention-aware Hessian must leave less error where o_proj reads it than GPTQ on the
    layer's own XᵀX, at every width (the claim of solvers.aespa), on both blocks."""
    for index in (0, 1):
        x, kwargs, block, stats, attn = _block_stats(tiny_model, calib_ids, index)
        w = block.self_attn.v_proj.weight.detach()
        for bits in (2, 3, 4):
            spec = QuantSpec.of(bits, 32)
            aware = solve_heads("aespa", w, attn["self_attn.v_proj"], spec).dequantize()
            plain = solve("gptq-act", w, stats["self_attn.q_proj"].hessian, spec).dequantize()
            errs = [_attention_output_error(block, x, kwargs, d) for d in (aware, plain)]
            assert errs[0] < 0.7 * errs[1], (index, bits, errs)  # 0.34–0.43 here


def test_aespa_plans_apply_pack_and_allocate(tiny_model, calib_ids):
    codes = {s: apply_uniform(tiny_model, calib_ids, s, QuantSpec.of(3, 32)) for s in ("aespa", "gptq-act")}
    value, query = "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj"
    assert not torch.equal(codes["aespa"][value].codes, codes["gptq-act"][value].codes)  # other Hessians
    assert torch.equal(codes["aespa"][query].codes, codes["gptq-act"][query].codes)  # the rest is gptq-act
    double = QuantSpec.of(3, 32, "min", 6)  # per-row steps stack back in row order
    w = tiny_model.model.layers[0].self_attn.v_proj.weight.detach()
    eye = torch.eye(64).expand(2, 64, 64)
    torch.testing.assert_close(solve_heads("aespa", w, eye, double).dequantize(),
                               solve("aespa", w, torch.eye(64), double).dequantize())
    result = run(copy.deepcopy(tiny_model), calib_ids, QuantizeConfig(
        budget=Budget(bits=3.0), solvers=("aespa+comq",), formats=tuple(QuantSpec.of(b, 32) for b in (2, 3, 4)),
        tables=False))
    assert {str(c.solver) for c in result.plan.layers.values()} == {"aespa+comq"}
