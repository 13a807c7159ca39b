"""`Profile`: layer × candidate → (exact storage bits, estimated damage). Saved as JSON so that allocation can be
rerun for any budget without the model."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .capture import LayerStats
from .formats import QuantizedTensor, QuantSpec
from .plan import Candidate
from .sensitivity import get_estimator
from .solvers import get_solver

VERSION = 1
PROFILE_ROWS = 512  # damage is estimated on at most this many rows of each layer (rows are independent given H)


def default_candidates(solver: str = "gptq", bits=(2, 3, 4, 5, 6, 8), groups=(64, 192, 0),
                       symmetric: bool = False) -> list[Candidate]:
    return [Candidate(QuantSpec(b, g, symmetric), solver) for b in bits for g in groups]


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

    @property
    def weights(self) -> int:
        return sum(lp.rows * lp.cols for lp in self.layers)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "estimator": self.estimator, "fixed_bytes": self.fixed_bytes,
                           "layers": [lp.to_dict() for lp in self.layers]})

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        if d.get("version") != VERSION:
            raise ValueError(f"profile version {d.get('version')} is not supported (this mixq reads {VERSION})")
        return cls(d["estimator"], int(d["fixed_bytes"]), [LayerProfile.from_dict(x) for x in d["layers"]])


def cost_profile(shapes: dict[str, tuple[int, int]], candidates: list[Candidate], fixed_bytes: int,
                 estimator: str) -> Profile:
    """A profile with every cost and no damage (zeros): enough to check a budget before the long work."""
    layers = []
    for name, (rows, cols) in shapes.items():
        fitting = [c for c in candidates if c.spec.fits(cols)]
        if not fitting:
            raise ValueError(f"no candidate fits {name} (rows of {cols} weights); add a whole-row (group 0) one")
        layers.append(LayerProfile(name, rows, cols, fitting, [c.spec.storage_bits(rows, cols) for c in fitting],
                                   [0.0] * len(fitting)))
    return Profile(estimator, fixed_bytes, layers)


def profile_group(weights: dict[str, torch.Tensor], stats: LayerStats, candidates: list[Candidate],
                  estimator: str, fisher: dict[str, torch.Tensor] | None = None) -> list[LayerProfile]:
    """Profile the linears that share one input. Candidates with the same solver, group size and symmetry are
    solved in one call: rows of every layer × every width stacked (rows are independent given H)."""
    estimate = get_estimator(estimator)
    full = weights
    weights = {name: w[_row_sample(w.shape[0])] for name, w in weights.items()}
    row_weight = {name: (fisher[name][_row_sample(w.shape[0])] * (w.shape[0] / _row_sample(w.shape[0]).numel())
                         if fisher is not None else None) for name, w in full.items()}
    cols = next(iter(weights.values())).shape[1]
    fitting = [c for c in candidates if c.spec.fits(cols)]
    if not fitting:
        raise ValueError(f"no candidate fits rows of {cols} weights; add a whole-row (group 0) candidate")
    results: dict[tuple[str, Candidate], float] = {}
    by_call: dict[tuple, list[Candidate]] = {}
    for c in fitting:
        by_call.setdefault((c.solver, c.spec.group(cols), c.spec.symmetric), []).append(c)
    for (solver, group, sym), cands in by_call.items():
        stacked = torch.cat([w for c in cands for w in weights.values()])
        bits = torch.cat([torch.full((w.shape[0],), c.spec.bits) for c in cands for w in weights.values()])
        codes, scales, zeros = get_solver(solver)(stacked.float(), stats.hessian, group, bits, sym)
        r0 = 0
        for c in cands:
            for name, w in weights.items():
                r1 = r0 + w.shape[0]
                qt = QuantizedTensor(codes[r0:r1], scales[r0:r1], zeros[r0:r1], c.spec)
                results[name, c] = estimate(w, qt.dequantize(), stats, row_weight[name])
                r0 = r1
    return [LayerProfile(name, w.shape[0], cols, fitting, [c.spec.storage_bits(*w.shape) for c in fitting],
                         [results[name, c] for c in fitting]) for name, w in full.items()]


def _row_sample(rows: int) -> torch.Tensor:
    """A fixed, evenly spread subset of row indices: a much cheaper estimate of a layer's damage."""
    if rows <= PROFILE_ROWS:
        return torch.arange(rows)
    return torch.linspace(0, rows - 1, PROFILE_ROWS).round().long()
