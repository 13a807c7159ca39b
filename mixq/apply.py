"""Apply a plan: block by block, each layer quantized by its candidate's chain on the statistics that chain needs,
the next block fed with the outputs of the blocks already quantized (memory: one block); then pack the model
(QuantLinear) and count its stored bits."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .capture import IN_MEMORY, JUDGE, Activations, LayerStats, block_inputs, capture_block, model_statistics, \
    no_step, run_block
from .distributed import Dealer
from .formats import QuantizedTensor
from .io import FLOAT_DTYPE, install_quant_linears, stored_tensors
from .models import adapter_for
from .models.stream import hold, keep, round_on_load, streamer_of
from .plan import Plan
from .runtime.qlinear import QuantEmbedding, QuantLinear
from .solvers import DAMP, solve_layer


def apply_plan(model, calib: torch.Tensor, plan: Plan, step: Callable = no_step,
               damp: float = DAMP, shards=None, store: Activations = IN_MEMORY) -> dict[str, QuantizedTensor]:
    """Quantize in place, block by block: each layer's weight becomes its dequantized value (fake quantization,
    bit-identical to what QuantLinear computes) and gets the bias its chain adds; the next block is fed by this
    block's quantized outputs. The tables first (their chains need no statistics), so that the blocks calibrate
    on the quantized embeddings.

    A streamed model's blocks are packed as they are finished; with `shards` (io.BlockShards) each is written
    there and released, and a block an earlier run with the same key wrote is read back and only run, to feed the
    next (a stopped run resumes). `store`: where the hidden states between blocks live (capture.Activations)."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    _round_float_params(model, set(plan.layers))  # calibrate on the float values that will be saved
    out: dict[str, QuantizedTensor] = {}
    for name in [n for n in adapter.tables(model) if n in plan.layers]:
        with hold(model, name):
            out[name] = _quantize_table(model.get_submodule(name), plan.layers[name].solver,
                                        plan.layers[name].spec, damp)
            keep(model, name)  # (streamed: its quantized values stay until it is packed)
    needs = {n: c.solver.needs for n, c in plan.layers.items()}
    extra = model_statistics(model, adapter, calib, needs, step)
    dealer = Dealer()
    x, calls = block_inputs(model, adapter, calib, store)
    for i, block in enumerate(blocks):
        prefix = f"{adapter.blocks}.{i}"
        if shards is not None and shards.done(i):
            if extra.names:  # (the float stream of the output-adaptive Hessians goes on past it)
                with hold(model, i):
                    extra.block(block, prefix, x, calls[i])
            x = _replay(model, block, prefix, plan, shards.read(i), x, calls[i], store.next(i, x))
            step("apply", i + 1, len(blocks))
            continue
        with hold(model, i):
            more = extra.block(block, prefix, x, calls[i])  # (before the block changes)
            _, stats = capture_block(block, adapter, prefix, x, calls[i], needs, more,
                                     store.buffer("float", x.shape, x.dtype))
            out.update(_quantize_block(model, stats, plan, damp, dealer))
            x = run_block(block, x, calls[i], store.next(i, x))
            if streamer_of(model) is not None:  # packed now, so that memory holds one float block at most
                pack_model(model, {n: out.pop(n) for n in stats})
                if shards is None:
                    keep(model, i)
                else:  # written, and released with the block
                    shards.write(i, {k: v() if callable(v) else v
                                     for k, v in stored_tensors(model, plan, prefix + ".").items()})
                    _release_packed(block)
        step("apply", i + 1, len(blocks))
    return out


def _quantize_block(model, stats: dict[str, LayerStats], plan: Plan, damp: float, dealer: Dealer) -> dict:
    """Solve a block's layers (`stats`, in the block's order) and set their weights: {name: QuantizedTensor}. With
    several ranks, the layers are dealt out in turns (the layers of one group that go to a rank, with their
    statistics, in one call: distributed.Dealer); a block with a layer judged by the block's output (JUDGE: each
    layer sees the earlier ones quantized) is solved here, in order, each layer set before the next is solved."""
    out: dict[str, QuantizedTensor] = {}

    def install(solved: dict) -> None:
        for name, (qt, delta) in solved.items():
            out[name] = _install(model.get_submodule(name), qt, delta)

    in_order = any(JUDGE in plan.layers[n].solver.needs for n in stats)
    groups: dict[int, tuple[LayerStats, list[str]]] = {}  # the layers that share statistics (one input)
    for name, st in stats.items():
        groups.setdefault(id(st), (st, []))[1].append(name)
    for st, names in groups.values():
        for part in [[n] for n in names] if in_order else [names]:
            for rank, share in dealer.deal(part, alone=in_order).items():
                layers = [(n, plan.layers[n].solver, model.get_submodule(n).weight.detach(), plan.layers[n].spec)
                          for n in share]
                dealer.run(rank, _solve_layers, (layers, st, damp), install)
    dealer.settle()
    return {name: out[name] for name in stats}


def _solve_layers(layers: list[tuple], stats: LayerStats, damp: float) -> dict:
    """{name: (QuantizedTensor, the bias change its chain adds or None)} of layers (name, chain, weight, spec) that
    share `stats`."""
    return {name: solve_layer(chain, weight, stats, spec, damp) for name, chain, weight, spec in layers}


def _replay(model, block: nn.Module, prefix: str, plan: Plan, tensors: dict, x, call, out=None):
    """Run a block an earlier run packed and wrote (its saved tensors) on x, then release it: the next block's
    input, as the run that wrote it computed it."""
    install_quant_linears(model, Plan({n: c for n, c in plan.layers.items() if n.startswith(prefix + ".")}))
    for name, t in tensors.items():
        t = t.to(x.device)  # (read to the CPU; the run may compute on a GPU)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._buffers:
            module._buffers[attr] = t
        else:  # a parameter stored in FLOAT_DTYPE: computed in float32, as the writing run did
            module._parameters[attr] = nn.Parameter(t.float(), requires_grad=False)
    y = run_block(block, x, call, out)
    _release_packed(block)
    return y


def _release_packed(block: nn.Module) -> None:
    """Put a written block's packed buffers and parameters back on the meta device."""
    for m in block.modules():
        for key, t in list(m._buffers.items()):
            if isinstance(m, QuantLinear) and t is not None:
                m._buffers[key] = torch.empty_like(t, device="meta")
        for key, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _quantize_layer(module: nn.Module, chain, stats: LayerStats, spec, damp: float) -> QuantizedTensor:
    """Solve one layer by `chain` and set its weight to the dequantized result (and its bias, where the chain adds
    one)."""
    return _install(module, *solve_layer(chain, module.weight.detach(), stats, spec, damp))


TABLE_ROWS = 8192  # a table is solved (and profiled) this many rows at a time: Llama-3's 128256 × 4096 would
# otherwise hold several float copies of itself, each larger than a block


def _quantize_table(module: nn.Module, chain, spec, damp: float) -> QuantizedTensor:
    """The embedding table or the head, TABLE_ROWS rows at a time (its chain needs no statistics and solves rows
    independently, so the parts stack to the whole solve), each part's rows set to their dequantized values."""
    if module.weight.dtype != torch.float32:  # (the dequantized values are float32, as a packed model computes)
        module.weight.data = module.weight.data.float()
    weight, parts = module.weight.data, []
    for start in range(0, weight.shape[0], TABLE_ROWS):
        rows = slice(start, start + TABLE_ROWS)
        qt, _ = solve_layer(chain, weight[rows], LayerStats(torch.empty(0, 0), 0), spec, damp)
        weight[rows] = qt.dequantize()
        parts.append(qt)
    return QuantizedTensor.stack(parts)


def _install(module: nn.Module, qt: QuantizedTensor, delta: torch.Tensor | None) -> QuantizedTensor:
    """Set a solved layer's weight to its dequantized value and add the bias its chain adds (stored as fp16, like
    every float parameter); its QuantizedTensor."""
    if delta is not None:
        bias = delta if module.bias is None else module.bias.data + delta
        module.bias = nn.Parameter(bias.to(FLOAT_DTYPE).float())
    module.weight.data = qt.dequantize()  # a tied head changes with its table
    return qt


def _round_float_params(model: nn.Module, quantized: set[str]) -> None:
    """Everything but the quantized weights (their layers' own biases included) is stored in FLOAT_DTYPE: round it
    now so saved and in-memory models agree."""
    later = []  # a streamed model's parameters still on disk: rounded when read
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in quantized or not name.endswith(".weight"):
            if p.is_meta:
                later.append(name)
            else:
                p.data = p.data.to(FLOAT_DTYPE).float()
    if later:
        round_on_load(model, later, FLOAT_DTYPE)


def pack_model(model: nn.Module, qtensors: dict[str, QuantizedTensor]) -> None:
    """Swap each quantized nn.Linear for a QuantLinear holding the packed codes (an embedding table for a
    QuantEmbedding, and a head tied to it for a QuantLinear on the same buffers)."""
    adapter = adapter_for(model)
    tied = adapter.embed in qtensors and adapter.tied(model)
    for name, qt in qtensors.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            model.set_submodule(name, QuantEmbedding.from_quantized(qt, scale=adapter.table_scale(module)))
        else:
            model.set_submodule(name, QuantLinear.from_quantized(qt, module.bias))
    if tied:
        model.set_submodule(adapter.head, model.get_submodule(adapter.embed).tied_head())


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


def parameter_count(model: nn.Module) -> int:
    """Weights of the model as its float form has them, a tied tensor once: each QuantLinear's rows × columns
    (and bias) and every other parameter. What bits per parameter of the whole file divide by."""
    count, seen, inside = 0, set(), []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, QuantLinear):
            inside.append(name)
            if id(m.qweight) not in seen:
                seen.add(id(m.qweight))
                count += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
            continue
        count += sum(p.numel() for p in m.parameters(recurse=False) if id(p) not in seen and not seen.add(id(p)))
    return count
