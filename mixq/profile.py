"""`Profile`: layer × candidate → (exact storage bits, estimated damage). Saved as JSON so that allocation can be
rerun for any budget without the model."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from .capture import LayerStats
from .formats import QuantizedTensor, QuantSpec
from .plan import Candidate
from .sensitivity import get_estimator
from .solvers import get_solver
from .solvers.bias import compensation, solve_stats

VERSION = 1
PROFILE_ROWS = 512  # damage is estimated on at most this many rows of each layer (rows are independent given H);
# 256 rows cut the profile by a quarter but gave SmolLM2 a worse 3.0 bpw plan (pydoc 15.73 against 15.56, novel 61.2
# against 59.6)


# (group, grid, scale bits) of the default candidates, each at every width: "min" grids (free fp16 offset) beat
# integer zeros and symmetric grids at every width on SmolLM2, and double-quantized 6-bit scale codes make groups
# of 32 and 64 cheap. Each entry costs one solver call per layer group: whole rows (as costly as the three
# others together on 576-wide rows) come in only where no group divides a layer's rows (`layer_costs`).
DEFAULT_FORMATS = ((32, "min", 6), (64, "min", 6), (192, "min", 16))


DEFAULT_SOLVER = "gptq-act+comq"  # GPTQ in act order, then coordinate descent: 8.6 % lower pydoc ppl than plain
# "gptq" for the same 2.5 bpw plan on SmolLM2 (benchmarks/results/solvers.md); profiled as gptq-act (profile_solver)


def default_candidates(solver: str = DEFAULT_SOLVER, bits=(2, 3, 4, 5, 6, 8), groups=None, grid: str = "min",
                       formats=DEFAULT_FORMATS) -> list[Candidate]:
    """Every width × format; `groups` instead gives plain fp16-scale formats of that `grid` and those groups."""
    if groups is not None:
        formats = [(g, grid, 16) for g in groups]
    return [Candidate(QuantSpec.of(b, g, k, sb), solver) for b in bits for g, k, sb in formats]


TABLE_BITS = (4, 6, 8)  # the embedding table and the output head (--include-embeddings)


def gguf_candidates(solver: str = DEFAULT_SOLVER) -> list[Candidate]:
    """The formats that are ggml block types (export.gguf.GGML_TYPES), for `--gguf-compatible`."""
    from .export.gguf import gguf_specs

    return [Candidate(spec, solver) for spec in gguf_specs()]


def ct_candidates(solver: str = DEFAULT_SOLVER) -> list[Candidate]:
    """The formats compressed-tensors stores exactly (export.compressed.ct_specs), for
    `--compressed-tensors-compatible`."""
    from .export.compressed import ct_specs

    return [Candidate(spec, solver) for spec in ct_specs()]


def table_candidates(bits=TABLE_BITS, formats=DEFAULT_FORMATS) -> list[Candidate]:
    """Candidates of the embedding table and the head: round-to-nearest (a lookup table has no input Hessian)."""
    return [Candidate(QuantSpec.of(b, g, k, sb), "rtn") for b in bits for g, k, sb in formats]


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

    @property
    def weights(self) -> int:
        return sum(lp.rows * lp.cols for lp in self.layers)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "estimator": self.estimator, "fixed_bytes": self.fixed_bytes,
                           **({"transforms": list(self.transforms)} if self.transforms else {}),
                           "layers": [lp.to_dict() for lp in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        if d.get("version") != VERSION:
            raise ValueError(f"profile version {d.get('version')} is not supported (this mixq reads {VERSION})")
        from .transforms import parse_names

        return cls(d["estimator"], int(d["fixed_bytes"]), [LayerProfile.from_dict(x) for x in d["layers"]],
                   parse_names(d.get("transforms", [])))


def merge_profiles(parts: list[Profile]) -> Profile:
    """One profile from profiles of the same model and calibration with other candidates each (one solver
    profiled at a time, resumable): a candidate's damage does not depend on the other candidates, so every layer
    simply gets the candidates of every part, in order."""
    first = parts[0]
    for p in parts[1:]:
        if (p.estimator, p.fixed_bytes, p.transforms) != (first.estimator, first.fixed_bytes, first.transforms):
            raise ValueError(f"profiles of other settings cannot merge: estimator {p.estimator} against "
                             f"{first.estimator}, transforms {p.transforms} against {first.transforms}")
        if [lp.name for lp in p.layers] != [lp.name for lp in first.layers]:
            raise ValueError("profiles of other layers cannot merge")
    layers = [LayerProfile(lps[0].name, lps[0].rows, lps[0].cols, [c for lp in lps for c in lp.candidates],
                           [b for lp in lps for b in lp.bits], [d for lp in lps for d in lp.damage])
              for lps in zip(*(p.layers for p in parts))]
    return Profile(first.estimator, first.fixed_bytes, layers, first.transforms)


def layer_costs(name: str, rows: int, cols: int, candidates: list[Candidate], has_bias: bool = False) -> LayerProfile:
    """The candidates that fit a rows × cols layer with their exact stored bits (its bias included, where it has
    one or a candidate gives it one); damage still zero. Where none fits (no group size divides the rows), the same
    formats with one group per row."""
    fitting = [c for c in candidates if c.spec.fits(cols)]
    if not fitting:
        fitting = list(dict.fromkeys(Candidate(replace(c.spec, group_size=0), c.solver) for c in candidates))
    return LayerProfile(name, rows, cols, fitting, [c.storage_bits(rows, cols, has_bias) for c in fitting],
                        [0.0] * len(fitting))


def cost_profile(shapes: dict[str, tuple[int, int]], candidates: list[Candidate], fixed_bytes: int,
                 estimator: str, biased: frozenset = frozenset()) -> Profile:
    """A profile with every cost and no damage (zeros): enough to check a budget before the long work. `biased`:
    the layers that have a bias of their own."""
    return Profile(estimator, fixed_bytes, [layer_costs(n, r, c, candidates, n in biased)
                                            for n, (r, c) in shapes.items()])


PROFILE_SKIPS = {"comq"}  # refiners left out while profiling (see profile_solver)
# solvers profiled as another: oac and aespa as the GPTQ they run on other Hessians (solvers.oac, .aespa); comq on
# its own as the clipping search it starts from, its descent left out as it is from every chain. Profiled with its
# descent, comq beat every chain profiled without theirs and took 132 of SmolLM2's 210 layers in the all-solver
# 3.0 bpw allocation, which ended worse than gptq-act+comq alone (15.80 against 15.56; benchmarks/results/solvers.md).
PROFILE_AS = {"oac": "gptq-act", "aespa": "gptq-act", "comq": "clip"}


def profile_skips(name: str) -> frozenset[str]:
    """What profiling leaves out of solver `name`: its refiners in PROFILE_SKIPS, standalone comq's descent
    included. Candidates of several solvers compare fairly only where this is the same for all: in SmolLM2's
    all-solver allocation plain `gptq`, judged against chains judged without their descent, took 69 of 210 layers
    at 3.0 bpw, where it would be applied without the descent they get."""
    return frozenset(r for r in name.split("+") if r in PROFILE_SKIPS)


def check_solver_list(solvers: list[str]) -> None:
    """Raise ValueError where several candidate solvers cannot be compared on one profile: two profiled alike (their
    damages would tie, and the allocation take the first), or chains that differ in what profiling leaves out."""
    alike = [p for p, n in Counter(profile_solver(s) for s in solvers).items() if n > 1]
    if alike:
        raise ValueError(f"the profile cannot tell apart solvers it profiles alike (as {', '.join(alike)}): "
                         "name one of them")
    if len({profile_skips(s) for s in solvers}) > 1:
        raise ValueError("profiling leaves out comq's descent, so the solvers of a list must all end in it or none "
                         "(gptq+comq, not gptq, beside gptq-act+comq)")


def profile_solver(name: str) -> str:
    """The solver that profiles candidates of solver `name`: the chain without the refiners in PROFILE_SKIPS.
    Coordinate descent lowers every format's layer error by a similar share (8–12 % on SmolLM2's layers) at 2–3 ×
    the time of the solve: the allocation ranks formats as well without it, and the apply runs the whole chain."""
    base, *after = name.split("+")
    return "+".join([PROFILE_AS.get(base, base)] + [r for r in after if r not in PROFILE_SKIPS])


def profile_group(weights: dict[str, torch.Tensor], stats: LayerStats, candidates: list[Candidate],
                  estimator: str, fisher: dict[str, torch.Tensor] | None = None,
                  measures: dict | None = None, sample: bool = True, biased: frozenset = frozenset(),
                  judged: dict[str, dict[bool, LayerStats]] | None = None) -> list[LayerProfile]:
    """Profile the linears that share one input. Candidates with the same solver, group size and symmetry are
    solved in one call: rows of every layer × every width stacked (rows are independent given H; bias-compensated
    solvers get the input covariance instead, and are judged on it). A measured estimator (`measures`: layer name →
    measure(dequantized weight)) gets whole layers, not a sample of rows; so does every estimator with `sample`
    False (rows whose weights are too uneven for an even sample: the tables). `biased`: layers with a bias of
    their own. `judged`: per layer, the statistics its candidates are judged on instead of the solver's, without
    and with bias compensation (sensitivity.oac)."""
    estimate = get_estimator(estimator)
    layers = {name: layer_costs(name, *w.shape, candidates, name in biased) for name, w in weights.items()}
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
    cols = next(iter(weights.values())).shape[1]
    fitting = next(iter(layers.values())).candidates
    by_call: dict[tuple, list[Candidate]] = {}
    for c in fitting:
        key = (profile_solver(c.solver), c.spec.group(cols), c.spec.grid, c.spec.scale_bits, c.spec.super_block,
               c.spec.high)
        by_call.setdefault(key, []).append(c)
    for (solver, group, grid, scale_bits, super_block, high), cands in by_call.items():
        stacked = torch.cat([w for c in cands for w in sampled.values()])
        bits = torch.cat([torch.full((w.shape[0],), c.spec.bits) for c in cands for w in sampled.values()])
        solved = solve_stats(stats, cands[0].bias)
        out = get_solver(solver, high=high)(stacked.float(), solved.hessian, group, bits, grid, scale_bits,
                                            super_block)
        r0 = 0
        for c in cands:
            for name, w in sampled.items():
                r1 = r0 + w.shape[0]
                qt = QuantizedTensor(*out[:3], c.spec, out[3], out[4] if high else None).select(slice(r0, r1))
                deq, judge = qt.dequantize(), row_weight[name]
                if measures is not None and c.bias:  # the measured model gets the compensated bias too
                    judge = partial(judge, bias=compensation(w, deq, stats.mean))
                on = judged[name][c.bias] if judged is not None else solved
                layers[name].damage[fitting.index(c)] = estimate(w, deq, on, judge)
                r0 = r1
    return list(layers.values())


def _row_sample(rows: int) -> torch.Tensor:
    """A fixed, evenly spread subset of row indices: a much cheaper estimate of a layer's damage."""
    if rows <= PROFILE_ROWS:
        return torch.arange(rows)
    return torch.linspace(0, rows - 1, PROFILE_ROWS).round().long()
