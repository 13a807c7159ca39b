"""`--device` (mixq.device): a run computes on the CPU or a GPU; a device torch does not see is refused in one line
before any work. The GPU test runs where torch sees one (the CPU is the tested platform)."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.config import Calibration, QuantizeConfig
from mixq.device import resolve
from mixq.plan import Budget
from mixq.testing import make_byte_tokenizer, make_family_model

from conftest import random_ids

runner = CliRunner()
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU")


def test_the_default_device_is_a_gpu_where_there_is_one_else_the_cpu():
    assert resolve(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, phrase", [("xpu", "mixq runs on cpu or cuda"), ("tpu", "not a device"),
                                         ("gpu:x", "not a device")])
def test_a_device_mixq_cannot_run_on_is_refused(name, phrase):
    with pytest.raises(ValueError, match=phrase):
        resolve(name)


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_in_one_line_before_any_work(name, tmp_path, text_file):
    res = runner.invoke(app, ["quantize", "--model", "nowhere", "--bits", "4", "--device", name, "--calib",
                              str(text_file), "--out", str(tmp_path / "q")])
    assert res.exit_code == 2, res.output
    assert "torch sees no GPU" in " ".join(res.output.split())
    assert not (tmp_path / "q").exists()


@gpu
@pytest.mark.parametrize("stream", [False, True])
def test_a_run_on_the_gpu_gives_a_model_close_to_the_cpu_run(stream, tmp_path, text_file):
    folder = tmp_path / "m"
    make_family_model("llama").save_pretrained(folder)
    make_byte_tokenizer(merge=True).save_pretrained(folder)
    config = QuantizeConfig.from_solver("gptq", budget=Budget(bits=4.5), eval_windows=0,
                                        calibration=Calibration(str(text_file), 4))
    cpu = mixq.quantize(str(folder), None, config, out=tmp_path / "cpu", device="cpu")
    gpu_run = mixq.quantize(str(folder), None, config, out=tmp_path / "gpu", stream=stream, device="cuda")
    assert set(gpu_run.plan.layers) == set(cpu.plan.layers)
    ids = random_ids(2, 24)
    with torch.no_grad():
        a = mixq.load(tmp_path / "cpu")(ids).logits
        b = mixq.load(tmp_path / "gpu")(ids).logits
    assert (a - b).abs().mean() < 0.1 * a.abs().mean()
