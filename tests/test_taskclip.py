"""taskclip: alone it is gptq-act; with block context it keeps, per layer, the clipping ratio whose block output is
nearest the float block's, which leaves the block's output error no higher than gptq-act's."""
from __future__ import annotations

import copy

import torch

from mixq.apply import apply_plan
from mixq.capture import JUDGE_WINDOWS, LayerStats, block_inputs, run_block
from mixq.formats import QuantSpec
from mixq.models import adapter_for
from mixq.plan import Candidate, Plan
from mixq.solvers import build, solve
from mixq.solvers.taskclip import RATIOS, TaskClip

from conftest import apply_uniform, first_block_capture


def _layer(model, ids):
    _, _, stats, _, block = first_block_capture(model, ids)
    return block.mlp.down_proj.weight.detach(), stats["mlp.down_proj"].hessian


def test_taskclip_alone_is_gptq_act(tiny_model, calib_ids):
    w, h = _layer(tiny_model, calib_ids)
    spec = QuantSpec.of(3, 32)
    assert torch.equal(solve("taskclip", w, h, spec).codes, solve("gptq-act", w, h, spec).codes)
    harder = TaskClip().at_ratio(0.85).solve(w, LayerStats.of(h), spec)
    assert not torch.equal(harder.codes, solve("taskclip", w, h, spec).codes)


def test_search_keeps_the_ratio_of_least_loss(tiny_model, calib_ids):
    w, h = _layer(tiny_model, calib_ids)
    spec = QuantSpec.of(2, 32)
    first, then = build("taskclip+comq")
    for want in RATIOS[1:]:
        target = first.at_ratio(want).solve(w, LayerStats.of(h), spec, then).dequantize()
        judged = LayerStats(h, 0, judge=lambda d: float(((d - target) ** 2).sum()))
        qt, ratio = first.search(w, judged, spec, then)
        assert ratio == want
        torch.testing.assert_close(qt.dequantize(), target)
        torch.testing.assert_close(solve("taskclip+comq", w, judged, spec).dequantize(), target)


def _block_error(model, float_model, ids) -> float:
    """Σ‖block 0(x) − float block 0(x)‖² on the judged windows (block 0's inputs are the same for both)."""
    adapter = adapter_for(model)
    x, calls = block_inputs(float_model, adapter, ids[:JUDGE_WINDOWS])
    y = run_block(adapter.block_list(model)[0], x, calls[0])
    return float(((y - run_block(adapter.block_list(float_model)[0], x, calls[0])) ** 2).sum())


def test_taskclip_lowers_the_block_output_error(tiny_model, calib_ids):
    spec = QuantSpec.of(2, 32)
    names = adapter_for(tiny_model).layer_names(tiny_model)
    errs, codes = {}, {}
    for solver in ("taskclip", "gptq-act"):
        model = copy.deepcopy(tiny_model)
        codes[solver] = apply_plan(model, calib_ids, Plan({n: Candidate(spec, solver) for n in names}))
        errs[solver] = _block_error(model, tiny_model, calib_ids)
    moved = [n for n in names if not torch.equal(codes["taskclip"][n].codes, codes["gptq-act"][n].codes)]
    assert moved  # some layer kept a ratio below 1
    assert errs["taskclip"] < errs["gptq-act"], errs  # 1 % lower here, at 2 bits
    assert apply_uniform(tiny_model, calib_ids, "taskclip+comq", spec)  # chains apply and pack
