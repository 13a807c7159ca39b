"""llama.cpp's IQ4_NL levels (`kvalues_iq4nl` in ggml-common.h): 16 non-uniform int8 levels, w = d · L[q] with
one fp16 d a block of 32 (IQ4_NL), or d · (ls − 32) with 6-bit ls a block and an fp16 d a super-block of 256
(IQ4_XS). The levels are kept as the integers ggml stores, so the scale is ggml's d exactly."""
from __future__ import annotations

import torch

from . import Levels, register

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@register
class IQ4NL(Levels):
    name = "iq4nl"
    summary = "llama.cpp's IQ4_NL levels (16, non-uniform), one signed fp16 scale a group"
    bits = (4,)

    def table(self, bits):
        return torch.tensor(KVALUES, dtype=torch.float32)

    def label(self, bits):
        return "iq4nl"
