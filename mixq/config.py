"""`QuantizeConfig`: every parameter of a run in one typed value, JSON with a version (saved in mixq.json).

`mixq.quantize(model, tokenizer, config)` runs it; `mixq quantize` only turns its flags into one. Everything that
can be checked without the model is checked when a config is made, so bad input fails in one line before any work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from .chain import Chain, check_list, parse_list
from .export import EXPORTERS
from .formats import QuantSpec
from .plan import Budget, Candidate, Plan
from .sensitivity import get_estimator
from .solvers import DAMP
from .transforms import TRANSFORMS, parse_names

VERSION = 1


# (group, grid, scale bits[, widths]) of the default candidates, each at every width (or those given): "min" grids
# (free fp16 offset) beat integer zeros and symmetric grids at every width on SmolLM2, and double-quantized 6-bit
# scale codes make groups of 32 and 64 cheap. Level grids at 3 (and 4) bits store no minimum: normal-float levels
# took 98 of SmolLM2's 210 layers at 3.0 bpw, pydoc 15.61 -> 15.37 and botchan 59.9 -> 58.3 (grids.md); levels
# learned per layer (lk, weighted k-means) in their place, one `mixq quantize --bits 3.0`: 14.637 -> 14.544 and
# 44.87 -> 44.18 (default_runs.md). At 2 bits and in groups of 192 they are seldom chosen. Each entry costs one solver
# call per layer group (a level grid's more than a uniform one's: a comparison per level): whole rows (as costly as
# the three others together on 576-wide rows) come in only where no group divides a layer's rows (`layer_costs`).
DEFAULT_FORMATS = ((32, "min", 6), (64, "min", 6), (192, "min", 16), (32, "lk", 6, (3,)), (64, "lk", 6, (3, 4)))


DEFAULT_SOLVER = Chain("gptq-act", ("comq",))  # GPTQ in act order, then coordinate descent: 8.6 % lower pydoc ppl
# than plain "gptq" for the same 2.5 bpw plan on SmolLM2 (benchmarks/results/solvers.md); profiled as gptq-act


def default_specs(bits=(2, 3, 4, 5, 6, 8), groups=None, grid: str = "min", formats=DEFAULT_FORMATS) -> list[QuantSpec]:
    """Every width × format (a format's own widths where it gives them); `groups` instead gives plain fp16-scale
    formats of that `grid` and those groups."""
    if groups is not None:
        formats = [(g, grid, 16) for g in groups]
    return [QuantSpec.of(b, f[0], f[1], f[2]) for b in bits for f in formats if b in (f[3] if len(f) > 3 else bits)]


def default_candidates(solver=DEFAULT_SOLVER, bits=(2, 3, 4, 5, 6, 8), groups=None, grid: str = "min",
                       formats=DEFAULT_FORMATS) -> list[Candidate]:
    """`default_specs`, each filled by `solver`."""
    return [filled(spec, solver) for spec in default_specs(bits, groups, grid, formats)]


def filled(spec: QuantSpec, chain) -> Candidate:
    """`spec` filled by `chain`, or by its grid's own solver where it has one (binary coding)."""
    return Candidate(spec, spec.grid_type.solver or chain)


def parse_formats(text: str) -> tuple[QuantSpec, ...]:
    """--formats: format names (QuantSpec.name), comma-separated; "default" stands for the default menu."""
    specs: list[QuantSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        for spec in default_specs() if item == "default" else [QuantSpec.from_name(item)]:
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise ValueError("--formats: give one or more format names (e.g. default,nf3-g64), comma-separated")
    return tuple(specs)


TABLE_WIDTHS = (4, 5, 6, 8)  # of the embedding table and the output head's candidates


def table_candidates(bits=TABLE_WIDTHS, formats=DEFAULT_FORMATS) -> list[Candidate]:
    """Candidates of the embedding table and the head: round-to-nearest (a lookup table has no input Hessian, so no
    learned grid either)."""
    return [Candidate(spec, "rtn") for spec in default_specs(bits, formats=formats) if not spec.grid_type.learned]


@dataclass(frozen=True)
class Calibration:
    """The calibration windows: `windows` windows of 512 tokens of `text` (a UTF-8 file; None: the pydoc
    calibration split, the project's protocol), plus `generated` windows the model samples itself (data-free
    calibration, interleaved), drawn with `seed`."""

    text: str | None = None
    windows: int = 32
    generated: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.windows < 1:
            raise ValueError(f"--calib-windows: calibration takes at least one window, got {self.windows}")
        if self.generated < 0:
            raise ValueError(f"--calib-generated takes a number of windows ≥ 0 (0: off), got {self.generated}")


@dataclass(frozen=True)
class QuantizeConfig:
    """One run. Exactly one of `budget` (allocate) and `plan` (apply as written).

    solvers      the chains that fill every candidate format (several: each a candidate of every format, the
                 allocation picks per layer); `transforms`, the whole-model transforms applied first
    formats      the candidate formats; empty: the default menu, or the exporter's with `compatible`
    compatible   an exporter's name (mixq.export): allocate among the formats it stores exactly
    tables       the embedding table and the head join the allocation (else they stay fp16 as stored); None: they
                 do unless the budget is a latency (the cost table times the block linears), the exporter of
                 `compatible` stores no quantized table, or the model is streamed (`quantizes_tables`)
    estimator    the damage estimator of the profile (mixq.sensitivity; None: the model's own, models.tasks:
                 oac for a decoder, kl for an encoder)
    damp         the solvers' damping, a fraction of mean(diag H)
    refine       rounds of measured-KL refinement of the allocation (0: off)
    cost_table   a cost table file for a latency budget (None: measured during the run)
    eval_windows perplexity windows before and after (0: no evaluation)
    """

    budget: Budget | None = None
    plan: Plan | None = None
    solvers: tuple[Chain, ...] = (DEFAULT_SOLVER,)
    transforms: tuple[str, ...] = ()
    formats: tuple[QuantSpec, ...] = ()
    compatible: str | None = None
    tables: bool | None = None
    estimator: str | None = None
    calibration: Calibration = Calibration()
    damp: float = DAMP
    refine: int = 0
    cost_table: str | None = None
    eval_windows: int = 64

    def __post_init__(self):
        if (self.budget is None) == (self.plan is None):
            raise ValueError("give exactly one of a budget (--bits, --size, --latency) or a plan (--plan)")
        object.__setattr__(self, "solvers", tuple(Chain.parse(s) if isinstance(s, str) else s for s in self.solvers))
        if not self.solvers or any(c.transforms for c in self.solvers):
            raise ValueError("solvers: one or more per-layer chains (whole-model transforms go in `transforms`)")
        object.__setattr__(self, "transforms", parse_names(self.transforms))
        check_list(self.solvers)
        if self.estimator is not None:
            get_estimator(self.estimator)
        if not 0 < self.damp < 10:
            raise ValueError(f"--damp is a fraction of mean(diag H), above 0 and below 10, got {self.damp:g}")
        if self.refine < 0:
            raise ValueError(f"--refine takes a number of rounds ≥ 0 (0: off), got {self.refine}")
        if self.eval_windows < 0:
            raise ValueError(f"--eval-windows takes a number ≥ 0 (0: no evaluation), got {self.eval_windows}")
        latency = self.budget is not None and self.budget.latency
        if self.cost_table is not None and not latency:
            raise ValueError("--cost-table goes with --latency (a latency budget)")
        if self.plan is not None:
            if self.refine:
                raise ValueError("--refine refines an allocation: it does not go with --plan (a plan is applied "
                                 "as written)")
            if self.transforms:
                raise ValueError('--plan applies the transforms the plan names (its "transforms"), not --solver\'s')
        if self.refine and latency:
            raise ValueError("--refine trades bits, not time: it does not go with a latency budget yet")
        if latency and self.tables:
            raise ValueError("a latency budget keeps the embedding table and the head float (the cost table times "
                             "the block linears only)")
        if self.compatible is not None and self.formats:
            raise ValueError(f"--formats and --compatible {self.compatible} both give the candidate formats: "
                             "give one of them")
        if self.compatible is not None:
            EXPORTERS.lookup(self.compatible)
            if self.plan is not None or latency or self.tables and not EXPORTERS[self.compatible]().table_specs():
                raise ValueError(f"--compatible {self.compatible} chooses the block linears' candidates: it goes "
                                 "with --bits or --size only")
        splitting = [t for t in self.applied_transforms if TRANSFORMS[t].splits_rows]
        if splitting and (self.compatible is not None or latency):
            raise ValueError(f"{splitting[0]} splits rows into two formats, which no export type stores and the cost "
                             "table does not time: use rotate+ with --compatible or --latency")

    @property
    def applied_transforms(self) -> tuple[str, ...]:
        """The whole-model transforms of the run: the plan's, or those the solvers name."""
        return self.plan.transforms if self.plan is not None else self.transforms

    @classmethod
    def from_solver(cls, solver: str, **kw) -> "QuantizeConfig":
        """A config whose solvers and transforms come from a `--solver` value ("rotate+a,rotate+b")."""
        transforms, chains = parse_list(solver)
        return cls(solvers=chains, transforms=transforms, **kw)

    def specs(self) -> list[QuantSpec]:
        """The candidate formats: `formats`, else the exporter's (`compatible`), else the default menu."""
        if self.formats:
            return list(self.formats)
        if self.compatible is not None:
            return EXPORTERS[self.compatible]().specs()
        return default_specs()

    def quantizes_tables(self, streamed: bool = False) -> bool:
        """Whether the embedding table and the head join the allocation: `tables` where given, else unless the
        budget is a latency, the exporter stores no table, or the model is `streamed` (Llama-3's two 128256 × 4096
        tables took a 2-block streamed run's peak from 5.6 to 15.8 GB: not yet within one block's memory)."""
        if self.tables is not None:
            return self.tables
        latency = self.budget is not None and self.budget.latency
        exporter = EXPORTERS[self.compatible]() if self.compatible is not None else None
        return not streamed and not latency and (exporter is None or bool(exporter.table_specs()))

    def table_candidates(self, streamed: bool = False) -> list[Candidate]:
        """The tables' candidates: none where they stay float; the exporter's (`compatible`), or table_candidates()."""
        if not self.quantizes_tables(streamed):
            return []
        if self.compatible is not None:
            return [Candidate(s, "rtn") for s in EXPORTERS[self.compatible]().table_specs()]
        return table_candidates()

    def candidates(self) -> list[Candidate]:
        """Every format filled by every solver, solver after solver (a grid with a solver of its own: by that one,
        once)."""
        specs = self.specs()
        return list(dict.fromkeys(filled(spec, chain) for chain in self.solvers for spec in specs))

    def to_dict(self) -> dict:
        d = {"version": VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "solvers":
                v = [str(c) for c in v]
            elif f.name == "formats":
                v = [s.to_dict() for s in v]
            elif f.name in ("budget", "plan"):
                v = None if v is None else v.to_dict()
            elif f.name == "calibration":
                v = {k.name: getattr(v, k.name) for k in fields(v)}
            elif f.name == "transforms":
                v = list(v)
            d[f.name] = v
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizeConfig":
        if not isinstance(d, dict):
            raise ValueError("a config is a JSON object")
        d = dict(d)
        version = d.pop("version", VERSION)
        if version != VERSION:
            raise ValueError(f"config version {version} is not supported (this mixq reads {VERSION})")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        if d.get("budget") is not None:
            d["budget"] = Budget.from_dict(d["budget"])
        if d.get("plan") is not None:
            d["plan"] = Plan.from_dict(d["plan"])
        if "solvers" in d:
            d["solvers"] = tuple(Chain.parse(s) for s in d["solvers"])
        if "formats" in d:
            d["formats"] = tuple(QuantSpec.from_dict(s) for s in d["formats"])
        if "transforms" in d:
            d["transforms"] = tuple(d["transforms"])
        if "calibration" in d:
            unknown = set(d["calibration"]) - {f.name for f in fields(Calibration)}
            if unknown:
                raise ValueError(f"unknown calibration keys: {sorted(unknown)}")
            d["calibration"] = Calibration(**d["calibration"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "QuantizeConfig":
        return cls.from_dict(json.loads(text))
