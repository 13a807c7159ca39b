"""The latency cost model: measured seconds of one decode step (one row of x, QuantLinear's kernel) of each format on
each block-linear shape, on this machine; the seconds per token of everything else in the model (attention,
norms, the head…), measured by decoding with every block linear replaced by a stub; and the float model's own
seconds per token. A plan's predicted time per token is `rest` plus its formats' seconds over the block linears.

`mixq calibrate-cost` measures a table and saves it (JSON); `mixq quantize --latency 0.6x` (or `--latency 25ms`)
allocates under it and reports the predicted against the measured decode time.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .formats import QuantSpec, quantize
from .runtime.qlinear import QuantLinear

VERSION = 1
REPEATS = 30  # timed calls per (format, shape); the median is kept
DECODE_TOKENS = 32  # decoded tokens per timing of a whole model


def _key(rows: int, cols: int) -> str:
    return f"{rows}x{cols}"


@dataclass
class CostTable:
    machine: str
    threads: int
    rest: float  # seconds per decoded token outside the block linears
    float_token: float  # seconds per decoded token of the float model
    formats: dict[str, dict[str, float]] = field(default_factory=dict)  # spec name → "rows x cols" → seconds

    def seconds(self, spec: QuantSpec, rows: int, cols: int) -> float:
        try:
            return self.formats[spec.name][_key(rows, cols)]
        except KeyError:
            raise ValueError(f"the cost table has no time for {spec.name} on {rows} × {cols} layers: run "
                             "`mixq calibrate-cost` on this model") from None

    def predicted(self, profile, plan) -> float:
        """Seconds per token of `plan` (block linears of `profile`)."""
        return self.rest + sum(self.seconds(plan.layers[lp.name].spec, lp.rows, lp.cols) for lp in profile.layers
                               if lp.name in plan.layers)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "machine": self.machine, "threads": self.threads, "rest": self.rest,
                           "float_token": self.float_token, "formats": self.formats}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CostTable":
        try:
            d = json.loads(text)
            if d.get("version") != VERSION:
                raise ValueError
            return cls(d["machine"], int(d["threads"]), float(d["rest"]), float(d["float_token"]), d["formats"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"not a mixq cost table (version {VERSION}): run `mixq calibrate-cost`") from None


def median_seconds(fn, x, repeats: int = REPEATS, warmup: int = 1) -> float:
    """The median time of `fn(x)` over `repeats` calls after `warmup` untimed ones, without autograd."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


class _Stub(nn.Module):
    """Stands in for a block linear when the rest of the model is timed: the right shape, next to no work."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def token_seconds(model: nn.Module, tokens: int = DECODE_TOKENS) -> float:
    """Seconds per decoded token (greedy, batch 1, after a 32-token prompt)."""
    from .eval.speed import speed

    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    return 1 / speed(model, prompt, tokens).decode_tps


def measure(model: nn.Module, candidates, step=None) -> CostTable:
    """Time the float model's decode, its decode with stub block linears (`rest`), and the format of every
    candidate on every block-linear shape it may take there (profile.layer_costs: whole rows where no group
    divides), on random weights: the time does not depend on the values."""
    from .models import adapter_for
    from .profile import layer_costs

    names = adapter_for(model).layer_names(model)
    linears = {n: model.get_submodule(n) for n in names}
    float_token = token_seconds(model)
    try:
        for n, lin in linears.items():
            model.set_submodule(n, _Stub(lin.out_features))
        rest = token_seconds(model)
    finally:
        for n, lin in linears.items():
            model.set_submodule(n, lin)
    table = CostTable(platform.processor() or platform.machine(), torch.get_num_threads(), rest, float_token)
    shapes = sorted({tuple(lin.weight.shape) for lin in linears.values()})
    gen = torch.Generator().manual_seed(0)
    for k, (rows, cols) in enumerate(shapes):
        w = torch.randn(rows, cols, generator=gen)
        x = torch.randn(1, cols, generator=gen)
        for spec in {c.spec for c in layer_costs("", rows, cols, candidates).candidates}:
            layer = QuantLinear.from_quantized(quantize(w, spec))
            table.formats.setdefault(spec.name, {})[_key(rows, cols)] = median_seconds(layer, x)
        if step:
            step("cost", k + 1, len(shapes))
    return table


def layer_seconds(table: CostTable, lp) -> np.ndarray:
    """Seconds per token of each of a LayerProfile's candidates."""
    return np.array([table.seconds(c.spec, lp.rows, lp.cols) for c in lp.candidates])
