"""The `mixq` command on the tiny model saved as a Hugging Face folder: the happy path writes every file, and each
bad input ends with exit code 2 and an `error:` line, no traceback, and no output folder."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.allocate import budget_bits
from mixq.io import MARKER
from mixq.plan import Budget, Plan
from mixq.profile import Profile
from mixq.runtime.qlinear import QuantLinear

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error(stderr: str) -> str:
    """The error message: from `error: ` to the end (progress bars may come before it)."""
    assert "error: " in stderr, stderr
    return stderr[stderr.index("error: "):]


def _json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def quantized_dir(tiny_hf_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q4"
    res = invoke("quantize", "--model", tiny_hf_dir, "--bits", 4, "--eval-windows", 0, "--calib-windows", 4,
                 "--calib", text_file, "--out", out)
    assert res.exit_code == 0, res.output
    return out


def test_quantize_writes_the_folder(quantized_dir, tiny_hf_dir):
    names = {p.name for p in quantized_dir.iterdir()}
    assert {"mixq.json", "plan.json", "model.safetensors", "report.md", "profile.json", "config.json"} <= names
    assert not [n for n in os.listdir(quantized_dir.parent) if ".partial" in n or ".old" in n]
    meta = json.loads((quantized_dir / MARKER).read_text())
    assert meta["bpw"] <= 4.0
    assert meta["source"] == str(Path(tiny_hf_dir))
    assert meta["calibration"]["windows"] >= 1
    model = mixq.load(quantized_dir)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 16  # 14 block linears, the table, its head
    assert "bits per layer" in (quantized_dir / "report.md").read_text().lower()


def test_eval_prints_one_json_line(quantized_dir, text_file):
    res = invoke("eval", quantized_dir, "--text", text_file)
    assert res.exit_code == 0, res.output
    line = _json_line(res.stdout)
    assert set(line) == {"ppl", "bpw", "file_bits_per_param", "windows"}
    assert line["windows"] == 1  # the ~650-token file is one (short) window
    assert line["bpw"] == pytest.approx(json.loads((quantized_dir / MARKER).read_text())["bpw"], abs=1e-4)
    assert 1 < line["ppl"] < 10_000  # random weights over a 256-token vocabulary: near 256, finite


def test_eval_of_the_float_folder(tiny_hf_dir, text_file):
    res = invoke("eval", tiny_hf_dir, "--text", text_file, "--windows", 1)
    assert res.exit_code == 0, res.output
    line = _json_line(res.stdout)
    assert line["bpw"] == 32.0 and line["windows"] == 1


def test_allocate_from_the_saved_profile_then_apply(quantized_dir, tiny_hf_dir, text_file, tmp_path):
    plan_path = tmp_path / "plan3.json"
    res = invoke("allocate", quantized_dir / "profile.json", "--bits", 3.0, "--out", plan_path)
    assert res.exit_code == 0, res.output
    line = _json_line(res.stdout)
    assert line["bpw"] <= 3.0 and line["plan"] == str(plan_path)
    plan = json.loads(plan_path.read_text())
    assert plan["version"] == 1 and len(plan["layers"]) == 15  # the table beside the 14 block linears
    res = invoke("allocate", quantized_dir / "profile.json", "--bits", 3.0, "--table-bits", 4.2, "--out", plan_path)
    assert res.exit_code == 0, res.output
    assert _json_line(res.stdout)["damage"] > line["damage"]  # a smaller budget: the table's share counts
    res = invoke("allocate", quantized_dir / "profile.json", "--bits", 1.0, "--table-bits", 3, "--out", plan_path)
    assert res.exit_code == 2 and "below the smallest possible model" in _error(res.stderr)
    res = invoke("allocate", quantized_dir / "profile.json", "--bits", 3.0, "--out", plan_path)
    plan = json.loads(plan_path.read_text())

    out = tmp_path / "q3"
    res = invoke("quantize", "--model", tiny_hf_dir, "--plan", plan_path, "--eval-windows", 0, "--calib", text_file,
                 "--out", out)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / MARKER).read_text())
    assert meta["bpw"] == pytest.approx(line["bpw"], abs=1e-4)
    assert json.loads((out / "plan.json").read_text()) == plan

    # the same model may overwrite its own earlier output
    res = invoke("quantize", "--model", tiny_hf_dir, "--plan", plan_path, "--eval-windows", 0, "--calib", text_file,
                 "--out", out)
    assert res.exit_code == 0, res.output


def test_a_plan_reallocated_from_another_budget_s_profile_makes_the_budget_s_own_file(quantized_dir, tiny_hf_dir,
                                                                                      text_file, tmp_path):
    """`mixq allocate` on the 4-bit run's profile, then `--plan`, writes what `quantize --bits 3` writes itself (the
    profile does not depend on the budget): what benchmarks/default_runs.py --share-profile relies on."""
    from safetensors.torch import load_file

    common = ["--model", tiny_hf_dir, "--eval-windows", 0, "--calib-windows", 4, "--calib", text_file]
    res = invoke("allocate", quantized_dir / "profile.json", "--bits", 3.0, "--out", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    res = invoke("quantize", *common, "--plan", tmp_path / "p.json", "--out", tmp_path / "planned")
    assert res.exit_code == 0, res.output
    res = invoke("quantize", *common, "--bits", 3.0, "--out", tmp_path / "direct")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "planned" / "plan.json").read_text() == (tmp_path / "direct" / "plan.json").read_text()
    planned, direct = (load_file(tmp_path / d / "model.safetensors") for d in ("planned", "direct"))
    assert planned.keys() == direct.keys() and len(planned) > 16
    assert all(torch.equal(planned[k], direct[k]) for k in planned)


def test_report_command(quantized_dir):
    (quantized_dir / "report.md").unlink()
    res = invoke("report", quantized_dir)
    assert res.exit_code == 0, res.output
    assert (quantized_dir / "report.md").is_file() and (quantized_dir / "pareto.png").is_file()


# --- bad inputs -------------------------------------------------------------------------------------------------

def _bad_cases(tiny_hf_dir: Path, text_file: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    """name → (arguments, a phrase the error must contain)."""
    rng = torch.Generator().manual_seed(0)
    junk = tmp / "x.gguf"
    junk.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist()))
    truncated = tmp / "y.gguf"
    truncated.write_bytes(b"GGUF" + bytes(torch.randint(0, 256, (300,), generator=rng, dtype=torch.uint8).tolist()))
    empty = tmp / "empty.txt"
    empty.write_text("  \n\n")
    latin = tmp / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    short = tmp / "short.txt"
    short.write_text("the model .\n")
    unknown_plan = tmp / "unknown.json"
    unknown_plan.write_text(json.dumps({"version": 1, "layers": {
        "model.layers.9.mlp.down_proj": {"solver": "rtn", "bits": 4, "group_size": 32, "symmetric": False}}}))
    other = tmp / "other-model"
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"source": "/somewhere/else.gguf"}))
    (other / "plan.json").write_text("{}")
    m = ["--model", tiny_hf_dir, "--eval-windows", 0]
    c = ["--calib", text_file]
    return {
        "missing model": (["--model", tmp / "no-such-model", "--bits", 3, *c], "model not found"),
        "folder without config": (["--model", tmp, "--bits", 3, *c], "config.json"),
        "random .gguf": (["--model", junk, "--bits", 3, *c], "not a GGUF file"),
        "truncated .gguf": (["--model", truncated, "--bits", 3, *c], "corrupt GGUF"),
        "empty calibration": ([*m, "--bits", 3, "--calib", empty], "empty"),
        "missing calibration": ([*m, "--bits", 3, "--calib", tmp / "nope.txt"], "not found"),
        "latin-1 calibration": ([*m, "--bits", 3, "--calib", latin], "UTF-8"),
        "short calibration": ([*m, "--bits", 3, "--calib", short], "at least 16"),
        "impossible budget": ([*m, "--bits", 1.0, *c], "smallest"),
        "impossible size": ([*m, "--size", "10KB", *c], "smallest"),
        "unreadable size": ([*m, "--size", "sixty MB", *c], "cannot read size"),
        "plan with unknown layer": ([*m, "--plan", unknown_plan, *c], "unknown layer"),
        "missing plan": ([*m, "--plan", tmp / "nope.json", *c], "plan file not found"),
        "out holds another model": ([*m, "--bits", 3, *c], "different model"),
        "neither bits nor size": ([*m, *c], "exactly one"),
        "both bits and size": ([*m, "--bits", 3, "--size", "60MB", *c], "exactly one"),
        "plan and bits": ([*m, "--plan", unknown_plan, "--bits", 3, *c], "exactly one"),
        "unknown solver": ([*m, "--bits", 3, "--solver", "awq", *c], "unknown solver 'awq'"),
        "unknown refiner": ([*m, "--bits", 3, "--solver", "gptq+nope", *c], "unknown refiner 'nope'"),
        "negative generated windows": ([*m, "--bits", 3, "--calib-generated", -1, *c], "--calib-generated"),
        "unknown format": ([*m, "--bits", 3, "--formats", "default,nf5-g64", *c], "cannot read format 'nf5-g64'"),
        "empty formats": ([*m, "--bits", 3, "--formats", "", *c], "give one or more format names"),
        "formats and compatible": ([*m, "--bits", 3, "--formats", "nf4-g32", "--compatible", "gguf", *c],
                                   "give one of them"),
        "format no row holds": ([*m, "--bits", 4.5, "--formats", "int4-g32-kmin-dq6-s256", *c],
                                "rows of 64 weights hold none of the candidate formats (int4-g32-kmin-dq6-s256)"),
    }


CASES = ["missing model", "folder without config", "random .gguf", "truncated .gguf", "empty calibration",
         "missing calibration", "latin-1 calibration", "short calibration", "impossible budget", "impossible size",
         "unreadable size", "plan with unknown layer", "missing plan", "out holds another model",
         "neither bits nor size", "both bits and size", "plan and bits", "unknown solver", "unknown refiner",
         "negative generated windows", "unknown format", "empty formats", "formats and compatible",
         "format no row holds"]


def _run_bad(case, tiny_hf_dir, text_file, tmp_path):
    args, phrase = _bad_cases(tiny_hf_dir, text_file, tmp_path)[case]
    out = tmp_path / "other-model" if case == "out holds another model" else tmp_path / "out"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    res = invoke("quantize", *args, "--out", out)
    return res, phrase, out, before


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_cleanly(case, tiny_hf_dir, text_file, tmp_path):
    res, phrase, out, before = _run_bad(case, tiny_hf_dir, text_file, tmp_path)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # not an uncaught exception
    err = _error(res.stderr)
    assert "Traceback" not in res.output
    assert phrase.lower() in " ".join(err.split()).lower(), err
    assert res.stdout == ""
    # nothing written: no output folder, no temporary folders
    if before is None:
        assert not out.exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]


def test_solver_option_fills_every_candidate(tiny_hf_dir, text_file, tmp_path):
    res = invoke("quantize", "--model", tiny_hf_dir, "--bits", 3, "--calib", text_file, "--calib-windows", 2,
                 "--eval-windows", 0, "--solver", "gptq+bias", "--out", tmp_path / "q")
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "q" / "plan.json").read_text())["layers"]
    assert plan.pop("model.embed_tokens")["solver"] == "rtn"  # the table: no statistics to solve on
    assert {c["solver"] for c in plan.values()} == {"gptq+bias"}


def test_generated_calibration_is_recorded_and_changes_the_statistics(tiny_hf_dir, text_file, tmp_path):
    runs, windows = {}, {}
    for n in (0, 3):
        res = invoke("quantize", "--model", tiny_hf_dir, "--bits", 3, "--calib", text_file, "--calib-windows", 2,
                     "--calib-generated", n, "--eval-windows", 0, "--out", tmp_path / f"g{n}")
        assert res.exit_code == 0, res.output
        meta = json.loads((tmp_path / f"g{n}" / MARKER).read_text())["calibration"]
        windows[n] = meta["windows"]
        assert meta["generated_windows"] == n
        runs[n] = json.loads((tmp_path / f"g{n}" / "profile.json").read_text())
    assert windows[3] == windows[0] + 3
    assert runs[0] != runs[3]  # the generated windows reach the profile


def test_errors_are_one_line(tiny_hf_dir, text_file, tmp_path):
    for case in ("missing model", "random .gguf", "plan with unknown layer", "impossible budget"):
        sub = tmp_path / case.replace(" ", "-")
        sub.mkdir()
        res, _, _, _ = _run_bad(case, tiny_hf_dir, text_file, sub)
        assert res.exit_code == 2
        assert len(_error(res.stderr).strip().splitlines()) == 1, res.stderr


def test_plan_layer_without_bits_fails_cleanly(tiny_hf_dir, text_file, tmp_path):
    plan = tmp_path / "nobits.json"
    plan.write_text(json.dumps({"version": 1, "layers": {"model.layers.0.mlp.down_proj": {"solver": "rtn"}}}))
    res = invoke("quantize", "--model", tiny_hf_dir, "--plan", plan, "--eval-windows", 0, "--calib", text_file,
                 "--out", tmp_path / "out")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert _error(res.stderr)


def test_eval_of_a_missing_target(tmp_path):
    res = invoke("eval", tmp_path / "nothing-here")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert _error(res.stderr)


def test_eval_of_an_empty_text(quantized_dir, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    res = invoke("eval", quantized_dir, "--text", empty)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert "empty" in _error(res.stderr)


@pytest.mark.parametrize("args, phrase", [(["--bits", 1.0], "smallest"), ([], "exactly one"),
                                          (["--bits", 3, "--size", "1MB"], "exactly one"),
                                          (["--latency", "0.5x"], "go together")])
def test_allocate_bad_inputs(quantized_dir, tmp_path, args, phrase):
    res = invoke("allocate", quantized_dir / "profile.json", *args, "--out", tmp_path / "p.json")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert phrase in " ".join(_error(res.stderr).split())
    assert not (tmp_path / "p.json").exists()


def test_allocate_missing_profile(tmp_path):
    res = invoke("allocate", tmp_path / "profile.json", "--bits", 3, "--out", tmp_path / "p.json")
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert "profile not found" in " ".join(_error(res.stderr).split())


def test_quantize_with_evaluation(tiny_hf_dir, text_file, tmp_path):
    """The before/after evaluation (pydoc split, by the protocol) lands in mixq.json and the report."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "layers": {
        "model.layers.0.mlp.up_proj": {"solver": "rtn", "bits": 8, "group_size": 32, "symmetric": True}}}))
    out = tmp_path / "q"
    res = invoke("quantize", "--model", tiny_hf_dir, "--plan", plan, "--eval-windows", 1, "--calib", text_file,
                 "--out", out)
    assert res.exit_code == 0, res.output
    ev = json.loads((out / MARKER).read_text())["eval"]
    assert ev["windows"] == 1
    # one 8-bit layer barely moves a random model's perplexity
    assert ev["ppl_after"] == pytest.approx(ev["ppl_before"], rel=0.01)
    assert f"{ev['ppl_after']:.3f}" in (out / "report.md").read_text()


def test_error_keeps_brackets_in_paths(tmp_path):
    missing = tmp_path / "[abc]" / "m"
    res = invoke("quantize", "--model", missing, "--bits", 3, "--out", tmp_path / "out")
    assert res.exit_code == 2
    assert "[abc]" in _error(res.stderr)


def test_generate_streams_a_continuation(quantized_dir):
    res = invoke("generate", quantized_dir, "--prompt", "the model of", "--max-new-tokens", 6)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().startswith("the model of")
    assert len(res.stdout.split()) > 3  # the prompt's three words and what came after


def test_generate_errors(quantized_dir, tmp_path):
    res = invoke("generate", tmp_path / "nothing", "--prompt", "x")
    assert res.exit_code == 2 and "not found" in _error(res.stderr).lower()
    res = invoke("generate", quantized_dir, "--prompt", "x", "--chat")
    assert res.exit_code == 2 and "chat template" in _error(res.stderr)


def test_quantize_with_refinement_records_the_measured_kl(tiny_hf_dir, text_file, tmp_path):
    out = tmp_path / "r"
    res = invoke("quantize", "--model", tiny_hf_dir, "--bits", 3.5, "--eval-windows", 0, "--calib-windows", 4,
                 "--calib", text_file, "--refine", 2, "--sensitivity", "hessian", "--out", out)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / MARKER).read_text())
    r = meta["refine"]
    assert 0 <= r["kl_after"] <= r["kl_before"] and r["measured"] >= 1
    assert "refine" in meta["seconds"]
    prof, plan = (cls.from_json((out / f).read_text()) for cls, f in ((Profile, "profile.json"), (Plan, "plan.json")))
    used = sum(lp.bits[lp.candidates.index(plan.layers[lp.name])] for lp in prof.layers)  # blocks and table
    assert used <= budget_bits(prof, Budget(bits=3.5))
    res = invoke("quantize", "--model", tiny_hf_dir, "--bits", 3.5, "--refine", -1, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "rounds ≥ 0" in _error(res.stderr)
    (tmp_path / "p.json").write_text((out / "plan.json").read_text())
    res = invoke("quantize", "--model", tiny_hf_dir, "--plan", tmp_path / "p.json", "--refine", 1,
                 "--out", tmp_path / "x")
    assert res.exit_code == 2 and "does not go with --plan" in _error(res.stderr)
    assert not (tmp_path / "x").exists()


def test_quantize_with_embeddings_and_refinement(tiny_hf_dir, text_file, tmp_path):
    out = tmp_path / "e"
    res = invoke("quantize", "--model", tiny_hf_dir, "--bits", 4.0, "--eval-windows", 0, "--calib-windows", 4,
                 "--calib", text_file, "--refine", 1, "--out", out)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / MARKER).read_text())
    assert set(meta["tables"]) == {"model.embed_tokens"}  # tied: the head is the table's second use
    assert "tables: model.embed_tokens" in res.stdout
    assert meta["budget"].startswith("4 bits per weight, the tables 6.5, spent over both: ")
    float_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_hf_dir).parameters())
    assert meta["parameters"] == float_params  # the tied table once
    assert meta["weight_bytes"] == (out / "model.safetensors").stat().st_size
    assert f"{meta['weight_bytes'] * 8 / float_params:.3f}" in res.stdout  # the whole file's bits per parameter
    assert "model.embed_tokens" in json.loads((out / "plan.json").read_text())["layers"]
    assert "`model.embed_tokens` int" in (out / "report.md").read_text()
    res = invoke("eval", out, "--text", text_file)
    assert res.exit_code == 0, res.output
    assert 1 < _json_line(res.stdout)["ppl"] < 10_000
    assert _json_line(res.stdout)["file_bits_per_param"] == round(meta["weight_bytes"] * 8 / float_params, 4)


def test_bench_compares_with_the_float_source(quantized_dir, tmp_path):
    res = invoke("bench", quantized_dir, "--prompt-tokens", 16, "--new-tokens", 4)
    assert res.exit_code == 0, res.output
    assert "decode tok/s" in res.stdout and "float (fp32)" in res.stdout and "bits/param)" in res.stdout
    res = invoke("bench", tmp_path)
    assert res.exit_code == 2 and "not a mixq model folder" in _error(res.stderr)


def test_speed_counts_tokens_and_resident_memory(quantized_dir):
    from mixq.eval.speed import resident_bytes, speed

    model = mixq.load(quantized_dir)
    before = resident_bytes(model)
    with warnings.catch_warnings():  # the KV cache by the name this transformers takes (past_key_values: deprecated)
        warnings.simplefilter("error", FutureWarning)
        s = speed(model, torch.randint(0, 256, (1, 16)), 3)
    assert s.prompt_tps > 0 and s.decode_tps > 0
    from mixq.runtime.cpu import kernel

    if kernel() is not None:
        assert s.resident_mb * 1e6 > before  # the decoded kernel tables now count too


def test_quantize_under_a_latency_budget(tiny_hf_dir, text_file, tmp_path):
    out = tmp_path / "lat"
    res = invoke("quantize", "--model", tiny_hf_dir, "--latency", "3x", "--eval-windows", 0, "--calib-windows", 4,
                 "--calib", text_file, "--out", out)
    assert res.exit_code == 0, res.output
    meta = json.loads((out / MARKER).read_text())
    lat = meta["latency"]
    assert lat["predicted_ms"] > 0 and lat["measured_ms"] > 0 and lat["float_ms"] > 0
    assert lat["predicted_ms"] <= 3 * lat["float_ms"] * (1 + 1e-6)
    assert "ms per token: predicted" in res.stdout and (out / "cost.json").is_file()
    # the saved table serves again; an impossible budget names the fastest model; wrong combinations fail early
    res = invoke("quantize", "--model", tiny_hf_dir, "--latency", "0.01x", "--cost-table", out / "cost.json",
                 "--calib", text_file, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "fastest possible model" in _error(res.stderr)
    res = invoke("quantize", "--model", tiny_hf_dir, "--latency", "1x", "--table-bits", 6, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--table-bits goes with --bits" in _error(res.stderr)
    res = invoke("quantize", "--model", tiny_hf_dir, "--bits", 3, "--cost-table", out / "cost.json",
                 "--out", tmp_path / "x")
    assert res.exit_code == 2 and "goes with --latency" in _error(res.stderr)
    res = invoke("allocate", out / "profile.json", "--latency", "2x", "--cost-table", out / "cost.json",
                 "--out", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    res = invoke("quantize", "--model", tiny_hf_dir, "--latency", "soon", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "cannot read latency" in _error(res.stderr)
    assert not (tmp_path / "x").exists()


def test_calibrate_cost_writes_a_table(tiny_hf_dir, tmp_path):
    from mixq.cost import CostTable

    res = invoke("calibrate-cost", "--model", tiny_hf_dir, "--out", tmp_path / "c.json")
    assert res.exit_code == 0, res.output
    table = CostTable.from_json((tmp_path / "c.json").read_text())
    # the rest (all but the block linears) is most of the tiny model's token time; 2x: jitter on a loaded machine
    assert 2 * table.float_token > table.rest > 0 and table.formats


def test_quantize_with_several_solvers_as_candidates(tiny_hf_dir, text_file, tmp_path):
    """--solver a,b: every format once with each solver; the profile holds both, the plan picks per layer."""
    res = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", tiny_hf_dir, "--bits", 3, "--solver", "gptq-act,gptq-act+bias", "--calib", text_file,
        "--calib-windows", 4, "--eval-windows", 0, "--out", tmp_path / "q")])
    assert res.exit_code == 0, res.output
    prof = json.loads((tmp_path / "q" / "profile.json").read_text())
    solvers = [c["solver"] for c in prof["layers"][0]["candidates"]]
    assert solvers.count("gptq-act") == solvers.count("gptq-act+bias") > 0
    damage = prof["layers"][0]["damage"]  # the bias-compensated candidates are judged apart: another damage
    assert damage[solvers.index("gptq-act")] != damage[solvers.index("gptq-act+bias")]
    plan = json.loads((tmp_path / "q" / "plan.json").read_text())
    assert plan["layers"].pop("model.embed_tokens")["solver"] == "rtn"
    assert {c["solver"] for c in plan["layers"].values()} <= {"gptq-act", "gptq-act+bias"}
    res = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", tiny_hf_dir, "--bits", 3, "--solver", "rotate+gptq-act,gptq-act", "--calib", text_file,
        "--out", tmp_path / "x")])
    assert res.exit_code == 2 and "share one whole-model transform" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(app, [str(a) for a in (  # aespa is profiled as gptq-act: their damages would tie
        "quantize", "--model", tiny_hf_dir, "--bits", 3, "--solver", "gptq-act+comq,aespa", "--out", tmp_path / "y")])
    assert res.exit_code == 2 and "profiles alike (as gptq-act)" in res.output
    assert not (tmp_path / "y").exists()
    res = runner.invoke(app, [str(a) for a in (  # gptq would be judged, like the chain, without a descent it lacks
        "quantize", "--model", tiny_hf_dir, "--bits", 3, "--solver", "gptq-act+comq,gptq", "--out", tmp_path / "z")])
    assert res.exit_code == 2 and "all end in it or none" in res.output
    assert not (tmp_path / "z").exists()
