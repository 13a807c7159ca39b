"""Measured damage (ExLlamaV2's and ModelOpt's measure): the KL divergence of the model's next-token distribution
from the float model's, with one layer quantized by the candidate and every other layer float,

    damage = mean over tokens t of KL(p_float(·|t) ‖ p_quantized(·|t))   (nats per token)

on the first KL_WINDOWS calibration windows cut to KL_LENGTH tokens. The float model's log-probabilities and
probabilities are computed once and kept (2 · KL_WINDOWS · KL_LENGTH · vocabulary floats, whatever the calibration
size); each measurement runs only the blocks from the layer's own on, from the float hidden states cached at its
input. For an encoder the divergence is the task's (models.tasks): the mean of 1 − cos between the float and the
quantized sentence embeddings of the windows.
"""
from __future__ import annotations

import torch
from torch import nn

from ..capture import LayerStats, block_inputs, run_block
from ..models import Adapter
from . import register_estimator

KL_WINDOWS = 2
KL_LENGTH = 256


class KLProbe:
    """The float model's reference on the KL windows, and the float hidden states entering the current block."""

    def __init__(self, model: nn.Module, adapter: Adapter, calib: torch.Tensor, windows: int = KL_WINDOWS,
                 length: int = KL_LENGTH):
        self.model, self.adapter = model, adapter
        self.blocks = adapter.block_list(model)
        ids = self.ids = calib[:adapter.job.probe_windows or windows, :length]
        self.x, self.calls = block_inputs(model, adapter, ids)
        self.block = 0
        self.task = adapter.job
        with torch.no_grad():
            self.ref = self.task.reference(self.task.whole(model, ids))

    def advance(self) -> None:
        """Move to the next block's input (run the current block as it is now: float)."""
        self.x = run_block(self.blocks[self.block], self.x, self.calls[self.block])
        self.block += 1

    def kl(self, whole: bool = False) -> float:
        """KL of the model as it is now (from the current block on, or `whole`: from the embeddings) from the float
        reference."""
        with torch.no_grad():
            if whole:
                out = self.task.whole(self.model, self.ids)
            else:
                h = self.x
                for blk, call in zip(self.blocks[self.block:], self.calls[self.block:]):
                    h = run_block(blk, h, call)
                out = self.task.output(self.adapter, self.model, h)
        return self.task.divergence(self.ref, out)

    def layer(self, linear: nn.Module, whole: bool = False):
        """`measure(dequantized weight, bias change or None) -> KL` for one linear of the current block, restored
        after each call; `whole`: for the embedding table or the head, the whole model is run (a tied table is
        judged in both uses)."""
        def measure(deq: torch.Tensor, bias: torch.Tensor | None = None) -> float:
            saved, saved_bias = linear.weight.data, getattr(linear, "bias", None)
            linear.weight.data = deq.to(saved.dtype)
            if bias is not None:
                linear.bias = nn.Parameter(bias if saved_bias is None else saved_bias.data + bias)
            try:
                return self.kl(whole)
            finally:
                linear.weight.data = saved
                if bias is not None:
                    linear.bias = saved_bias
        return measure


@register_estimator("kl", measured=True)
def kl_damage(weight: torch.Tensor, deq: torch.Tensor, stats: LayerStats, measure) -> float:
    """`measure` is KLProbe.layer(...) of this weight's linear: profiling passes it in place of a row weight."""
    return measure(deq)
