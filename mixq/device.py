"""Where a run computes (`mixq quantize --device cpu|cuda|cuda:N`): capture, profile and apply work block by block
on the device, and so does the evaluation. A model in memory is moved there whole; a streamed one (models.stream)
reads each block onto it. Tensors the run makes (calibration, statistics, solver work) are made there too
(`computing`). The CPU is the tested platform; every test passes without a GPU."""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn


def resolve(name: str | None) -> torch.device:
    """The device `name` names, checked (None or "auto": cuda where torch sees a GPU, else the CPU). Under several
    ranks, a bare "cuda" is the rank's own GPU (torchrun's LOCAL_RANK). Bad names and absent GPUs fail in one
    line."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name}: not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {name}: mixq runs on cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no GPU on this machine (a CPU build of torch, or no driver); "
                         "give --device cpu")
    count = torch.cuda.device_count()
    if device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % count)
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: torch sees {count} GPU{'s' if count > 1 else ''} (cuda:0"
                         f"{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Put `model` on `device`: whole where it is in memory; a streamed one's resident parameters and buffers, its
    blocks read onto the device as they run."""
    from .models.stream import streamer_of

    streamer = streamer_of(model)
    if streamer is None:
        return model.to(device)
    streamer.to(device)
    return model


def computing(device: torch.device):
    """A context in which the tensors torch makes are made on `device` (nothing to do for the CPU, the default)."""
    return nullcontext() if device.type == "cpu" else device
