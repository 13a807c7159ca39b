"""Several processes (mixq.distributed): `mixq quantize --workers 2` (torch.distributed, gloo on the CPU) gives the
single process's plan and packed model, in memory and streamed, and a rank that stops ends the run in one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mixq
from mixq.distributed import Ranks, Turns, merged_damage
from mixq.testing import make_byte_tokenizer, make_family_model

from conftest import random_ids


def _folder(family: str, path):
    model = make_family_model(family).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="40KB")
    make_byte_tokenizer(merge=True).save_pretrained(path)
    return path


def _quantize(folder, out, text_file, *flags, env=None):
    """`mixq quantize` in a process of its own (as a user runs it): its completed process."""
    cmd = [sys.executable, "-m", "mixq", "quantize", "--model", str(folder), "--out", str(out), "--bits", "4.5",
           "--calib", str(text_file), "--calib-windows", "4", "--eval-windows", "0", "--solver", "gptq", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                    **(env or {})}, timeout=600)


def _logits(folder, ids):
    with torch.no_grad():
        return mixq.load(folder)(ids, use_cache=False).logits


@pytest.mark.parametrize("family, flags", [
    ("llama", ["--stream"]),  # the default estimator's backward passes, streamed
    ("qwen2", ["--sensitivity", "hessian", "--solver", "gptq,taskclip"]),  # a judged solver: its blocks in order
    ("llama", ["--stream", "--sensitivity", "hessian", "--solver", "rotate+gptq"]),  # the main rank turns the units
])
def test_two_processes_give_the_single_process_plan_and_model(family, flags, tmp_path, text_file):
    folder = _folder(family, tmp_path / "m")
    one = _quantize(folder, tmp_path / "one", text_file, *flags)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _quantize(folder, tmp_path / "two", text_file, "--workers", "2", *flags)
    assert two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "one" / "plan.json").read_text() == (tmp_path / "two" / "plan.json").read_text()
    one_profile = (tmp_path / "one" / "profile.json")
    if one_profile.exists():
        assert one_profile.read_text() == (tmp_path / "two" / "profile.json").read_text()
    ids = random_ids(2, 24)
    assert torch.equal(_logits(tmp_path / "one", ids), _logits(tmp_path / "two", ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".two")]  # nothing left beside the output


def test_turns_deal_every_unit_to_exactly_one_rank():
    ranks = [Turns(Ranks(r, 3)) for r in range(3)]
    owners = [[t.mine() for t in ranks] for _ in range(10)]
    assert all(sum(o) == 1 for o in owners)
    assert [o.index(True) for o in owners] == [k % 3 for k in range(10)]
    nan = float("nan")
    assert merged_damage([[1.0, nan, nan], [nan, 2.0, nan], [nan, nan, 3.0]]) == [1.0, 2.0, 3.0]


def test_a_rank_that_dies_ends_the_run_in_one_line_and_a_rerun_resumes(tmp_path, text_file):
    """Rank 1 is killed once the profile checkpoint shows block 0 done: the command ends in one line, leaves no
    output folder, and the same command then resumes and gives the single process's plan."""
    import time

    import psutil

    folder = _folder("llama", tmp_path / "m")
    flags = ["--sensitivity", "hessian", "--stream"]
    one = _quantize(folder, tmp_path / "one", text_file, *flags)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "mixq", "quantize", "--model", str(folder), "--out", str(tmp_path / "two"),
           "--bits", "4.5", "--calib", str(text_file), "--calib-windows", "4", "--eval-windows", "0", "--solver",
           "gptq", "--workers", "2", *flags]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = tmp_path / ".two.profile-partial.json"
    killed = False
    while run.poll() is None and not killed:
        if checkpoint.exists():
            for child in psutil.Process(run.pid).children(recursive=True):
                if child.environ().get("RANK") == "1":
                    child.kill()
                    killed = True
        time.sleep(0.02)
    _, err = run.communicate(timeout=600)
    assert killed and run.returncode == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip() and "━" not in line]
    assert len(lines) == 1 and "rank 1 of 2" in lines[0] and "again to resume" in lines[0], err
    assert not (tmp_path / "two").exists() and checkpoint.exists()  # (what the rerun resumes from)
    again = _quantize(folder, tmp_path / "two", text_file, "--workers", "2", *flags)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "one" / "plan.json").read_text() == (tmp_path / "two" / "plan.json").read_text()


def test_bad_input_under_several_workers_is_one_line(tmp_path):
    folder = _folder("llama", tmp_path / "m")
    res = _quantize(folder, tmp_path / "q", tmp_path / "missing.txt", "--workers", "2")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"error: text file not found: {tmp_path / 'missing.txt'}"], res.stderr
    assert not (tmp_path / "q").exists()
