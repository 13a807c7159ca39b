"""A run, stage after stage (DESIGN.md): check, calibrate, profile, allocate, refine, apply, pack, save, evaluate.

`quantize(model, tokenizer, config, out)` is the library's entry point and does what `mixq quantize` does; `run`
is its core on a loaded model and calibration windows. Every stage lives in its own module (capture.py, profile.py,
allocate.py, refine.py, apply.py, io.py); this one only orders them. Progress goes to an optional
`step(stage, done, total)` callback.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import data, distributed
from . import device as devices
from .allocate import Allocation, allocate, budget_bits, check_budget
from .apply import apply_plan, block_linear_bits, pack_model, parameter_count
from .capture import IN_MEMORY, Activations, no_step
from .config import QuantizeConfig
from .cost import CostTable
from .models import adapter_for
from .models.stream import streamer_of
from .plan import Candidate, Plan
from .profile import Profile, biased_layers, cost_profile, fixed_bytes, profile_model
from .refine import Refinement, refine
from .runtime.qlinear import QuantLinear
from .transforms import apply_transforms, layer_candidates

Step = Callable[[str, int, int], None]


@dataclass
class Result:
    plan: Plan
    profile: Profile | None
    allocation: Allocation | None
    seconds: dict[str, float] = field(default_factory=dict)
    refinement: Refinement | None = None
    model: nn.Module | None = None  # packed (QuantLinear)
    meta: dict = field(default_factory=dict)  # what mixq.json says of the run (quantize)
    shards: object = None  # a streamed run's packed blocks, written as the apply made them (io.BlockShards)


def quantize(model, tokenizer, config: QuantizeConfig, out: str | Path | None = None,
             step: Step = no_step, stream: bool = False, device: str | None = None,
             activations_on_disk: bool = False) -> Result:
    """What `mixq quantize` does, as a library call. `model`: a .gguf file or a Hugging Face folder (None: the
    bundled default), loaded here with its tokenizer (`stream`: its weights read from disk block by block,
    models.stream), or a loaded transformers model with its `tokenizer`. `device`: where the run computes (cpu,
    cuda, cuda:N; default: cuda where torch sees a GPU, else cpu). `activations_on_disk`: the hidden states between
    blocks in memory-mapped files beside `out` (capture.Activations), for long calibrations. Inputs
    are checked before the model loads. With `out`, the packed model is saved there (atomically) with its plan,
    profile, config and report, and the profile is kept beside it while it grows, so that the same call resumes
    after a crash. Under torchrun, the main rank runs the job and deals work to the others (mixq.distributed), which
    load nothing and return None. The model is left packed (`Result.model`)."""
    t0 = time.perf_counter()
    where = devices.resolve(device)
    if activations_on_disk and where.type != "cpu":
        raise ValueError("--activations-on-disk keeps the hidden states on the CPU side: give --device cpu with it")
    if not distributed.start(where).main:
        with devices.computing(where):
            distributed.serve(where)
        return None
    try:
        return _quantize_main(model, tokenizer, config, out, step, stream, where, activations_on_disk, t0)
    finally:
        distributed.dismiss()


def _quantize_main(model, tokenizer, config: QuantizeConfig, out, step: Step, stream: bool, where,
                   activations_on_disk: bool, t0: float) -> Result:
    """quantize's work on the main rank (the only one where there is one)."""
    source = _source(model)
    costs = _check_inputs(config, source, out)
    model, tokenizer = _load(model, tokenizer, stream)
    if streamer_of(model) is not None and out is not None:  # a transform's scratch folder: beside the output
        streamer_of(model).scratch = beside(out, "transformed-partial")
    store = _activations(out) if activations_on_disk else IN_MEMORY
    try:
        with devices.computing(where):
            return _quantize_loaded(devices.place(model, where), tokenizer, config, out, step, source, costs, where,
                                    store, t0)
    finally:
        store.remove()


def beside(out, what: str) -> Path:
    """A run's working file or folder `what` beside its output folder `out`: hidden (.OUT.what), and named after
    it, so that the same run started again finds it."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.{what}"


def _activations(out) -> Activations:
    """Files for the hidden states between blocks: beside `out` (or in the temporary folder)."""
    import tempfile

    if out is None:
        return Activations(Path(tempfile.mkdtemp(prefix="mixq-activations")))
    return Activations(beside(out, "activations-partial"))


def _quantize_loaded(model, tokenizer, config: QuantizeConfig, out, step: Step, source: str, costs, where,
                     store: Activations, t0: float) -> Result:
    """quantize's work once the model is loaded and placed on its device `where`."""
    candidates = config.candidates()
    check_family(model, config, candidates)  # before the calibration is read and the transforms run
    task = adapter_for(model).job
    calib = task.calibration(model, tokenizer, config.calibration.text, config.calibration.windows)
    apply_transforms(model, config.applied_transforms, calib)  # first: everything after sees the new basis
    if config.budget is not None and config.budget.latency and costs is None:
        from .cost import measure

        costs = measure(model, candidates, step)
    preflight(model, config, candidates, costs, source)
    calib = _with_generated(model, tokenizer, calib, config, step)
    before = task.evaluate(model, tokenizer, config.eval_windows, step) if config.eval_windows else None
    checkpoint = _checkpoint(out, source, calib, config, candidates, estimator_of(model, config),
                             streamer_of(model) is not None)
    shards = _block_shards(out, source, calib, config) if streamer_of(model) is not None else None
    result = _stages(model, calib, config, candidates, costs, step, checkpoint, shards, out, store)
    result.seconds["total"] = time.perf_counter() - t0
    result.meta = _describe(model, result, config, source, calib, costs)
    if out is not None:
        _save(model, tokenizer, result, Path(out), config, costs)
        if checkpoint:
            checkpoint.remove()
        if result.shards is not None:
            result.shards.remove()
            streamer_of(model).remove_scratch()
            if before is not None:  # its blocks were written and released: the saved folder is the model
                from .io import load

                model = result.model = devices.place(load(out), where)
    if before is not None:
        result.meta["eval"] = task.evaluate(model, tokenizer, config.eval_windows, step, before)
    if out is not None:
        _finish_folder(Path(out), result.meta)
    return result


def run(model, calib: torch.Tensor, config: QuantizeConfig, step: Step = no_step, checkpoint=None,
        costs: CostTable | None = None) -> Result:
    """The core of a run on a loaded model (its transforms already applied) and calibration windows: check, then
    profile + allocate (unless the config gives a plan), refine, apply and pack. The model is left packed."""
    adapter_for(model).prepare(model)
    candidates = config.candidates()
    preflight(model, config, candidates, costs)
    return _stages(model, calib, config, candidates, costs, step, checkpoint)


def _stages(model, calib, config: QuantizeConfig, candidates: list[Candidate], costs, step, checkpoint,
            shards=None, out=None, store: Activations = IN_MEMORY) -> Result:
    """Profile, allocate, refine, apply and pack. `shards(plan)`: where a streamed run writes its packed blocks
    (io.BlockShards), or None; `out`: the folder the result will be saved in (its disk is checked before the
    apply); `store`: where the hidden states between blocks live."""
    seconds: dict[str, float] = {}
    prof = alloc = refinement = None
    plan = config.plan
    if plan is None:
        with _timed(seconds, "profile"):
            prof = profile_model(model, calib, candidates, estimator_of(model, config), damp=config.damp, step=step,
                                 checkpoint=checkpoint,
                                 tables=config.table_candidates(streamer_of(model) is not None),
                                 transforms=config.transforms,
                                 store=store)
        with _timed(seconds, "allocate"):
            alloc = allocate(prof, config.budget, costs)
        if config.refine:
            with _timed(seconds, "refine"):
                refinement = refine(model, calib, prof, alloc, config.budget, rounds=config.refine, step=step,
                                    damp=config.damp)
                alloc = refinement.allocation
        plan = alloc.plan
    if out is not None:
        check_disk(model, plan, Path(out))
    written = shards(plan) if shards is not None else None
    with _timed(seconds, "apply"):
        qtensors = apply_plan(model, calib, plan, step, config.damp, written, store)
    pack_model(model, qtensors)
    return Result(plan, prof, alloc, seconds, refinement, model, shards=written)


@contextmanager
def _timed(seconds: dict, stage: str):
    t = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t


def check_plan(model, plan: Plan) -> None:
    """Fail before any calibration: unknown layers, layers that are not linear, formats that do not fit, tables
    given a solver that needs calibration statistics or a learned grid."""
    adapter = adapter_for(model)
    known, tables = set(adapter.layer_names(model)), set(adapter.tables(model))
    for name, cand in plan.layers.items():
        if name not in known | tables:
            near = sorted(known)[:3]
            raise ValueError(f"plan names unknown layer {name!r}; layers look like {', '.join(near)}, …")
        if name in tables and cand.solver.needs:
            from .solvers import SOLVERS

            free = ", ".join(n for n, s in SOLVERS.items() if s.starts and not s.needs)
            raise ValueError(f"plan gives {name} solver {cand.solver}: the embedding table and the head take a "
                             f"solver that needs no calibration statistics ({free})")
        if name in tables and cand.spec.grid_type.learned:
            raise ValueError(f"plan gives {name} {cand.spec.name}: a learned grid fits its levels to a layer's input "
                             "statistics, which the embedding table and the head do not have")
        cols = model.get_submodule(name).weight.shape[1]
        if not cand.spec.fits(cols):
            raise ValueError(f"plan gives {name} {cand.spec.name}, whose groups do not divide its rows of {cols}")


def estimator_of(model, config: QuantizeConfig) -> str:
    """The config's damage estimator, or the model's own (models.tasks: the measured cosine for an encoder), or
    mixq's default (sensitivity.DEFAULT_ESTIMATOR)."""
    from .sensitivity import DEFAULT_ESTIMATOR

    return config.estimator or adapter_for(model).job.estimator or DEFAULT_ESTIMATOR


def check_family(model, config: QuantizeConfig, candidates: list[Candidate]) -> None:
    """Refuse a transform that cannot keep this family's function, or a chain that needs statistics it cannot
    give."""
    from .transforms import TRANSFORMS

    chains = [c.solver for c in (config.plan.layers.values() if config.plan else candidates)]
    transforms = config.plan.transforms if config.plan else config.applied_transforms
    adapter = adapter_for(model)
    adapter.job.check(config)
    for name in transforms:
        TRANSFORMS.lookup(name)().check(adapter)
    needs = frozenset().union(*(c.needs for c in chains))
    adapter.check_needs(needs)
    if streamer_of(model) is not None:
        check_streamed(config)


def check_streamed(config: QuantizeConfig) -> None:
    """Refuse, in one line, what a model streamed from disk cannot run yet: what runs the whole model once per
    probe (the measured estimator, --refine, generated calibration, a latency budget's timing). Backward passes
    stream (stream.recomputing); transforms turn each unit once, into a scratch folder (stream.change_units)."""
    from .sensitivity import get_estimator

    estimator = get_estimator(config.estimator) if config.plan is None and config.estimator else None
    reasons = [
        (estimator is not None and estimator.measured,
         f"the {config.estimator} estimator (it runs the whole model for every probe)"),
        (config.refine, "--refine"), (config.calibration.generated, "--calib-generated"),
        (config.budget is not None and config.budget.latency, "a latency budget"),
    ]
    for hit, what in reasons:
        if hit:
            raise ValueError(f"a streamed model (--stream) cannot take {what} yet")


def preflight(model, config: QuantizeConfig, candidates: list[Candidate], costs: CostTable | None = None,
              source: str | None = None) -> None:
    """Every check that needs the model but no calibration, so bad input fails in seconds, not after the profile:
    a plan's layers and formats; transforms and statistics the family cannot take; what the exporter cannot write
    (`source`: the model's file or folder); a budget no allocation can meet."""
    check_family(model, config, candidates)
    if config.plan is not None:
        check_plan(model, config.plan)
        return
    if config.compatible is not None:
        from .export import EXPORTERS

        EXPORTERS[config.compatible]().check_model(model, Path(source) if source else None)
    adapter = adapter_for(model)
    streamed = streamer_of(model) is not None
    names, extra = adapter.layer_names(model), adapter.tables(model) if config.quantizes_tables(streamed) else []

    def shapes(ns):
        return {n: tuple(model.get_submodule(n).weight.shape) for n in ns}

    estimator = estimator_of(model, config)
    sizes = cost_profile({}, [], fixed_bytes(model, names + extra), estimator)
    for n, shape in shapes(names).items():
        cands = layer_candidates(adapter, config.applied_transforms, n, shape[1], candidates)
        sizes.layers += cost_profile({n: shape}, cands, 0, estimator, biased_layers(model, [n])).layers
    sizes.layers += cost_profile(shapes(extra), config.table_candidates(streamed), 0, estimator,
                                 biased_layers(model, extra)).layers
    sizes.tables = tuple(extra)
    check_budget(sizes, config.budget, costs)


def _source(model) -> str:
    """The path a run's model comes from (mixq.json's "source": the GGUF export builds on it)."""
    if model is None or isinstance(model, (str, Path)):
        from .models.load import resolve

        return str(resolve(None if model is None else str(model)))
    return str(getattr(model, "name_or_path", "") or "")


def _check_inputs(config: QuantizeConfig, source: str, out) -> CostTable | None:
    """The files a config names and the output folder, before the model loads; the cost table, read."""
    from .io import check_out_dir, read_file

    if config.calibration.text is not None:
        data.read_text(config.calibration.text)
    if out is not None:
        check_out_dir(out, source)
    return None if config.cost_table is None else CostTable.from_json(read_file(config.cost_table, "cost table"))


def _load(model, tokenizer, stream: bool = False):
    if model is None or isinstance(model, (str, Path)):
        from .models import load_model

        model, tokenizer, _ = load_model(None if model is None else str(model), stream=stream)
    elif stream:
        raise ValueError("stream a model by its path: a loaded model is in memory already")
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer (the calibration text is tokenized with it)")
    return adapter_for(model).prepare(model), tokenizer


def _with_generated(model, tokenizer, calib: torch.Tensor, config: QuantizeConfig, step: Step) -> torch.Tensor:
    """The calibration windows with `config.calibration.generated` windows the model samples itself, interleaved
    (data.mixed)."""
    cal = config.calibration
    if not cal.generated:
        return calib
    gen = data.generated_windows(model, data.start_token(tokenizer, model), cal.generated, calib.shape[1],
                                 seed=cal.seed, step=lambda done, total: step("generate", done, total))
    return data.mixed(calib, gen)


def _checkpoint(out, source: str, calib: torch.Tensor, config: QuantizeConfig, candidates, estimator: str,
                streamed: bool):
    """Where the profile is kept while it grows: beside `out`, keyed by everything that decides it, so that the
    same run started again after a crash resumes from the blocks already profiled."""
    if out is None or config.plan is not None:
        return None
    from .capture import FISHER_WINDOWS
    from .checkpoint import Checkpoint, run_key
    from .sensitivity.kl import KL_LENGTH, KL_WINDOWS

    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    key = run_key(source, calib, candidates, estimator, fisher_windows=FISHER_WINDOWS,
                  kl_tokens=[KL_WINDOWS, KL_LENGTH], tables=[c.name for c in config.table_candidates(streamed)],
                  transforms=list(config.transforms),
                  damp=config.damp)
    return Checkpoint(beside(out, "profile-partial.json"), key)


DISK_MARGIN = 1.05  # the saved folder's size over the plan's tensors (headers, config, tokenizer, profile)


def check_disk(model, plan: Plan, out: Path) -> None:
    """Refuse, before the apply, a plan whose saved model the output's disk cannot hold (its exact size: every
    stored tensor)."""
    import shutil

    biased = biased_layers(model, plan.layers)
    need = fixed_bytes(model, list(plan.layers)) + sum(
        c.storage_bits(*model.get_submodule(n).weight.shape, n in biased) for n, c in plan.layers.items()) // 8
    where = next(p for p in (out, *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need * DISK_MARGIN > free:
        raise ValueError(f"the quantized model needs {need * DISK_MARGIN / 1e9:.2f} GB on the disk of {out}, which "
                         f"has {free / 1e9:.2f} GB free; free some space or choose another --out")


def _block_shards(out, source: str, calib: torch.Tensor, config: QuantizeConfig):
    """Where a streamed run writes its packed blocks as the apply makes them (beside `out`), as a function of the
    plan: keyed by the model, the calibration and the plan, so that the same run started again keeps them."""
    if out is None:
        return None
    from .checkpoint import run_key
    from .io import BlockShards

    def shards(plan: Plan) -> BlockShards:
        key = run_key(source, calib, [], "", plan=plan.to_json(), damp=config.damp)
        return BlockShards(beside(out, "blocks-partial"), key)
    return shards


def _describe(model, result: Result, config: QuantizeConfig, source: str, calib: torch.Tensor, costs) -> dict:
    """What mixq.json says of a run: its config, source, budget, calibration, real bpw, seconds, shapes."""
    qbits, weights = block_linear_bits(model)
    cal = config.calibration
    meta = {"version": 1, "source": source, "budget": _budget_text(config, result.profile),
            "calibration": {"file": cal.text or "pydoc calibration split", "windows": int(calib.shape[0]),
                            "generated_windows": cal.generated, "length": int(calib.shape[1])},
            "bpw": qbits / weights, "block_linear_weights": weights, "parameters": parameter_count(model),
            "seconds": result.seconds,
            "shapes": {n: [m.out_features, m.in_features] for n, m in model.named_modules()
                       if isinstance(m, QuantLinear)}, "config": config.to_dict()}
    adapter = adapter_for(model)
    tables = {n: result.plan.layers[n].spec.name for n in (adapter.embed, adapter.head) if n in result.plan.layers}
    if tables:
        meta["tables"] = tables
    if result.refinement is not None:
        r = result.refinement
        meta["refine"] = {"kl_before": r.kl_before, "kl_after": r.kl_after, "measured": r.measured,
                          "trades": r.trades}
    if costs is not None:
        from .cost import token_seconds

        meta["latency"] = {"predicted_ms": costs.predicted(result.profile, result.plan) * 1000,
                           "measured_ms": token_seconds(model) * 1000, "float_ms": costs.float_token * 1000,
                           "threads": costs.threads}
    return meta


def _budget_text(config: QuantizeConfig, profile) -> str:
    """The budget as mixq.json and the printed title say it; a bits budget with tables says their share and the
    size the whole comes to."""
    budget = config.budget
    if budget is None:
        return "hand-written plan"
    if budget.bits is None or profile is None or not profile.tables:
        return str(budget)
    size = budget_bits(profile, budget) // 8 + profile.fixed_bytes
    return f"{budget}, the tables {budget.table_bits:g}, spent over both: {size / 1e6:.2f} MB"


def _save(model, tokenizer, result: Result, out: Path, config: QuantizeConfig, costs) -> None:
    from .io import save_quantized

    extra = {"profile.json": result.profile.to_json()} if result.profile is not None else {}
    if costs is not None:
        extra["cost.json"] = costs.to_json()
    save_quantized(model, tokenizer, result.plan, out, result.meta, extra, result.shards)
    files = [f for f in out.iterdir() if f.is_file() and f.name != "mixq.json"]
    result.meta["file_bytes"] = sum(f.stat().st_size for f in files)
    result.meta["weight_bytes"] = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")


def _finish_folder(out: Path, meta: dict) -> None:
    """mixq.json with what the save could not know (the folder's size, the evaluation), then the report."""
    from .io import atomic_write_text
    from .report import write_report

    atomic_write_text(out / "mixq.json", json.dumps(meta, indent=1))
    write_report(out)
