"""The flow of DESIGN.md for one model: capture + profile (block by block), allocate, apply (block by block,
fed by the already-quantized blocks). Progress goes to an optional `step(stage, done, total)` callback."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .allocate import Allocation, allocate, check_budget
from .capture import LayerStats, attention_hessians, block_inputs, hessians, output_adaptive_hessians, output_energy, \
    output_fisher, run_block
from .checkpoint import Checkpoint
from .cost import CostTable
from .formats import QuantizedTensor
from .io import FLOAT_DTYPE
from .models import adapter_for
from .plan import Budget, Candidate, Plan
from .profile import LayerProfile, Profile, cost_profile, default_candidates, layer_costs, profile_group, \
    table_candidates
from .refine import Refinement, refine
from .runtime.qlinear import QuantEmbedding, QuantLinear
from .sensitivity import DEFAULT_ESTIMATOR, MEASURED, NEEDS_ENERGY, NEEDS_FISHER, get_estimator
from .sensitivity.kl import KLProbe
from .sensitivity.oac import oac_stats
from .solvers import get_solver, solve
from .solvers.aespa import solve_heads
from .solvers.taskclip import JUDGE_WINDOWS, search as taskclip_search
from .solvers.bias import compensation, solve_stats
from .transforms.resq import layer_candidates

log = logging.getLogger(__name__)
Step = Callable[[str, int, int], None]
FISHER_WINDOWS = 8  # calibration windows that get a backward pass for the fisher estimator


def _no_step(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class Result:
    plan: Plan
    profile: Profile | None
    allocation: Allocation | None
    seconds: dict[str, float] = field(default_factory=dict)
    refinement: "Refinement | None" = None


HEADER_BYTES_PER_TENSOR = 256  # safetensors header allowance: name, dtype, shape, offsets of each tensor


def fixed_bytes(model: nn.Module, layer_names: list[str]) -> int:
    """Bytes of model.safetensors that do not depend on the plan: every parameter saved in float (FLOAT_DTYPE),
    all but the block linears' weights and biases (a layer's bias counts in its candidates' bits), plus a header
    allowance for every tensor (3 per quantized linear)."""
    quantized = {f"{n}.{p}" for n in layer_names for p in ("weight", "bias")}
    size = torch.finfo(FLOAT_DTYPE).bits // 8
    floats = [p for n, p in model.named_parameters() if n not in quantized]
    return sum(p.numel() * size for p in floats) + HEADER_BYTES_PER_TENSOR * (len(floats) + 3 * len(layer_names))


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Fail before any calibration: unknown layers, layers that are not linear, formats that do not fit."""
    adapter = adapter_for(model)
    known, tables = set(adapter.layer_names(model)), set(adapter.tables(model))
    for name, cand in plan.layers.items():
        if name not in known | tables:
            near = sorted(known)[:3]
            raise ValueError(f"plan names unknown layer {name!r}; layers look like {', '.join(near)}, …")
        if name in tables and cand.solver != "rtn":
            raise ValueError(f"plan gives {name} solver {cand.solver!r}: the embedding table and the head take rtn")
        cols = model.get_submodule(name).weight.shape[1]
        if not cand.spec.fits(cols):
            raise ValueError(f"plan gives {name} {cand.spec.name}, whose groups do not divide its rows of {cols}")
        get_solver(cand.solver)


def profile_model(model, calib: torch.Tensor, candidates: list[Candidate], estimator: str = DEFAULT_ESTIMATOR,
                  step: Step = _no_step, checkpoint: Checkpoint | None = None, tables: bool = False,
                  transforms: tuple[str, ...] = ()) -> Profile:
    """Every layer × candidate, block by block; with `tables`, then the embedding table and the head
    (profile_tables). With a checkpoint, the profile is saved after each block and the blocks an earlier run with
    the same key finished are taken from it (only run forward, to feed the next). `transforms`: those applied to
    the model, which may change a layer's candidates (transforms.resq.layer_candidates)."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    prof = Profile(estimator, fixed_bytes(model, adapter.layer_names(model) + (adapter.tables(model) if tables
                                                                               else [])))
    done = checkpoint.load() if checkpoint else {}
    fisher = energy = None
    probe = KLProbe(model, adapter, calib) if estimator in MEASURED else None
    x, kwargs = block_inputs(model, adapter, calib)
    for i, block in enumerate(blocks):
        names = [f"{adapter.blocks}.{i}.{n}" for group in adapter.groups for n in group]
        if all(n in done for n in names):
            prof.layers += [done[n] for n in names]
            x = run_block(block, x, kwargs)
            if probe:
                probe.advance()
            step("profile", i + 1, len(blocks))
            continue
        if fisher is None and estimator in NEEDS_FISHER:
            fisher = output_fisher(model, adapter, calib[:FISHER_WINDOWS], step, tables)
        if energy is None and estimator in NEEDS_ENERGY:
            energy = output_energy(model, adapter, calib[:FISHER_WINDOWS], step)
        keep = calib[:FISHER_WINDOWS].numel() if energy is not None else 0
        with hessians(block, adapter, keep) as stats:
            y = run_block(block, x, kwargs)
        for group in adapter.groups:
            weights = {f"{adapter.blocks}.{i}.{n}": block.get_submodule(n).weight.detach() for n in group}
            measures = {f"{adapter.blocks}.{i}.{n}": probe.layer(block.get_submodule(n)) for n in group} \
                if probe else None
            st = stats[group[0]]
            judged = {n: oac_stats(st.inputs, energy[n], st.mean) for n in weights} if energy is not None else None
            cands = layer_candidates(adapter, transforms, next(iter(weights)),
                                     next(iter(weights.values())).shape[1], candidates)
            prof.layers += profile_group(weights, st, cands, estimator, fisher, measures,
                                         biased=biased_layers(model, weights), judged=judged)
        x = y
        if probe:
            probe.advance()
        if checkpoint:
            checkpoint.save(prof)
        step("profile", i + 1, len(blocks))
    names = adapter.tables(model) if tables else []
    if all(n in done for n in names):
        prof.layers += [done[n] for n in names]
    else:
        # oac judges the tables as fisher does (both in loss units): a lookup's error is not a linear's output error
        judge = "fisher" if estimator in NEEDS_ENERGY else estimator
        if fisher is None and judge in NEEDS_FISHER:
            fisher = output_fisher(model, adapter, calib[:FISHER_WINDOWS], step, tables)
        prof.layers += profile_tables(model, calib, x, judge, fisher, probe)
        if checkpoint:
            checkpoint.save(prof)
    return prof


def profile_tables(model, calib: torch.Tensor, last: torch.Tensor, estimator: str,
                   fisher: dict[str, torch.Tensor] | None, probe: KLProbe | None) -> list[LayerProfile]:
    """The embedding table and the head × table_candidates. The head's damage is that of a linear on the final
    hidden states (`last`: the last block's outputs, normalised); the table's that of its rows the calibration
    reads, each weighted by how often it is read (and, for fisher, each column by the embedding output's Fisher);
    a tied table gets the sum of both. A measured estimator runs the whole model with the table quantized."""
    adapter = adapter_for(model)
    candidates = table_candidates()
    names = adapter.tables(model)
    out = []
    for name in names:
        module = model.get_submodule(name)
        w = module.weight.detach()
        if probe is not None:
            out += profile_group({name: w}, LayerStats(torch.empty(0, 0), 0), candidates, estimator, None,
                                 {name: probe.layer(module, whole=True)})
            continue
        lp = layer_costs(name, *w.shape, candidates, getattr(module, "bias", None) is not None)
        parts = []
        if name == adapter.head or adapter.head not in names:  # the head, or a table tied to it
            with torch.no_grad():
                h = model.get_submodule(adapter.norm)(last).reshape(-1, w.shape[1]).float()
            head = {name: fisher[adapter.head]} if fisher is not None else None
            parts += profile_group({name: w}, LayerStats(h.T @ h / len(h), len(h)), candidates, estimator, head,
                                   sample=False)  # every row: the logits' Fisher sits on a few tokens
        if name == adapter.embed:
            counts = torch.bincount(calib.reshape(-1), minlength=w.shape[0]).float()
            seen = counts.nonzero().squeeze(1)
            cols = fisher[adapter.embed] if fisher is not None else torch.ones(w.shape[1])
            parts += profile_group({name: w[seen]}, LayerStats(torch.diag(cols), int(counts.sum())), candidates,
                                   estimator, {name: counts[seen] / counts.sum()}, sample=False)
        lp.damage = [sum(p.damage[k] for p in parts) for k in range(len(lp.candidates))]
        out.append(lp)
    return out


def apply_plan(model, calib: torch.Tensor, plan: Plan, step: Step = _no_step) -> dict[str, QuantizedTensor]:
    """Quantize in place, block by block: each layer's weight becomes its dequantized value (fake quantization,
    bit-identical to what QuantLinear computes), the next block fed by this block's quantized outputs."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    _round_float_params(model, set(plan.layers))  # calibrate on the float values that will be saved
    out: dict[str, QuantizedTensor] = {}
    # the tables first, so that the blocks calibrate on the quantized embeddings (rtn needs no inputs)
    for name in [n for n in adapter.tables(model) if n in plan.layers]:
        module = model.get_submodule(name)
        qt = solve(plan.layers[name].solver, module.weight.detach(), torch.empty(0, 0), plan.layers[name].spec)
        module.weight.data = qt.dequantize()  # a tied head changes with it
        out[name] = qt
    oac = [n for n, c in plan.layers.items() if c.base == "oac"]
    oac = output_adaptive_hessians(model, adapter, calib[:FISHER_WINDOWS], oac, step) if oac else {}
    x, kwargs = block_inputs(model, adapter, calib)
    for i, block in enumerate(blocks):
        value = plan.layers.get(f"{adapter.blocks}.{i}.{adapter.value}")
        aware = attention_hessians(block, adapter) if value is not None and value.base == "aespa" else nullcontext({})
        with hessians(block, adapter) as stats, aware as attn:
            y = run_block(block, x, kwargs)
        judge = _block_judge(block, x[:JUDGE_WINDOWS], y[:JUDGE_WINDOWS], kwargs)
        for group in adapter.groups:
            for n in group:
                name = f"{adapter.blocks}.{i}.{n}"
                if name not in plan.layers:
                    continue
                lin, cand, st = block.get_submodule(n), plan.layers[name], stats[group[0]]
                if n in attn:  # aespa's value projection: each head's rows on its attention-aware Hessian
                    qt = solve_heads(cand.solver, lin.weight.detach(), attn[n], cand.spec)
                elif cand.base == "taskclip":  # the clipping ratio whose block output is nearest the float one
                    qt, _ = taskclip_search(cand.solver, lin.weight.detach(), solve_hessian(cand, st), cand.spec,
                                            judge(lin))
                else:
                    qt = solve(cand.solver, lin.weight.detach(), solve_hessian(cand, st, oac.get(name)), cand.spec)
                deq = qt.dequantize()
                if cand.bias:  # stored as fp16, like every float parameter
                    delta = compensation(lin.weight.detach(), deq, st.mean)
                    lin.bias = nn.Parameter((delta if lin.bias is None else lin.bias.data + delta).to(FLOAT_DTYPE)
                                            .float())
                lin.weight.data = deq
                out[name] = qt
        x = run_block(block, x, kwargs)
        step("apply", i + 1, len(blocks))
    return out


def _block_judge(block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict):
    """judge(linear)(weight) → Σ‖block(x) − y‖² with the linear's weight set to `weight` (restored after): how far
    the block's output moves from `y` (its float output) for one layer's candidate weights, the layers before it
    as they are (solvers.taskclip)."""
    def judge(lin: nn.Linear):
        def loss(weight: torch.Tensor) -> float:
            kept, lin.weight.data = lin.weight.data, weight
            try:
                return float(((run_block(block, x, kwargs) - y) ** 2).sum())
            finally:
                lin.weight.data = kept
        return loss
    return judge


def solve_hessian(cand: Candidate, stats: LayerStats, oac: torch.Tensor | None = None) -> torch.Tensor:
    """The Hessian a candidate's solver gets: the output-adaptive one (`oac`, solvers.oac) for an oac solver, the
    input covariance for a bias-compensated one (solvers.bias: the error left once the bias absorbs the mean),
    else H = E[x xᵀ]."""
    return oac if oac is not None else solve_stats(stats, cand.bias).hessian


def _round_float_params(model: nn.Module, quantized: set[str]) -> None:
    """Everything not quantized is stored in FLOAT_DTYPE: round it now so saved and in-memory models agree."""
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in quantized:
            p.data = p.data.to(FLOAT_DTYPE).float()


def pack_model(model: nn.Module, qtensors: dict[str, QuantizedTensor]) -> None:
    """Swap each quantized nn.Linear for a QuantLinear holding the packed codes (an embedding table for a
    QuantEmbedding, and a head tied to it for a QuantLinear on the same buffers)."""
    adapter = adapter_for(model)
    tied = adapter.embed in qtensors and adapter.head not in adapter.tables(model)
    for name, qt in qtensors.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            model.set_submodule(name, QuantEmbedding.from_quantized(qt))
        else:
            model.set_submodule(name, QuantLinear.from_quantized(qt, module.bias))
    if tied:
        model.set_submodule(adapter.head, model.get_submodule(adapter.embed).tied_head())


def preflight(model, budget: Budget | None, plan: Plan | None, candidates: list[Candidate] | None = None,
              estimator: str = DEFAULT_ESTIMATOR, tables: bool = False, costs: CostTable | None = None,
              transforms: tuple[str, ...] = ()) -> None:
    """Every check that needs no calibration, so bad input fails in seconds, not after the profile."""
    if plan is not None:
        check_plan(model, plan)
        return
    if budget is None:
        raise ValueError("give a budget or a plan")
    if budget.latency and tables:
        raise ValueError("a latency budget does not take --include-embeddings yet: the cost table times the block "
                         "linears only")
    get_estimator(estimator)
    adapter = adapter_for(model)
    names, extra = adapter.layer_names(model), adapter.tables(model) if tables else []

    def shapes(ns):
        return {n: tuple(model.get_submodule(n).weight.shape) for n in ns}

    candidates = candidates or default_candidates()
    sizes = cost_profile({}, [], fixed_bytes(model, names + extra), estimator)
    for n, shape in shapes(names).items():
        cands = layer_candidates(adapter, transforms, n, shape[1], candidates)
        sizes.layers += cost_profile({n: shape}, cands, 0, estimator, biased_layers(model, [n])).layers
    sizes.layers += cost_profile(shapes(extra), table_candidates(), 0, estimator, biased_layers(model, extra)).layers
    check_budget(sizes, budget, costs)


def quantize(model, calib: torch.Tensor, budget: Budget | None = None, plan: Plan | None = None,
             candidates: list[Candidate] | None = None, estimator: str = DEFAULT_ESTIMATOR,
             step: Step = _no_step, checkpoint: Checkpoint | None = None, refine_rounds: int = 0,
             tables: bool = False, costs: CostTable | None = None, transforms: tuple[str, ...] = ()) -> Result:
    """Profile + allocate (unless a plan is given), optionally refine the plan by measured KL (refine.py), then
    apply. `tables`: the embedding table and the head join the allocation; `costs`: the measured cost table of
    a latency budget; `transforms`: the names of the whole-model transforms already applied to `model`
    (transforms.apply_transforms), which the allocated plan records. The model is left packed (QuantLinear)."""
    seconds = {}
    prof = alloc = refinement = None
    candidates = candidates or default_candidates()
    preflight(model, budget, plan, candidates, estimator, tables, costs, transforms)
    if refine_rounds and budget is not None and budget.latency:
        raise ValueError("--refine trades bits, not time: it does not go with a latency budget yet")
    if plan is None:
        t = time.perf_counter()
        prof = profile_model(model, calib, candidates, estimator, step, checkpoint, tables, transforms)
        prof.transforms = tuple(transforms)  # its plans (allocate, refine) carry them
        seconds["profile"] = time.perf_counter() - t
        t = time.perf_counter()
        alloc = allocate(prof, budget, costs)
        plan = alloc.plan
        seconds["allocate"] = time.perf_counter() - t
        if refine_rounds:
            t = time.perf_counter()
            refinement = refine(model, calib, prof, alloc, budget, rounds=refine_rounds, step=step)
            alloc, plan = refinement.allocation, refinement.allocation.plan
            seconds["refine"] = time.perf_counter() - t
    t = time.perf_counter()
    qtensors = apply_plan(model, calib, plan, step)
    seconds["apply"] = time.perf_counter() - t
    pack_model(model, qtensors)
    return Result(plan, prof, alloc, seconds, refinement)


def block_linear_bits(model: nn.Module) -> tuple[int, int]:
    """(stored bits, weights) of every block linear: packed buffers of QuantLinear, FLOAT_DTYPE for the rest; and
    each one's bias, stored in FLOAT_DTYPE."""
    bits = weights = 0
    for name in adapter_for(model).layer_names(model):
        m = model.get_submodule(name)
        weights += m.in_features * m.out_features
        if isinstance(m, QuantLinear):
            bits += sum(b.numel() * b.element_size() * 8 for b in m.buffers())  # a split row's high part too
        else:
            bits += m.weight.numel() * torch.finfo(FLOAT_DTYPE).bits
        if m.bias is not None:
            bits += m.bias.numel() * torch.finfo(FLOAT_DTYPE).bits
    return bits, weights


def biased_layers(model: nn.Module, names) -> frozenset:
    """Those of `names` whose module has a bias of its own."""
    return frozenset(n for n in names if getattr(model.get_submodule(n), "bias", None) is not None)
