"""Streamed weights (models.stream, `mixq quantize --stream`): a model read from disk block by block gives the very
plan and packed model of the same run in memory, holds at most one float block at a time, and refuses in one line
what it cannot run yet and the files it cannot read."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.config import Calibration, QuantizeConfig
from mixq.models import adapter_for, load_model
from mixq.models import stream
from mixq.models.stream import streamer_of
from mixq.plan import Budget
from mixq.testing import make_byte_tokenizer, make_family_model, write_tiny_gguf

from conftest import random_ids

runner = CliRunner()


def _sharded_folder(family: str, path, shard: str = "40KB"):
    """The family's tiny model as a Hugging Face folder in bf16, in several shards with their index."""
    model = make_family_model(family).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard)
    tokenizer = make_byte_tokenizer(merge=True)
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    return path


def _config(text_file, **kw) -> QuantizeConfig:
    return QuantizeConfig.from_solver("gptq+comq", **{  # the tables as a streamed run keeps them (fp16)
        "budget": Budget(bits=4.5), "estimator": "hessian", "eval_windows": 0, "tables": False,
        "calibration": Calibration(str(text_file), 4), **kw})


def _logits(model, ids):
    """The model's output on `ids` (a decoder's logits, an encoder's hidden states)."""
    with torch.no_grad():
        return adapter_for(model).job.whole(model, ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3", "gpt2", "gpt_neox"])
def test_a_streamed_run_gives_the_in_memory_plan_and_model(family, tmp_path, text_file):
    """Same plan, same packed model (logits equal bit for bit), and never more than one float block in memory."""
    folder = _sharded_folder(family, tmp_path / "m")
    mine = mixq.quantize(str(folder), None, _config(text_file), out=tmp_path / "a")
    streamed = mixq.quantize(str(folder), None, _config(text_file), out=tmp_path / "b", stream=True)
    assert (tmp_path / "a" / "plan.json").read_text() == (tmp_path / "b" / "plan.json").read_text()
    assert mine.plan.layers and mine.plan == streamed.plan
    streamer = streamer_of(streamed.model)
    assert streamer.peak == 1 and streamer.loads > 0
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3  # a shard a block, one for the tables and the rest
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "a"), ids), _logits(mixq.load(tmp_path / "b"), ids))


def test_a_streamed_gguf_gives_the_in_memory_plan(tmp_path, text_file):
    source = tmp_path / "m.gguf"
    write_tiny_gguf(make_family_model("llama"), source)
    a = mixq.quantize(str(source), None, _config(text_file), out=tmp_path / "a")
    b = mixq.quantize(str(source), None, _config(text_file), out=tmp_path / "b", stream=True)
    assert a.plan == b.plan
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "a"), ids), _logits(mixq.load(tmp_path / "b"), ids))


def test_a_streamed_model_runs_whole_one_block_at_a_time(tmp_path):
    """Code that runs the whole model (the evaluation) works on a streamed one: each block is read as it runs and
    released after, so the logits are the in-memory model's and no block stays in memory."""
    folder = _sharded_folder("llama", tmp_path / "m")
    mine, _, _ = load_model(str(folder))
    lazy, _, _ = load_model(str(folder), stream=True)
    assert all(p.is_meta for n, p in lazy.named_parameters() if ".layers." in n)
    ids = random_ids(2, 16)
    torch.testing.assert_close(_logits(lazy, ids), _logits(mine, ids), rtol=1e-5, atol=1e-5)
    assert all(p.is_meta for n, p in lazy.named_parameters() if ".layers." in n)
    assert streamer_of(lazy).peak == 1


_HEAP_RUN = """
import json, sys, psutil, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
import mixq, mixq.models.stream as stream
from mixq.config import Calibration, QuantizeConfig
from mixq.plan import Budget
from mixq.testing import make_byte_tokenizer
folder, text, trim = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
if not trim:
    stream.trim_heap = lambda: None
torch.manual_seed(0)
config = LlamaConfig(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
                     num_hidden_layers=12, vocab_size=300, max_position_embeddings=512)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / "m", max_shard_size="8MB")
make_byte_tokenizer(merge=True).save_pretrained(folder / "m")
rss = []
def step(stage, done, total):
    if stage in ("profile", "apply"):
        rss.append(psutil.Process().memory_info().rss)
run = QuantizeConfig.from_solver("rtn", budget=Budget(bits=3), estimator="hessian", eval_windows=0,
                                 calibration=Calibration(text, 4))
mixq.quantize(str(folder / "m"), None, run, out=folder / "q", step=step, stream=True)
print(json.dumps(rss))
"""


@pytest.mark.skipif(stream._malloc_trim() is None, reason="no glibc malloc_trim: the C heap is not trimmed here")
def test_a_streamed_runs_memory_does_not_grow_with_the_blocks(tmp_path, text_file):
    """Between blocks, a streamed run's resident memory stays within one block's float32 weights, however many
    blocks it has passed (in a process of its own, on a fresh heap). Untrimmed (the script's last argument "0"),
    glibc's heap kept the holes of freed blocks: this run swung by 240 MB, 18 blocks' worth, and Llama-3-8B's
    shape grew 1.5 GB over 30 blocks."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _HEAP_RUN, str(tmp_path), str(text_file), "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rss) == 24  # 12 blocks profiled, then applied
    block = 4 * (2 * 512 * 512 + 2 * 128 * 512 + 3 * 512 * 1792)  # q, o; k, v; the MLP: float32 bytes
    assert max(rss) - min(rss) < block


@pytest.mark.parametrize("family, solver, estimator, tables", [
    ("llama", "gptq", None, False),  # the default estimator (oac): per-token output energies
    ("gemma3_text", "oac", "fisher", True),  # output-adaptive Hessians, and the tables' Fisher
    ("gpt2", "gptq", None, True),
    ("bert", "gptq", "fisher", False),  # several losses a window (its probes): a fresh graph each
])
def test_backward_passes_stream_and_give_the_in_memory_statistics(family, solver, estimator, tables, tmp_path,
                                                                  text_file):
    """Backward passes through a streamed model recompute each block (stream.recomputing): the gradients, so the
    plan and the packed model, are the in-memory run's, with one float block in memory at a time."""
    folder = _sharded_folder(family, tmp_path / "m")
    config = QuantizeConfig.from_solver(solver, budget=Budget(bits=4.5), estimator=estimator, eval_windows=0,
                                        tables=tables, calibration=Calibration(str(text_file), 4))
    a = mixq.quantize(str(folder), None, config, out=tmp_path / "a")
    b = mixq.quantize(str(folder), None, config, out=tmp_path / "b", stream=True)
    assert (tmp_path / "a" / "plan.json").read_text() == (tmp_path / "b" / "plan.json").read_text()
    assert a.plan.layers and a.plan == b.plan
    assert len({c.spec for c in a.plan.layers.values()}) > 1  # (a mixed plan: the damages steered it)
    assert streamer_of(b.model).peak == 1
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "a"), ids), _logits(mixq.load(tmp_path / "b"), ids))


@pytest.mark.parametrize("flags, phrase", [
    (["--sensitivity", "hessian", "--refine", "1"], "cannot take --refine"),
    (["--sensitivity", "kl"], "cannot take the kl estimator"),
])
def test_what_a_streamed_model_cannot_run_yet_is_refused_in_one_line(flags, phrase, tmp_path, text_file):
    folder = _sharded_folder("llama", tmp_path / "m")
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", folder, "--bits", 4, "--stream", "--calib",
                                               text_file, "--eval-windows", 0, "--out", tmp_path / "q", *flags)])
    assert res.exit_code == 2, res.output
    assert phrase in " ".join(res.output.split())
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("family, solver", [("llama", "rotate+gptq"), ("qwen3", "resq+gptq"), ("phi3", "rotate+rtn")])
def test_transforms_stream_and_give_the_in_memory_plan_and_model(family, solver, tmp_path, text_file):
    """A transform turns each unit of a streamed model once (stream.change_units), into a scratch folder beside the
    output that the run reads from and removes: the plan and the packed model are the in-memory run's (a head tied
    to the table untied as in memory: llama), with one float block in memory at a time."""
    folder = _sharded_folder(family, tmp_path / "m")
    config = QuantizeConfig.from_solver(solver, budget=Budget(bits=4.5), estimator="hessian", eval_windows=0,
                                        tables=False, calibration=Calibration(str(text_file), 4))
    a = mixq.quantize(str(folder), None, config, out=tmp_path / "a")
    b = mixq.quantize(str(folder), None, config, out=tmp_path / "b", stream=True)
    assert a.plan.transforms == b.plan.transforms == (solver.split("+")[0],)
    assert (tmp_path / "a" / "plan.json").read_text() == (tmp_path / "b" / "plan.json").read_text()
    assert streamer_of(b.model).peak == 1
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "a"), ids), _logits(mixq.load(tmp_path / "b"), ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m"]  # (the scratch folder removed)


def _damaged(tmp_path, how: str):
    folder = _sharded_folder("llama", tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[1]
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:  # the index names a shard that is not there
        index["weight_map"][next(iter(index["weight_map"]))] = "model-00009-of-00009.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("how, phrase", [("missing", "which is not in"), ("truncated", "is truncated"),
                                         ("renamed", "names shard model-00009-of-00009.safetensors")])
def test_a_damaged_sharded_folder_is_refused_in_one_line_before_any_work(how, phrase, tmp_path, text_file):
    folder = _damaged(tmp_path, how)
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", folder, "--bits", 4, "--stream",
                                               "--sensitivity", "hessian", "--calib", text_file, "--eval-windows", 0,
                                               "--out", tmp_path / "q")])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "cannot stream model" in text and phrase in text, text
    assert not (tmp_path / "q").exists()


def test_solvers_that_judge_the_block_stream_too(tmp_path, text_file):
    """taskclip judges each layer by its block's output (the JUDGE statistic): block-local, so it streams."""
    folder = _sharded_folder("llama", tmp_path / "m")
    config = QuantizeConfig.from_solver("taskclip", budget=Budget(bits=4.5), estimator="roundoff", eval_windows=0,
                                        tables=False, calibration=Calibration(str(text_file), 4))
    a = mixq.quantize(str(folder), None, config, out=tmp_path / "a")
    b = mixq.quantize(str(folder), None, config, out=tmp_path / "b", stream=True)
    assert a.plan == b.plan
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "a"), ids), _logits(mixq.load(tmp_path / "b"), ids))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_neox"])
def test_streamed_tables_join_the_allocation_and_the_evaluation_runs(family, tmp_path, text_file):
    """The embedding table and the head are read when used (the profile, the apply, the evaluation) and released
    after: with the tables quantized and before/after perplexities the streamed run is the in-memory one."""
    folder = _sharded_folder(family, tmp_path / "m")
    config = _config(text_file, tables=True, eval_windows=2)
    a = mixq.quantize(str(folder), None, config, out=tmp_path / "a")
    b = mixq.quantize(str(folder), None, config, out=tmp_path / "b", stream=True)
    assert a.plan == b.plan and any(n in a.plan.layers for n in ("model.embed_tokens", "gpt_neox.embed_in"))
    assert a.meta["eval"] == b.meta["eval"]
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "a"), ids), _logits(mixq.load(tmp_path / "b"), ids))


def test_a_sharded_output_missing_a_shard_is_refused_in_one_line(tmp_path, text_file):
    folder = _sharded_folder("llama", tmp_path / "m")
    mixq.quantize(str(folder), None, _config(text_file), out=tmp_path / "q", stream=True)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    (tmp_path / "q" / sorted(set(index.values()))[0]).unlink()
    res = runner.invoke(app, ["eval", str(tmp_path / "q"), "--windows", "1"])
    assert res.exit_code == 2 and "is incomplete: its index names model-00001" in " ".join(res.output.split())


class _Stop(Exception):
    pass


@pytest.mark.parametrize("solver", ["gptq+comq", "oac"])
def test_a_stopped_streamed_apply_resumes_from_the_blocks_it_wrote(solver, tmp_path, text_file, monkeypatch):
    """Each packed block is written beside the output as the apply makes it: a run stopped after block 0 leaves no
    output folder, and the same run started again quantizes block 1 only and ends with the uninterrupted run's
    model (oac: its output-adaptive Hessians read the float block 0 again, to carry their float stream past it)."""
    import mixq.apply as apply_module

    folder = _sharded_folder("llama", tmp_path / "m")
    config = QuantizeConfig.from_solver(solver, budget=Budget(bits=4.5), estimator="hessian", eval_windows=0,
                                        calibration=Calibration(str(text_file), 4))
    whole = mixq.quantize(str(folder), None, config, out=tmp_path / "whole", stream=True)

    def stop(stage, done, total):
        if stage == "apply" and done == 1:
            raise _Stop
    with pytest.raises(_Stop):
        mixq.quantize(str(folder), None, config, out=tmp_path / "q", stream=True, step=stop)
    assert not (tmp_path / "q").exists() and (tmp_path / ".q.blocks-partial" / "block-00000.safetensors").exists()
    solved = []
    real = apply_module.solve_layer
    monkeypatch.setattr(apply_module, "solve_layer", lambda chain, w, *a: solved.append(w) or real(chain, w, *a))
    again = mixq.quantize(str(folder), None, config, out=tmp_path / "q", stream=True)
    blocks = [n for n in whole.plan.layers if n.startswith("model.layers.")]
    assert len(solved) == len(blocks) // 2 + len(whole.plan.layers) - len(blocks)  # block 1's, and the tables again
    assert again.plan == whole.plan and not (tmp_path / ".q.blocks-partial").exists()
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "q"), ids), _logits(mixq.load(tmp_path / "whole"), ids))


def test_a_disk_too_small_for_the_output_is_refused_before_the_apply(tmp_path, text_file, monkeypatch):
    import collections
    import shutil

    folder = _sharded_folder("llama", tmp_path / "m")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    applied = []
    with pytest.raises(ValueError, match=r"needs 0\.\d\d GB on the disk of .* which has 0\.00 GB free"):
        mixq.quantize(str(folder), None, _config(text_file), out=tmp_path / "q", stream=True,
                      step=lambda stage, done, total: applied.append(stage))
    assert "apply" not in applied and "profile" in applied and not (tmp_path / "q").exists()


def test_a_disk_too_small_for_a_transforms_scratch_is_refused_in_one_line(tmp_path, text_file, monkeypatch):
    import collections
    import shutil

    folder = _sharded_folder("llama", tmp_path / "m")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", folder, "--bits", 4, "--stream", "--calib",
                                               text_file, "--eval-windows", 0, "--out", tmp_path / "q",
                                               "--sensitivity", "hessian", "--solver", "rotate+gptq")])
    assert res.exit_code == 2, res.output
    assert "needs 0.00 GB of scratch" in " ".join(res.output.split()) and len(res.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("stream", [False, True])
def test_activations_on_disk_give_the_same_plan_and_model(stream, tmp_path, text_file, monkeypatch):
    """The hidden states between blocks in memory-mapped files (--activations-on-disk): the very plan and packed
    model, and no file left beside the output."""
    from mixq.capture import Activations

    made = []
    buffer = Activations.buffer

    def spy(self, name, shape, dtype=torch.float32):
        t = buffer(self, name, shape, dtype)
        made.append(t is not None)
        return t

    monkeypatch.setattr(Activations, "buffer", spy)
    folder = _sharded_folder("llama", tmp_path / "m")
    config = QuantizeConfig.from_solver("gptq", budget=Budget(bits=4.5), eval_windows=0, tables=True,
                                        calibration=Calibration(str(text_file), 4))
    a = mixq.quantize(str(folder), None, config, out=tmp_path / "a", stream=stream)
    assert made and not any(made)  # (in memory: no file)
    made.clear()
    b = mixq.quantize(str(folder), None, config, out=tmp_path / "b", stream=stream, activations_on_disk=True)
    assert made and all(made)
    assert a.plan == b.plan
    ids = random_ids(2, 24)
    assert torch.equal(_logits(mixq.load(tmp_path / "a"), ids), _logits(mixq.load(tmp_path / "b"), ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m"]
