"""Resumable profiling: a run killed after some blocks and started again with the same arguments profiles only
the blocks it had not finished and ends with the same profile and plan as a run that was never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import mixq.profile
from mixq.allocate import allocate
from mixq.checkpoint import Checkpoint, run_key
from mixq.profile import profile_model
from mixq.plan import Budget
from mixq.config import default_candidates

from conftest import random_ids, tiny_config
from test_cli import invoke

CANDIDATES = default_candidates(bits=(2, 4, 8), groups=(32, 0))


@pytest.fixture(scope="module")
def deep_model():
    from transformers import LlamaForCausalLM

    cfg = tiny_config()
    cfg.num_hidden_layers = 4
    torch.manual_seed(3)
    return LlamaForCausalLM(cfg).float().eval()


def _count_profiled(monkeypatch) -> list[str]:
    """Patch profile_group to record the layers it profiles."""
    profiled, real = [], mixq.profile.profile_group
    monkeypatch.setattr(mixq.profile, "profile_group",
                        lambda weights, *a, **k: profiled.extend(weights) or real(weights, *a, **k))
    return profiled


@pytest.mark.parametrize("estimator", ["fisher", "hessian"])
def test_profile_resumes_where_it_was_killed(deep_model, tmp_path, monkeypatch, estimator):
    calib = random_ids(8, 32, seed=1)
    fresh = profile_model(deep_model, calib, CANDIDATES, estimator)

    dying = Checkpoint(tmp_path / "ck.json", "key")
    saves = []

    def save_then_die(prof):
        Checkpoint.save(dying, prof)
        saves.append(len(prof.layers))
        if len(saves) == 2:
            raise KeyboardInterrupt  # as if killed right after block 1's profile reached the disk

    monkeypatch.setattr(dying, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        profile_model(deep_model, calib, CANDIDATES, estimator, checkpoint=dying)

    profiled = _count_profiled(monkeypatch)
    resumed = profile_model(deep_model, calib, CANDIDATES, estimator, checkpoint=Checkpoint(tmp_path / "ck.json",
                                                                                           "key"))
    assert profiled and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in profiled)
    assert resumed.to_json() == fresh.to_json()
    budget = Budget(bits=4.0)
    assert allocate(resumed, budget).plan.to_json() == allocate(fresh, budget).plan.to_json()


def test_checkpoint_of_other_arguments_or_corrupt_is_ignored(deep_model, tmp_path, monkeypatch):
    calib = random_ids(8, 32, seed=1)
    path = tmp_path / "ck.json"
    profile_model(deep_model, calib, CANDIDATES, "hessian", checkpoint=Checkpoint(path, "one"))
    assert len(Checkpoint(path, "one").load()) == 4 * 7
    assert Checkpoint(path, "two").load() == {}
    path.write_text('{"key": "one", "profile": {"version": 1, "estimator": "hes')  # a torn write
    assert Checkpoint(path, "one").load() == {}
    profiled = _count_profiled(monkeypatch)
    profile_model(deep_model, calib, CANDIDATES, "hessian", checkpoint=Checkpoint(path, "one"))
    assert len(profiled) == 4 * 7


def test_run_key_depends_on_what_decides_the_profile(tiny_hf_dir):
    calib = random_ids(4, 32, seed=1)
    key = run_key(str(tiny_hf_dir), calib, CANDIDATES, "fisher")
    assert key == run_key(str(tiny_hf_dir), calib.clone(), CANDIDATES, "fisher")
    assert key != run_key(str(tiny_hf_dir), random_ids(4, 32, seed=2), CANDIDATES, "fisher")
    assert key != run_key(str(tiny_hf_dir), calib, CANDIDATES[:-1], "fisher")
    assert key != run_key(str(tiny_hf_dir), calib, CANDIDATES, "hessian")


KILLER = """
import os, signal, sys
import mixq.checkpoint
real = mixq.checkpoint.Checkpoint.save
def save_then_die(self, prof):
    real(self, prof)
    os.kill(os.getpid(), signal.SIGKILL)
mixq.checkpoint.Checkpoint.save = save_then_die
from mixq.cli import app
app(sys.argv[1:])
"""


def test_quantize_killed_with_sigkill_resumes_to_the_same_plan(tiny_hf_dir, text_file, tmp_path, monkeypatch):
    args = ["quantize", "--model", tiny_hf_dir, "--bits", 4, "--eval-windows", 0, "--calib-windows", 4,
            "--calib", text_file]
    out = tmp_path / "q"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *map(str, args), "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = tmp_path / ".q.profile-partial.json"
    assert partial.exists() and not out.exists()
    assert len(json.loads(partial.read_text())["profile"]["layers"]) == 7  # block 0 of 2

    profiled = _count_profiled(monkeypatch)
    res = invoke(*args, "--out", out)
    assert res.exit_code == 0, res.output
    assert profiled and all(n.startswith("model.layers.1.") or n == "model.embed_tokens" for n in profiled)
    assert not partial.exists()  # a finished run leaves no checkpoint behind

    fresh = tmp_path / "fresh"
    assert invoke(*args, "--out", fresh).exit_code == 0
    assert (out / "plan.json").read_text() == (fresh / "plan.json").read_text()
    assert (out / "profile.json").read_text() == (fresh / "profile.json").read_text()
