"""`Profile`: layer × candidate → (exact storage bits, estimated damage). Saved as JSON so that allocation can be
rerun for any budget without the model."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import torch
from torch import nn

from .capture import IN_MEMORY, OUTPUT_ENERGY, OUTPUT_FISHER, Activations, LayerStats, block_inputs, \
    fisher_windows, hessians, no_step, output_energy, output_fisher, run_block
from .chain import Chain
from .config import table_candidates
from .distributed import Dealer, Ranks
from .io import FLOAT_DTYPE
from .models import adapter_for
from .models.stream import hold
from .plan import Candidate
from .sensitivity import DEFAULT_ESTIMATOR, get_estimator
from .sensitivity.kl import KLProbe
from .solvers import DAMP, Rows, added_bias, build, prepared
from .transforms import layer_candidates

VERSION = 1
PROFILE_ROWS = 512  # damage is estimated on at most this many rows of each layer (rows are independent given H);
# 256 rows cut the profile by a quarter but gave SmolLM2 a worse 3.0 bpw plan (pydoc 15.73 against 15.56, novel 61.2
# against 59.6)


@dataclass
class LayerProfile:
    name: str
    rows: int
    cols: int
    candidates: list[Candidate]  # those whose group fits this layer's rows
    bits: list[int]  # exact stored bits of each candidate
    damage: list[float]

    def to_dict(self) -> dict:
        return {"name": self.name, "rows": self.rows, "cols": self.cols, "bits": self.bits, "damage": self.damage,
                "candidates": [c.to_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerProfile":
        return cls(d["name"], d["rows"], d["cols"], [Candidate.from_dict(c) for c in d["candidates"]],
                   [int(b) for b in d["bits"]], [float(x) for x in d["damage"]])


@dataclass
class Profile:
    estimator: str
    fixed_bytes: int  # bytes of everything saved besides the block linears (embeddings, norms, head)
    layers: list[LayerProfile] = field(default_factory=list)
    transforms: tuple[str, ...] = ()  # the whole-model transforms of the model profiled (its plans apply them)
    tables: tuple[str, ...] = ()  # those of `layers` that are the embedding table and the head (not block linears)

    @property
    def weights(self) -> int:
        """Weights of the block linears (what bits per weight divide by)."""
        return sum(lp.rows * lp.cols for lp in self.layers if lp.name not in self.tables)

    @property
    def table_weights(self) -> int:
        return sum(lp.rows * lp.cols for lp in self.layers if lp.name in self.tables)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "estimator": self.estimator, "fixed_bytes": self.fixed_bytes,
                           **({"transforms": list(self.transforms)} if self.transforms else {}),
                           **({"tables": list(self.tables)} if self.tables else {}),
                           "layers": [lp.to_dict() for lp in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("version") != VERSION:
            version = d.get("version") if isinstance(d, dict) else None
            raise ValueError(f"profile version {version} is not supported (this mixq reads {VERSION})")
        from .transforms import parse_names

        try:
            return cls(d["estimator"], int(d["fixed_bytes"]), [LayerProfile.from_dict(x) for x in d["layers"]],
                       parse_names(d.get("transforms", [])), tuple(d.get("tables", ())))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a mixq profile: {type(e).__name__} {e}") from None


def merge_profiles(parts: list[Profile]) -> Profile:
    """One profile from profiles of the same model and calibration with other candidates each (one solver
    profiled at a time, resumable): a candidate's damage does not depend on the other candidates, so every layer
    simply gets the candidates of every part, in order."""
    first = parts[0]
    for p in parts[1:]:
        if (p.estimator, p.fixed_bytes, p.transforms, p.tables) != (first.estimator, first.fixed_bytes,
                                                                   first.transforms, first.tables):
            raise ValueError(f"profiles of other settings cannot merge: estimator {p.estimator} against "
                             f"{first.estimator}, transforms {p.transforms} against {first.transforms}")
        if [lp.name for lp in p.layers] != [lp.name for lp in first.layers]:
            raise ValueError("profiles of other layers cannot merge")
    layers = [LayerProfile(lps[0].name, lps[0].rows, lps[0].cols, [c for lp in lps for c in lp.candidates],
                           [b for lp in lps for b in lp.bits], [d for lp in lps for d in lp.damage])
              for lps in zip(*(p.layers for p in parts))]
    return Profile(first.estimator, first.fixed_bytes, layers, first.transforms, first.tables)


def layer_costs(name: str, rows: int, cols: int, candidates: list[Candidate], has_bias: bool = False) -> LayerProfile:
    """The candidates that fit a rows × cols layer with their exact stored bits (its bias included, where it has
    one or a candidate gives it one); damage still zero. Where none fits (no group size divides the rows), the same
    formats with one group per row."""
    fitting = [c for c in candidates if c.spec.fits(cols)]
    if not fitting:
        fitting = list(dict.fromkeys(Candidate(replace(c.spec, group_size=0), c.solver) for c in candidates
                                     if not c.spec.super_block))
    if not fitting:
        names = ", ".join(sorted({c.spec.name for c in candidates}))
        raise ValueError(f"{name}: its rows of {cols} weights hold none of the candidate formats ({names}): "
                         f"super-blocks of {candidates[0].spec.super_block} weights need rows of a multiple of it")
    return LayerProfile(name, rows, cols, fitting, [c.storage_bits(rows, cols, has_bias) for c in fitting],
                        [0.0] * len(fitting))


def cost_profile(shapes: dict[str, tuple[int, int]], candidates: list[Candidate], fixed_bytes: int,
                 estimator: str, biased: frozenset = frozenset()) -> Profile:
    """A profile with every cost and no damage (zeros): enough to check a budget before the long work. `biased`:
    the layers that have a bias of their own."""
    return Profile(estimator, fixed_bytes, [layer_costs(n, r, c, candidates, n in biased)
                                            for n, (r, c) in shapes.items()])


def profile_group(weights: dict[str, torch.Tensor], stats: LayerStats, candidates: list[Candidate],
                  estimator: str, fisher: dict[str, torch.Tensor] | None = None,
                  measures: dict | None = None, sample: bool = True, biased: frozenset = frozenset(),
                  judged: dict[str, dict[bool, LayerStats]] | None = None, damp: float = DAMP,
                  dealer: Dealer | None = None) -> list[LayerProfile]:
    """Profile the linears that share one input. Each candidate is judged by the result of its chain's profiled
    form (Chain.profiled); candidates whose profiled chain, group size, grid and scale storage agree are solved in
    one call: rows of every layer × every width stacked (rows are independent given H), on the statistics the
    chain solves on (bias compensation: the input covariance, on which they are judged too). A measured estimator
    (`measures`: layer name → measure(dequantized weight)) gets whole layers, not a sample of rows; so does every
    estimator with `sample` False (rows whose weights are too uneven for an even sample: the tables). `biased`:
    layers with a bias of their own. `judged`: per layer, the statistics its candidates are judged on instead of
    the solver's, without and with bias compensation (Estimator.judged). `dealer` (several ranks): the calls are
    dealt out, and the damages are in place once it settles (distributed.Dealer)."""
    layers = {name: layer_costs(name, *w.shape, candidates, name in biased) for name, w in weights.items()}
    sampled, row_weight = _sampled_rows(weights, fisher, measures, sample)
    cols = next(iter(weights.values())).shape[1]
    fitting = next(iter(layers.values())).candidates
    by_call: dict[tuple, list[Candidate]] = {}
    for c in fitting:
        key = (c.solver.profiled(), c.spec.group(cols), c.spec.grid, c.spec.scale_bits, c.spec.super_block,
               c.spec.high)
        by_call.setdefault(key, []).append(c)

    def fill(calls, damages):
        for (_, cands), per_cand in zip(calls, damages):
            for c, per_layer in zip(cands, per_cand):
                for name, d in zip(sampled, per_layer):
                    layers[name].damage[fitting.index(c)] = d

    dealer = dealer or Dealer(Ranks())
    for rank, calls in dealer.deal(list(by_call.items()), alone=measures is not None).items():
        dealer.run(rank, _damages, (calls, stats, sampled, row_weight, judged, estimator, damp, measures),
                   partial(fill, calls))
    return list(layers.values())


def _damages(calls: list[tuple], stats: LayerStats, sampled: dict, row_weight: dict, judged, estimator: str,
             damp: float, measures) -> list[list[list[float]]]:
    """profile_group's solver calls ((profiled chain, group, grid, scale bits, super-block, high), candidates):
    for each call, each candidate's damage of each layer of `sampled`."""
    estimate = get_estimator(estimator)
    solving: dict[Chain, tuple] = {}  # each profiled chain's steps and the statistics it solves on, made once
    out = []
    for (chain, group, grid, scale_bits, super_block, high), cands in calls:
        if chain not in solving:
            steps = build(chain, damp)
            solving[chain] = steps, prepared(steps, stats)
        (first, then), solved = solving[chain]
        stacked = torch.cat([w for c in cands for w in sampled.values()])
        bits = torch.cat([torch.full((w.shape[0],), c.spec.bits) for c in cands for w in sampled.values()])
        # a learned grid: one set of levels fitted to the judged rows of every layer that shares the input, so that
        # they are solved in one call as the others are (the apply fits each layer its own: the profile judges a
        # little pessimistically)
        # (the first candidate's rows of `stacked` are every layer's sampled rows once: a view, not a copy)
        once = stacked[:sum(w.shape[0] for w in sampled.values())]
        fmt = Rows(group, bits, grid, scale_bits, super_block, high).for_layer(once, solved)
        solution = first.solve_rows(stacked.float(), solved, fmt, then)
        r0, per_cand = 0, []
        for c in cands:
            per_layer = []
            for name, w in sampled.items():
                r1 = r0 + w.shape[0]
                deq, judge = fmt.stored(solution, c.spec).select(slice(r0, r1)).dequantize(), row_weight[name]
                if measures is not None and c.bias:  # the measured model gets the added bias too
                    judge = partial(judge, bias=added_bias(then, w, deq, solved))
                on = judged[name][c.bias] if judged is not None else solved
                per_layer.append(estimate(w, deq, on, judge))
                r0 = r1
            per_cand.append(per_layer)
        out.append(per_cand)
    return out


def _sampled_rows(weights, fisher, measures, sample: bool):
    """({layer: the rows judged}, {layer: what each judged row counts for, or the layer's measure})."""
    sampled, row_weight = {}, {}
    for name, w in weights.items():
        if measures is not None:
            sampled[name], row_weight[name] = w, measures[name]
            continue
        idx = _row_sample(w.shape[0]) if sample else torch.arange(w.shape[0])
        sampled[name] = w[idx]
        # damages that are sums over rows (fisher, roundoff) count each sampled row for the rows it stands for
        stands_for = torch.full((idx.numel(),), w.shape[0] / idx.numel())
        row_weight[name] = fisher[name][idx] * stands_for if fisher is not None else stands_for
    return sampled, row_weight


def _row_sample(rows: int) -> torch.Tensor:
    """A fixed, evenly spread subset of row indices: a much cheaper estimate of a layer's damage."""
    if rows <= PROFILE_ROWS:
        return torch.arange(rows)
    return torch.linspace(0, rows - 1, PROFILE_ROWS).round().long()


HEADER_BYTES_PER_TENSOR = 256  # safetensors header allowance: name, dtype, shape, offsets of each tensor


def fixed_bytes(model: nn.Module, layer_names: list[str]) -> int:
    """Bytes of model.safetensors that do not depend on the plan: every parameter saved in float (FLOAT_DTYPE),
    all but the block linears' weights and biases (a layer's bias counts in its candidates' bits), plus a header
    allowance for every tensor (3 per quantized linear)."""
    quantized = {f"{n}.{p}" for n in layer_names for p in ("weight", "bias")}
    size = torch.finfo(FLOAT_DTYPE).bits // 8
    floats = [p for n, p in model.named_parameters() if n not in quantized]
    return sum(p.numel() * size for p in floats) + HEADER_BYTES_PER_TENSOR * (len(floats) + 3 * len(layer_names))


def biased_layers(model: nn.Module, names) -> frozenset:
    """Those of `names` whose module has a bias of its own."""
    return frozenset(n for n in names if getattr(model.get_submodule(n), "bias", None) is not None)


def profile_model(model, calib: torch.Tensor, candidates: list[Candidate], estimator: str = DEFAULT_ESTIMATOR, *,
                  damp: float = DAMP, step: Callable = no_step, checkpoint=None, tables: bool | list = False,
                  transforms: tuple[str, ...] = (), store: Activations = IN_MEMORY) -> Profile:
    """Every layer × candidate, block by block; with `tables` (True: config.table_candidates(); or a list of
    candidates), then the embedding table and the head (profile_tables). With a checkpoint
    (checkpoint.Checkpoint), the profile is saved after each block and the blocks an earlier run with the same key
    finished are taken from it (only run forward, to feed the next).
    `transforms`: those applied to the model, which may change a layer's candidates. `store`: where the hidden
    states between blocks live (capture.Activations)."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    names = adapter.layer_names(model)
    prof = Profile(estimator, fixed_bytes(model, names + (adapter.tables(model) if tables else [])),
                   transforms=tuple(transforms))
    done = checkpoint.load() if checkpoint else {}
    dealer = Dealer()
    reads = _Reads(model, adapter, calib, get_estimator(estimator), step, tables)
    x, calls = block_inputs(model, adapter, calib, store)
    for i, block in enumerate(blocks):
        local = [f"{adapter.blocks}.{i}.{n}" for n in adapter.linears]
        if all(n in done for n in local):
            prof.layers += [done[n] for n in local]
            x = reads.skip(block, x, calls[i], store.next(i, x))
        else:
            reads.prepare()
            profiled = []
            with hold(model, i):  # (a streamed model's block read from disk, released after)
                with hessians(block, adapter, reads.keep) as stats:
                    y = run_block(block, x, calls[i], store.next(i, x))
                for group in adapter.groups:
                    weights = {f"{adapter.blocks}.{i}.{n}": block.get_submodule(n).weight.detach() for n in group}
                    cols, st = next(iter(weights.values())).shape[1], stats[group[0]]
                    cands = layer_candidates(adapter, transforms, next(iter(weights)), cols, candidates)
                    profiled += profile_group(weights, st, cands, estimator, damp=damp,
                                              biased=biased_layers(model, weights), dealer=dealer,
                                              **reads.of(block, group, weights, st))
                dealer.settle()  # (several ranks: the others' damages, in place)
            prof.layers += profiled
            x = reads.advance(y)
            if checkpoint:
                checkpoint.save(prof)
        step("profile", i + 1, len(blocks))
    names = adapter.tables(model) if tables else []
    prof.tables = tuple(names)
    if all(n in done for n in names):
        prof.layers += [done[n] for n in names]
    else:
        prof.layers += profile_tables(model, calib, x, reads.table_estimator(), reads.table_fisher(), reads.probe,
                                      None if tables is True else tables)
        if checkpoint:
            checkpoint.save(prof)
    return prof


class _Reads:
    """What the estimator reads beside a layer's input statistics (its `needs`), gathered on first use: the
    output Fisher, the per-token output energy (with each group's first inputs kept), or a KL probe that follows
    the blocks."""

    def __init__(self, model, adapter, calib, estimator, step, tables: bool):
        self.model, self.adapter, self.calib, self.estimator, self.step = model, adapter, calib, estimator, step
        self.tables = bool(tables)
        self.fisher = self.energy = None
        self.probe = KLProbe(model, adapter, calib) if estimator.measured else None
        self.keep = fisher_windows(adapter, calib).numel() if OUTPUT_ENERGY in estimator.needs else 0

    def prepare(self) -> None:
        """Run the backward passes the estimator reads, once, before the first block it profiles (outside the
        block's hold: a streamed model's backward passes load every block in turn)."""
        if self.fisher is None and OUTPUT_FISHER in self.estimator.needs:
            self.fisher = self._output_fisher()
        if self.energy is None and OUTPUT_ENERGY in self.estimator.needs:
            self.energy = output_energy(self.model, self.adapter, fisher_windows(self.adapter, self.calib), self.step)

    def of(self, block, group, weights, stats) -> dict:
        """profile_group's keywords for one group of linears (after `prepare`)."""
        return {"fisher": self.fisher,
                "measures": {n: self.probe.layer(block.get_submodule(m)) for n, m in zip(weights, group)}
                if self.probe else None,
                "judged": {n: self.estimator.judged(stats.inputs, self.energy[n], stats.mean) for n in weights}
                if self.energy is not None else None}

    def _output_fisher(self):
        return output_fisher(self.model, self.adapter, fisher_windows(self.adapter, self.calib), self.step,
                             self.tables)

    def skip(self, block, x, call, out=None):
        """Feed the next block past one whose layers an earlier run profiled."""
        return self.advance(run_block(block, x, call, out))

    def advance(self, y):
        if self.probe:
            self.probe.advance()
        return y

    def table_estimator(self) -> str:
        return self.estimator.tables_as or self.estimator.name

    def table_fisher(self):
        if self.fisher is None and OUTPUT_FISHER in get_estimator(self.table_estimator()).needs:
            self.fisher = self._output_fisher()
        return self.fisher


def profile_tables(model, calib: torch.Tensor, last: torch.Tensor, estimator: str,
                   fisher: dict[str, torch.Tensor] | None, probe: KLProbe | None,
                   candidates: list[Candidate] | None = None) -> list[LayerProfile]:
    """The embedding table and the head × `candidates` (None: table_candidates()). The head's damage is that of a
    linear on the final hidden states (`last`: the last block's outputs, normalised); the table's that of its rows
    the calibration reads, each weighted by how often it is read (and, for fisher, each column by the embedding
    output's Fisher); a tied table gets the sum of both. A measured estimator runs the whole model with the table
    quantized."""
    adapter = adapter_for(model)
    candidates = table_candidates() if candidates is None else candidates
    names = adapter.tables(model)
    out = []
    for name in names:
        with hold(model, name):  # (streamed: the table read for its profile)
            out.append(_profile_table(model, adapter, name, calib, last, estimator, fisher, probe, candidates))
    return out


def _profile_table(model, adapter, name: str, calib, last, estimator: str, fisher, probe,
                   candidates) -> LayerProfile:
    module = model.get_submodule(name)
    w = module.weight.detach()
    if probe is not None:
        return profile_group({name: w}, LayerStats(torch.empty(0, 0), 0), candidates, estimator, None,
                             {name: probe.layer(module, whole=True)})[0]
    lp = layer_costs(name, *w.shape, candidates, getattr(module, "bias", None) is not None)
    parts = []
    if name == adapter.head or adapter.tied(model):  # the head, or a table tied to it
        with torch.no_grad():
            h = model.get_submodule(adapter.norm)(last).reshape(-1, w.shape[1]).float()
        head = fisher[adapter.head] if fisher is not None else None
        parts.append(_profile_rows(name, w, LayerStats(h.T @ h / len(h), len(h)), candidates, estimator, head))
        # (every row: the logits' Fisher sits on a few tokens)
    if name == adapter.embed:
        counts = torch.bincount(calib.reshape(-1), minlength=w.shape[0]).float()
        seen = counts.nonzero().squeeze(1)
        cols = fisher[adapter.embed] if fisher is not None else torch.ones(w.shape[1])
        parts.append(_profile_rows(name, w[seen], LayerStats(torch.diag(cols), int(counts.sum())), candidates,
                                   estimator, counts[seen] / counts.sum()))
    lp.damage = [sum(p[k] for p in parts) for k in range(len(lp.candidates))]
    return lp


def _profile_rows(name: str, w: torch.Tensor, stats: LayerStats, candidates: list[Candidate], estimator: str,
                  row_weight: torch.Tensor | None) -> list[float]:
    """Each candidate's damage of every row of `w` (with `row_weight`: the estimator's weight of each row),
    profiled apply.TABLE_ROWS rows at a time, so that a vocabulary of 128k rows is never copied whole once per
    candidate; damages are sums over rows, a relative estimator's weighted by each part's energy."""
    from .apply import TABLE_ROWS

    energy = get_estimator(estimator).energy
    parts = []
    for start in range(0, w.shape[0], TABLE_ROWS):
        part = w[start:start + TABLE_ROWS]
        weights = None if row_weight is None else {name: row_weight[start:start + TABLE_ROWS]}
        [lp] = profile_group({name: part}, stats, candidates, estimator, weights, sample=False)
        parts.append((lp.damage, float(energy(part, stats)) if energy else 1.0))
    if len(parts) == 1:
        return parts[0][0]
    norm = sum(e for _, e in parts) if energy else 1.0
    return [sum(d[k] * e for d, e in parts) / norm for k in range(len(parts[0][0]))]
