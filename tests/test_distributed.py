"""Several processes (mixq.distributed): `mixq quantize --workers 2` (torch.distributed, gloo on the CPU) gives the
single process's plan and packed model, in memory and streamed, and a rank that stops ends the run in one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mixq
from mixq.distributed import Dealer, Ranks
from mixq.testing import make_byte_tokenizer, make_family_model

from conftest import random_ids


def _folder(family: str, path):
    model = make_family_model(family).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="40KB")
    make_byte_tokenizer(merge=True).save_pretrained(path)
    return path


def _command(folder, out, text_file, *flags) -> list[str]:
    """The tests' `mixq quantize` command line."""
    return [sys.executable, "-m", "mixq", "quantize", "--model", str(folder), "--out", str(out), "--bits", "4.5",
            "--calib", str(text_file), "--calib-windows", "4", "--eval-windows", "0", "--solver", "gptq", *flags]


def _quantize(folder, out, text_file, *flags, env=None):
    """`mixq quantize` in a process of its own (as a user runs it): its completed process."""
    cmd = _command(folder, out, text_file, *flags)
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


def test_the_dealer_deals_units_in_turns_the_others_first():
    dealer = Dealer(Ranks(0, 3))
    assert dealer.deal(list("abcd")) == {1: ["b"], 2: ["c"], 0: ["a", "d"]}
    assert dealer.deal(list("efg")) == {1: ["e"], 2: ["f"], 0: ["g"]}  # (the turns go on from the last unit)
    assert dealer.deal(list("gh"), alone=True) == {0: ["g", "h"]}
    alone, got = Dealer(Ranks()), []
    for rank, share in alone.deal(list("abc")).items():
        alone.run(rank, str.upper, ("".join(share),), got.append)
    assert got == ["ABC"]  # (one rank: computed here, at once)


def test_a_rank_that_dies_ends_the_run_in_one_line_and_a_rerun_resumes(tmp_path, text_file):
    """Rank 1 is killed once the profile checkpoint shows block 0 done: the command ends in one line, leaves no
    output folder, and the same command then resumes and gives the single process's plan."""
    import time

    import psutil

    folder = _folder("llama", tmp_path / "m")
    flags = ["--sensitivity", "hessian", "--stream"]
    one = _quantize(folder, tmp_path / "one", text_file, *flags)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = _command(folder, tmp_path / "two", text_file, "--workers", "2", *flags)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, argv: list[str], marks):
    """One rank of a two-rank run in this test's own processes, as torchrun starts it, with the model loading and
    the serving of the other rank recorded in `marks`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mixq import distributed, pipeline
    from mixq.cli import app

    load, serve = pipeline._load, distributed.serve

    def loading(*args, **kwargs):
        (marks / f"loaded-{rank}").touch()
        return load(*args, **kwargs)

    def serving(device):
        served = serve(device)
        (marks / f"served-{rank}").write_text(str(served))
        return served

    pipeline._load, distributed.serve = loading, serving
    app(argv, standalone_mode=False)


def test_the_other_ranks_load_nothing_and_solve_what_they_are_sent(tmp_path, text_file):
    """Under torchrun, only the main rank loads (streams) the model; the other one computes profile calls and
    layers it is sent, and the run gives one process's plan."""
    from torch.multiprocessing import spawn

    folder = _folder("llama", tmp_path / "m")
    one = _quantize(folder, tmp_path / "one", text_file, "--sensitivity", "hessian", "--stream")
    assert one.returncode == 0, one.stderr[-2000:]
    marks = tmp_path / "marks"
    marks.mkdir()
    argv = _command(folder, tmp_path / "two", text_file, "--sensitivity", "hessian", "--stream")[3:]  # quantize …
    spawn(_rank, (_free_port(), argv, marks), nprocs=2)
    assert sorted(p.name for p in marks.iterdir() if p.name.startswith("loaded")) == ["loaded-0"]
    served = int((marks / "served-1").read_text())
    blocks = len(make_family_model("llama").model.layers)
    assert served >= 2 * blocks  # (its share of each block's profile calls and of its layers)
    assert (tmp_path / "one" / "plan.json").read_text() == (tmp_path / "two" / "plan.json").read_text()


def _echo(payload):
    return payload


_SEEN = []


def _earlier_alive(t: torch.Tensor) -> list[bool]:
    """Whether the tensors of the earlier calls are still held (on the serving rank: by nothing, once served)."""
    import weakref

    alive = [ref() is not None for ref in _SEEN]
    _SEEN.append(weakref.ref(t))
    return alive


def _ranks_sending(rank: int, port: int, marks):
    import torch.distributed as dist

    from mixq import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            distributed.serve(torch.device("cpu"))
            return
        dealer = Dealer()
        payload = {"bf16": torch.randn(3, 5).bfloat16(), "bool": torch.rand(7) > 0.5, "scalar": torch.tensor(2.5),
                   "empty": torch.empty(0, 4), "view": torch.arange(20.0).reshape(4, 5)[:, 1:3], "text": "x"}
        got = []
        dealer.run(1, _echo, (payload,), got.append)
        dealer.settle()
        same = got[0].keys() == payload.keys() and got[0]["text"] == "x" and all(
            torch.equal(got[0][k], v) and got[0][k].dtype == v.dtype for k, v in payload.items() if k != "text")
        for _ in range(3):
            dealer.run(1, _earlier_alive, (torch.zeros(1000),), got.append)
            dealer.settle()
        same = same and got[1:] == [[], [False], [False, False]]
        dealer.run(1, int, ("not a number",), got.append)
        try:
            dealer.settle()
            failed = ""
        except ValueError as e:
            failed = str(e)
        (marks / "result").write_text(f"{same} {failed}")
    finally:
        if rank == 0:
            distributed.dismiss()
        dist.destroy_process_group()


def test_tensors_go_to_another_rank_and_back_whole_are_not_kept_and_errors_are_raised_here(tmp_path):
    from torch.multiprocessing import spawn

    spawn(_ranks_sending, (_free_port(), tmp_path), nprocs=2)
    assert (tmp_path / "result").read_text() == "True invalid literal for int() with base 10: 'not a number'"
