"""Block-by-block execution over the calibration set, collecting per-layer statistics.

Memory: one block's weights plus the hidden states of the calibration set (windows × length × width), never the
whole model's activations. As in GPTQ's `llama_sequential`: catch block 0's inputs with a hook that stops the
forward pass, then run each block on its own.

The statistics a solver or an estimator may need (`Solver.needs`, `Estimator.needs`), by name:
    INPUT           H = E[x xᵀ] and E[x] of the layer's input (every layer; `hessians`)
    ATTENTION       the value projection's attention-aware Hessians, one per key-value head (`attention_hessians`)
    JUDGE           judge(weight) → the block's output error with this layer set to `weight` (`block_judge`)
    OUTPUT_HESSIAN  the output-adaptive Hessian E_t[‖g_t‖² x_t x_tᵀ] (`output_adaptive_hessians`: backward passes)
    OUTPUT_FISHER   the diagonal Fisher of each layer's output (`output_fisher`)
    OUTPUT_ENERGY   ‖∂L/∂y_t‖² of each token at each layer's output, with the first inputs kept (`output_energy`)
"""
from __future__ import annotations

import math
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .models import Adapter, adapter_for, tasks
from .models.stream import recomputing

BATCH = 8  # windows per block forward
# a decoder's calibration windows that get a backward pass (OUTPUT_FISHER, OUTPUT_ENERGY, OUTPUT_HESSIAN)
FISHER_WINDOWS = tasks.FISHER_WINDOWS
JUDGE_WINDOWS = 8  # calibration windows a block judge runs

INPUT, ATTENTION, JUDGE = "input", "attention", "judge"
OUTPUT_HESSIAN, OUTPUT_FISHER, OUTPUT_ENERGY = "output_hessian", "output_fisher", "output_energy"


class _Stop(Exception):
    pass


def no_step(stage: str, done: int, total: int) -> None:
    """The progress callback `step(stage, done, total)` of a caller who wants none."""


@dataclass
class LayerStats:
    """What capture collected for one layer (the INPUT part shared by the linears of a group): H = E[x xᵀ]
    (cols × cols), token count, the input mean E[x] (cols; None where not collected), and what else its solver
    asked for (None where not)."""

    hessian: torch.Tensor
    tokens: int
    mean: torch.Tensor | None = None
    inputs: torch.Tensor | None = None  # the first inputs themselves (tokens × cols), where asked for (`keep`)
    output_hessian: torch.Tensor | None = None  # OUTPUT_HESSIAN (cols × cols)
    attention: torch.Tensor | None = None  # ATTENTION (kv heads × cols × cols)
    judge: Callable[[torch.Tensor], float] | None = None  # JUDGE
    # what solvers derive from these statistics, kept while they live (e.g. GPTQ's factor of H⁻¹, which profiling
    # reuses for every format); fresh in a copy (dataclasses.replace)
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:  # (sent to another rank: without what was derived here)
        return {k: v for k, v in vars(self).items() if k != "memo"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, memo={})

    @classmethod
    def of(cls, stats: "LayerStats | torch.Tensor") -> "LayerStats":
        """`stats`, or the statistics of a layer whose only statistic is the Hessian `stats`."""
        return stats if isinstance(stats, LayerStats) else cls(stats.float(), 0)

    def covariance(self) -> torch.Tensor:
        """E[(x − μ)(x − μ)ᵀ] = H − μμᵀ: the output error left once a bias absorbs the mean error (solvers.bias)."""
        if self.mean is None:
            raise ValueError("these statistics carry no input mean")
        return self.hessian - torch.outer(self.mean, self.mean)


@dataclass(frozen=True)
class BlockCall:
    """What the model passes a block beside its hidden states (masks, rotary tables, ...), caught from one batch:
    positional arguments after the hidden states, and keywords. Blocks of one model may differ (Gemma's sliding-
    window layers get their own mask and rotary table)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def caught(cls, args: tuple, kwargs: dict) -> "BlockCall":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
        return cls(tuple(args[1:]), kwargs)

    def fit(self, n: int) -> tuple[tuple, dict]:
        """The call for a batch of n windows: tensors with a batch dimension (masks) cut to n."""
        return tuple(_fit(v, n) for v in self.args), {k: _fit(v, n) for k, v in self.kwargs.items()}


def _fit(v, n: int):
    if isinstance(v, torch.Tensor) and v.dim() >= 3 and v.shape[0] > n:
        return v[:n]
    if isinstance(v, tuple):
        return tuple(_fit(t, n) for t in v)
    return v


class Activations:
    """Where the hidden states between blocks live (windows × length × width: a block's inputs, its outputs): in
    memory, or, with a `folder`, in files there, memory-mapped (pages the kernel writes back and drops when memory
    runs short), for calibrations longer than memory. Each named buffer is one file, reused from block to block;
    `remove` deletes them."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else None

    def buffer(self, name: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """A tensor of `shape` backed by file `name` (None in memory: the caller makes its own)."""
        if self.folder is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path, numel = self.folder / f"{name}.bin", math.prod(shape)
        if not path.exists() or path.stat().st_size != numel * dtype.itemsize:  # (never shrunk under a mapping
            with open(path, "ab") as f:                                        # still in use: same shape, reused)
                f.truncate(numel * dtype.itemsize)
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(*shape)

    def next(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """The buffer for the outputs of block i (the inputs of block i + 1), given its inputs x: files x0 and x1
        in turn."""
        return self.buffer(f"x{(i + 1) % 2}", x.shape, x.dtype)

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


IN_MEMORY = Activations()


def block_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor,
                 store: Activations = IN_MEMORY) -> tuple[torch.Tensor, list[BlockCall]]:
    """Hidden states entering block 0 for every window (windows × length × width; in `store`'s buffer "x0"), and
    each block's call. The blocks do not run: while the calls are caught each passes its input on unchanged, and
    the model stops at block 0 once every block's call is known (at the last block, on the first batch)."""
    blocks = adapter.block_list(model)
    calls: list[BlockCall | None] = [None] * len(blocks)
    xs = []
    into = {}

    def keep(x):
        if not into:
            into["x"] = store.buffer("x0", (len(ids), *x.shape[1:]), x.dtype)
            into["at"] = 0
        if into["x"] is None:
            xs.append(x)
        else:
            into["x"][into["at"]:into["at"] + len(x)] = x
            into["at"] += len(x)

    def catch(i):
        def hook(_module, args, kwargs):
            if i == 0:
                keep(args[0] if args else kwargs["hidden_states"])
            if calls[i] is None:
                calls[i] = BlockCall.caught(args, kwargs)
            if calls[-1] is not None:
                raise _Stop
        return hook

    def passed(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    handles = [b.register_forward_pre_hook(catch(i), with_kwargs=True) for i, b in enumerate(blocks)]
    for b in blocks:
        b.forward = passed
    try:
        with torch.no_grad():
            for batch in ids.split(BATCH):
                try:
                    model(batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            del b.forward
    return (torch.cat(xs) if into["x"] is None else into["x"]), calls


def run_block(block: nn.Module, x: torch.Tensor, call: BlockCall, out: torch.Tensor | None = None) -> torch.Tensor:
    """The block's outputs for every window, BATCH windows at a time (written into `out` where given: an
    Activations buffer)."""
    outs, at = [], 0
    with torch.no_grad():
        for xb in x.split(BATCH):
            args, kw = call.fit(xb.shape[0])
            y = block(xb, *args, **kw)
            y = y[0] if isinstance(y, tuple) else y
            if out is None:
                outs.append(y)
            else:
                out[at:at + len(y)] = y
                at += len(y)
    return torch.cat(outs) if out is None else out


def float_block_stats(model: nn.Module, adapter: Adapter, ids: torch.Tensor, keep: int = 0):
    """(block index, block, {group leader: LayerStats}) for every block, each run on the outputs of the block
    before it as that block is (float, unless the caller changed it in between); `keep`: as hessians'."""
    x, calls = block_inputs(model, adapter, ids)
    for i, block in enumerate(adapter.block_list(model)):
        with hessians(block, adapter, keep) as stats:
            y = run_block(block, x, calls[i])
        yield i, block, stats
        x = y


def residual_covariance(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """E[x̂ x̂ᵀ] (float64, width × width) of the residual stream as every block's norms read it, x̂ the stream
    normalised before the norm's scale (adapter.normalised), over every token of `ids` and every norm of
    `adapter.reads` (transforms.resq)."""
    total = {"sum": None, "n": 0}

    def hook(norm, args):
        x = adapter.normalised(norm, args[0].reshape(-1, args[0].shape[-1]).float()).double()
        total["sum"] = x.T @ x if total["sum"] is None else total["sum"] + x.T @ x
        total["n"] += x.shape[0]

    handles = [block.get_submodule(norm).register_forward_pre_hook(hook)
               for block in adapter.block_list(model) for norm, _ in adapter.reads]
    try:
        with torch.no_grad():
            for batch in ids.split(BATCH):
                model(batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return total["sum"] / total["n"]


@contextmanager
def hessians(block: nn.Module, adapter: Adapter, keep: int = 0):
    """Collect H = E[x xᵀ] and E[x] of the input of each group of linears while the block runs, and with `keep`
    the first `keep` inputs themselves (LayerStats.inputs).

    Yields a dict group-leader name → LayerStats, filled as the block runs.
    """
    stats: dict[str, LayerStats] = {}
    handles = []

    def make(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            xtx = x.T @ x  # float32 product, float64 running sum (added in place: no float64 copy of the product)
            total = x.sum(0).double()
            s = stats.get(name)
            if s is None:
                s = stats[name] = LayerStats(xtx.double(), x.shape[0], total, x[:keep].clone() if keep else None)
            else:
                s.hessian += xtx
                s.tokens += x.shape[0]
                s.mean += total
                if keep and len(s.inputs) < keep:
                    s.inputs = torch.cat([s.inputs, x[:keep - len(s.inputs)]])
        return hook

    for group in adapter.groups:
        handles.append(block.get_submodule(group[0]).register_forward_pre_hook(make(group[0])))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        for s in stats.values():  # (divided in place: a wide layer's float64 sum is not copied)
            s.hessian = s.hessian.div_(max(s.tokens, 1)).float()
            s.mean = (s.mean / max(s.tokens, 1)).float()


@contextmanager
def attention_hessians(block: nn.Module, adapter: Adapter):
    """The value projection's attention-aware Hessians (ATTENTION, after aespa) while the block runs: for each
    key-value head g, H_g = E_t[x̄_ht x̄_htᵀ] over tokens t and the query heads h that read g, x̄_ht = Σ_s A_hts x_s
    the input averaged by head h's attention probabilities, so that tr(ΔW_g H_g ΔW_gᵀ) is the error a change ΔW_g
    of g's rows makes in the attention output (averaged over every QUERY_STRIDE-th token t). The probabilities
    come from the query and key states the model's own attention function receives (adapter.watch_attention).

    Yields a dict {value projection name: kv heads × cols × cols}, filled as the block runs (float32 at exit)."""
    sums: dict = {}
    out: dict[str, torch.Tensor] = {}

    def add(x, query, key, mask, scaling, causal):
        _add_attention_hessians(sums, x, query, key, mask, scaling, causal)

    with adapter.watch_attention(block, add):
        yield out
    if sums:
        out[adapter.value] = (sums["h"] / sums["n"]).float()


QUERY_STRIDE = 2  # attention_hessians averages over every other query token (neighbours' x̄ are alike)


def _add_attention_hessians(sums: dict, x, query, key, mask, scaling, causal: bool) -> None:
    """Add Σ x̄ x̄ᵀ per key-value head (and the count) of one batch to `sums` (see attention_hessians), over every
    QUERY_STRIDE-th query token."""
    b, heads, t, dim = query.shape
    kv = key.shape[1]
    rows = torch.arange(0, t, QUERY_STRIDE)
    scores = query[:, :, rows].float() @ key.float().repeat_interleave(heads // kv, 1).transpose(-1, -2)
    scores = scores * (dim ** -0.5 if scaling is None else scaling)
    if mask is not None:
        mask = mask[..., :t, :t][..., rows, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif causal and t > 1:
        scores = scores.masked_fill(torch.arange(t)[None, :] > rows[:, None], float("-inf"))
    xbar = torch.softmax(scores, -1) @ x.float()[:, None]  # b × heads × rows × cols
    xbar = xbar.view(b, kv, heads // kv, len(rows), -1).transpose(0, 1).reshape(kv, -1, xbar.shape[-1])
    h = (xbar.transpose(1, 2) @ xbar).double()
    sums["h"] = h if "h" not in sums else sums["h"] + h
    sums["n"] = sums.get("n", 0) + xbar.shape[1]


def block_judge(block: nn.Module, x: torch.Tensor, y: torch.Tensor, call: BlockCall):
    """judge(linear)(weight) → Σ‖block(x) − y‖² with the linear's weight set to `weight` (restored after): how far
    the block's output moves from `y` (its float output) for one layer's candidate weights, the layers before it
    as they are (JUDGE: a solver that judges its candidates by the block's output)."""
    def judge(lin: nn.Linear):
        def loss(weight: torch.Tensor) -> float:
            kept, lin.weight.data = lin.weight.data, weight
            try:
                return float(((run_block(block, x, call) - y) ** 2).sum())
            finally:
                lin.weight.data = kept
        return loss
    return judge


def capture_block(block: nn.Module, adapter: Adapter, prefix: str, x: torch.Tensor, call: BlockCall,
                  needs: dict[str, frozenset[str]], extra: dict[str, dict] | None = None,
                  out: torch.Tensor | None = None):
    """Run `block` (full name `prefix`) on `x`: (its outputs, {layer: LayerStats}) for each of its linears named
    in `needs` (full names → the statistics asked for): the INPUT statistics of its group, the block's ATTENTION
    Hessians for the value projection and a JUDGE where asked, and the model-level ones of `extra` (full name →
    {statistic: value}, from `model_statistics`). `out`: where the outputs go (run_block)."""
    local = {n: f"{prefix}.{n}" for n in adapter.linears if f"{prefix}.{n}" in needs}
    wants = set().union(*(needs[f] for f in local.values()))
    attend = ATTENTION in needs.get(f"{prefix}.{adapter.value}", ())
    with hessians(block, adapter) as groups, \
            (attention_hessians(block, adapter) if attend else nullcontext({})) as attn:
        y = run_block(block, x, call, out)
    judge = block_judge(block, x[:JUDGE_WINDOWS], y[:JUDGE_WINDOWS], call) if JUDGE in wants else None
    stats = {}
    for group in adapter.groups:
        for n in group:
            if n not in local:
                continue
            more = dict((extra or {}).get(local[n], {}))
            if n in attn:
                more[ATTENTION] = attn[n]
            if judge is not None and JUDGE in needs[local[n]]:
                more[JUDGE] = judge(block.get_submodule(n))
            stats[local[n]] = replace(groups[group[0]], **more) if more else groups[group[0]]
    return y, stats


def fisher_windows(adapter: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """The calibration windows that get backward passes: the first FISHER_WINDOWS of a decoder's; every one of an
    encoder's (short windows, one embedding each: models.tasks)."""
    n = adapter.job.fisher_windows
    return ids if n is None else ids[:n]


def model_statistics(model: nn.Module, adapter: Adapter, ids: torch.Tensor, needs: dict[str, frozenset[str]],
                     step=None) -> "OutputHessians":
    """The statistics of `needs` (full layer name → names) that take the whole model (OUTPUT_HESSIAN: backward
    passes over the first FISHER_WINDOWS windows of `ids`), given a block at a time (OutputHessians.block)."""
    return OutputHessians(model, adapter, ids, [n for n, wanted in needs.items() if OUTPUT_HESSIAN in wanted], step)


def _backward_passes(model: nn.Module, ids: torch.Tensor, names: list[str], on_grad, step=None,
                     stage: str = "fisher", embed_name: str | None = None, inputs: bool = True) -> int:
    """One backward pass of the task's loss (a decoder's next-token NLL summed over a window; an encoder's probes of
    its embedding's curvature, one pass each: models.tasks) per window, calling on_grad(name, x, g) with
    the input x (None unless `inputs`) and output gradient g (tokens × features, detached) of each module in
    `names`, and of the embedding's output as `embed_name` if given. No weight gradients are kept (the graph starts
    at the embeddings). A streamed model recomputes each block in its backward pass (stream.recomputing). Returns
    the number of tokens."""
    tokens, handles = 0, []

    def make(name):
        def fwd(_module, args, out):
            if out.requires_grad:
                x = args[0].detach() if inputs else None
                out.register_hook(lambda g: on_grad(name, None if x is None else x.reshape(-1, x.shape[-1]),
                                                    g.detach().reshape(-1, g.shape[-1])))
        return fwd

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(make(n)))
    embed = model.get_input_embeddings()
    task = adapter_for(model).job
    try:
        with recomputing(model) as streamed:
            for k, window in enumerate(ids.split(1)):
                x = embed(window).detach().requires_grad_(True)
                losses = task.loss(model, x, window, k)
                for i in range(len(losses)):
                    x.grad = None
                    if streamed and i:  # (a fresh graph a loss: a retained one would keep every recomputed block)
                        losses = task.loss(model, x, window, k)
                    losses[i].backward(retain_graph=not streamed and i < len(losses) - 1)
                    if embed_name:
                        on_grad(embed_name, None, x.grad.reshape(-1, x.shape[-1]))
                    tokens += window.numel()
                if step:
                    step(stage, k + 1, len(ids))
    finally:
        for h in handles:
            h.remove()
    return tokens


def output_fisher(model: nn.Module, adapter: Adapter, ids: torch.Tensor, step=None,
                  tables: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of each block linear's output: F_i = E_t[(∂L/∂y_ti)²], L the next-token NLL summed
    over a window. One backward pass per window. `tables` adds the head's output (over the vocabulary: the logits)
    and the embedding's (over its width).
    """
    names = adapter.layer_names(model) + ([adapter.head] if tables and adapter.head else [])
    sums = {}

    def add(name, _x, g):
        sq = g.float().pow(2).sum(0).double()
        sums[name] = sq if name not in sums else sums[name] + sq

    tokens = _backward_passes(model, ids, names, add, step, embed_name=adapter.embed if tables else None,
                              inputs=False)
    return {n: (s / tokens).float() for n, s in sums.items()}


def output_energy(model: nn.Module, adapter: Adapter, ids: torch.Tensor, step=None) -> dict[str, torch.Tensor]:
    """‖∂L/∂y_t‖² of each block linear's output y_t for every token of `ids`, in order (windows · length), L the
    next-token NLL summed over a window; one backward pass per window (OUTPUT_ENERGY)."""
    parts: dict[str, list[torch.Tensor]] = {}

    def add(name, _x, g):
        parts.setdefault(name, []).append(g.float().pow(2).sum(1))

    _backward_passes(model, ids, adapter.layer_names(model), add, step, inputs=False)
    return {n: torch.cat(p) for n, p in parts.items()}


def output_adaptive_hessians(model: nn.Module, adapter: Adapter, ids: torch.Tensor, names: list[str],
                             step=None) -> dict[str, torch.Tensor]:
    """OAC (Edalati et al. 2024, arXiv 2405.17009): the Hessian of the output cross-entropy with respect to a
    linear's weight rows, under the Fisher approximation and shared across rows: H = E_t[‖g_t‖² x_t x_tᵀ] /
    E_t[‖g_t‖²], g_t = ∂L/∂y_t. Tokens whose output moves the loss weigh more than in XᵀX. One cols × cols matrix
    per name in `names` (float32), every one at once (the apply takes them a block at a time: OutputHessians)."""
    sums: dict = {}

    def add(name, x, g):
        _add_weighted(sums, name, x, g.float().pow(2).sum(1))

    _backward_passes(model, ids, names, add, step, stage="gradients")
    return {n: _mean(sums[n]) for n in sums}


def _add_weighted(sums: dict, name: str, x: torch.Tensor, energy: torch.Tensor) -> None:
    """Add one window's Σ_t e_t x_t x_tᵀ (float64) and Σ_t e_t to sums[name]."""
    xs = x.float() * energy.sqrt()[:, None]
    xtx = (xs.T @ xs).double()
    h, w = sums.get(name, (None, 0.0))
    sums[name] = (xtx if h is None else h + xtx, w + float(energy.sum()))


def _mean(total: tuple) -> torch.Tensor:
    h, w = total
    return (h / max(w, 1e-30)).float()


class OutputHessians:
    """OUTPUT_HESSIAN a block at a time, for the apply: memory for one block's matrices, not the model's (cols × cols
    for every layer: 39 GB of float32 for Llama-3-8B). The backward passes keep only each layer's per-token output
    energies ‖g_t‖² (a number a token, output_adaptive_hessians' weights); each block's layer inputs x_t come from
    running the float block, as it is before the apply changes it, on the float hidden states of those windows,
    which this carries from block to block (as the backward passes' forward computed them: a window at a time)."""

    def __init__(self, model: nn.Module, adapter: Adapter, ids: torch.Tensor, names: list[str], step=None):
        self.adapter, self.names = adapter, frozenset(names)
        self.energy: dict[str, list[list[torch.Tensor]]] = {}  # name → window → its losses' energies
        self.windows = len(fisher_windows(adapter, ids))
        self.x = None  # the float hidden states entering the next block, for those windows
        if not names:
            return
        at = {"window": 0}

        def add(name, _x, g):
            per = self.energy.setdefault(name, [[] for _ in range(self.windows)])
            per[at["window"]].append(g.float().pow(2).sum(1))

        def counted(stage, done, total):
            at["window"] = done
            if step:
                step(stage, done, total)

        _backward_passes(model, fisher_windows(adapter, ids), sorted(self.names), add, counted, stage="gradients",
                         inputs=False)

    def block(self, block: nn.Module, prefix: str, x: torch.Tensor, call: BlockCall) -> dict[str, dict]:
        """{full name: {OUTPUT_HESSIAN: H}} for the block's layers among `names`, and the float stream carried past
        it. Call it for every block in order while the block holds its float weights; `x`: the block's inputs in
        the apply (the first block's begin the float stream)."""
        if not self.names:
            return {}
        if self.x is None:
            self.x = x[:self.windows].clone()
        local = {f"{prefix}.{n}": block.get_submodule(n) for n in self.adapter.linears
                 if f"{prefix}.{n}" in self.names}
        seen, sums, ys = {}, {}, []

        def keep(name):
            def hook(_module, args, _out):
                seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in local.items()]
        try:
            for k in range(self.windows):
                ys.append(run_block(block, self.x[k:k + 1], call))
                for name in local:
                    for energy in self.energy[name][k]:
                        _add_weighted(sums, name, seen[name], energy)
        finally:
            for h in handles:
                h.remove()
        self.x = torch.cat(ys)
        return {n: {OUTPUT_HESSIAN: _mean(sums[n])} for n in sums}
