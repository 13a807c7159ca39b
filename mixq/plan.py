"""Typed, JSON-serialisable `Candidate`, `Plan` and `Budget`."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from .chain import Chain
from .formats import QuantSpec

VERSION = 1
BIAS_BITS = 16  # biases are stored as fp16 (io.FLOAT_DTYPE)
TABLE_BITS = 6.5  # what the embedding table and the head add to a bits budget, per weight: about llama.cpp's Q6_K
# (6.56 bits) for an output table. The allocation spends the whole over blocks and tables: on SmolLM2 at 3.0 bpw
# that beats the table held at 6.24 bits on both texts at a smaller file (benchmarks/results/embeddings.md)
TABLE_BITS_ALONE = ("--table-bits goes with --bits: under --size the tables share the bytes with the block linears, "
                    "and a latency budget keeps them float")


@dataclass(frozen=True)
class Candidate:
    """A storage format plus the solver chain that fills it (`Chain`: "gptq-act", "gptq-act+comq+bias"; its text
    is parsed on construction). A candidate's chain has no transforms: those change the whole model (Plan)."""

    spec: QuantSpec
    solver: Chain = Chain("gptq")

    def __post_init__(self):
        if isinstance(self.solver, str):
            object.__setattr__(self, "solver", Chain.parse(self.solver))
        if not isinstance(self.solver, Chain):
            raise ValueError(f"a candidate's solver is a chain such as gptq-act+comq, got {self.solver!r}")
        if self.solver.transforms:
            raise ValueError(f"{self.solver}: transforms change the whole model, not one layer; a plan names them "
                             'in its "transforms"')
        own = self.spec.grid_type.solver
        if own is not None and str(self.solver) != own:
            raise ValueError(f"{self.spec.name} is fitted by its own solver, {own}, not {self.solver}")
        from .grids import OWN_SOLVERS

        if own is None and self.solver.solver in OWN_SOLVERS:
            raise ValueError(f"{self.solver.solver} fits only its own grid's formats, not {self.spec.name}")

    @property
    def name(self) -> str:
        return f"{self.solver}:{self.spec.name}"

    @property
    def bias(self) -> bool:
        """Bias compensation (solvers.bias): the layer stores a bias, whose bits count."""
        return self.solver.bias

    def storage_bits(self, rows: int, cols: int, has_bias: bool = False) -> int:
        """Exact stored bits of a rows × cols linear: its format's, plus its bias where it has one (`has_bias`)
        or gets one."""
        return self.spec.storage_bits(rows, cols) + (rows * BIAS_BITS if has_bias or self.bias else 0)

    def to_dict(self) -> dict:
        return {"solver": str(self.solver), **self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        d = dict(d)
        solver = d.pop("solver", "gptq")
        return cls(QuantSpec.from_dict(d), solver)


@dataclass(frozen=True)
class Budget:
    """Exactly one of: average bits per weight of the block linears (`bits`), bytes of the whole saved model
    (`bytes`), seconds per decoded token (`seconds`), or a fraction of the float model's time per token
    (`of_float`); the last two through a measured cost table (cost.py). With `bits`, where the embedding table and
    the head are quantized, `table_bits` is what they add per weight: the budget is the stored bits of a model
    whose block linears average `bits` and whose tables average `table_bits`, which the exact allocation spends
    over all of them together (as it spends `bytes`)."""

    bits: float | None = None
    bytes: int | None = None
    seconds: float | None = None
    of_float: float | None = None
    table_bits: float | None = None

    def __post_init__(self):
        given = [v for v in (self.bits, self.bytes, self.seconds, self.of_float) if v is not None]
        if len(given) != 1:
            raise ValueError("a budget is bits per weight, a size or a latency: exactly one of them")
        if self.bits is not None and not 0 < self.bits <= 32:
            raise ValueError(f"bits per weight must be in (0, 32], got {self.bits}")
        if self.bits is None and self.table_bits is not None:
            raise ValueError(TABLE_BITS_ALONE)
        if self.bits is not None and self.table_bits is None:
            object.__setattr__(self, "table_bits", TABLE_BITS)
        if self.table_bits is not None and not 0 < self.table_bits <= 32:
            raise ValueError(f"--table-bits must be in (0, 32], got {self.table_bits:g}")
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"size must be positive, got {self.bytes}")
        if (self.seconds is not None and self.seconds <= 0) or (self.of_float is not None and self.of_float <= 0):
            raise ValueError("a latency budget must be positive")

    @property
    def latency(self) -> bool:
        return self.seconds is not None or self.of_float is not None

    @classmethod
    def parse(cls, bits: float | None = None, size: str | None = None, latency: str | None = None,
              table_bits: float | None = None) -> "Budget":
        if latency is not None:
            m = re.fullmatch(r"\s*([0-9.]+)\s*(x|×|ms|s)\s*", latency, re.IGNORECASE)
            if not m:
                raise ValueError(f"cannot read latency {latency!r}: write e.g. 0.6x (of the float model's time per "
                                 "token) or 25ms (per token)")
            value, unit = float(m.group(1)), m.group(2).lower()
            if unit in ("x", "×"):
                return cls(of_float=value, table_bits=table_bits)
            return cls(seconds=value / 1000 if unit == "ms" else value, table_bits=table_bits)
        if size is None:
            return cls(bits=bits, table_bits=table_bits)
        m = re.fullmatch(r"\s*([0-9.]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", size, re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot read size {size!r}: write e.g. 60MB or 58MiB")
        unit = (m.group(2) or "B").lower()
        mult = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}[unit]
        return cls(bytes=int(float(m.group(1)) * mult), table_bits=table_bits)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        unknown = set(d) - {"bits", "bytes", "seconds", "of_float", "table_bits"}
        if unknown:
            raise ValueError(f"unknown budget keys: {sorted(unknown)}")
        return cls(**d)

    def __str__(self) -> str:
        if self.bits is not None:
            return f"{self.bits:g} bits per weight"
        if self.bytes is not None:
            return f"{self.bytes / 1e6:.2f} MB"
        if self.seconds is not None:
            return f"{self.seconds * 1000:g} ms per token"
        return f"{self.of_float:g} × the float model's time per token"


@dataclass(frozen=True)
class Plan:
    """Layer name → chosen candidate; plain JSON that a user can write or edit by hand. `transforms`: the
    whole-model transforms (mixq.transforms, e.g. "rotate") applied to the float model before its layers were
    quantized."""

    layers: dict[str, Candidate] = field(default_factory=dict)
    transforms: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"version": VERSION, **({"transforms": list(self.transforms)} if self.transforms else {}),
                "layers": {k: c.to_dict() for k, c in self.layers.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or "layers" not in d:
            raise ValueError("a plan is a JSON object with a 'layers' mapping")
        unknown = set(d) - {"version", "layers", "transforms"}
        if unknown:
            raise ValueError(f"unknown plan keys: {sorted(unknown)}")
        if d.get("version", VERSION) != VERSION:
            raise ValueError(f"plan version {d['version']} is not supported (this mixq reads {VERSION})")
        layers = d["layers"]
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise ValueError("a plan's 'layers' maps each layer name to an object like "
                             '{"solver": "gptq", "bits": 3, "group_size": 64, "symmetric": false}')
        from .transforms import parse_names

        out = {}
        for name, c in layers.items():
            try:
                out[name] = Candidate.from_dict(c)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return cls(out, parse_names(d.get("transforms", [])))
