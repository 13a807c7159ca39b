"""Normal-float levels (NF, Dettmers et al. 2023, QLoRA, arXiv 2305.14314): the quantiles of a standard normal,
so that each level takes an equal share of normally distributed weights, scaled to [−1, 1], with an exact 0.

As bitsandbytes' `create_normal_map`, for n = 2^bits levels: n/2 positive quantiles from the offset
1 − (1/(2n) + 1/(2(n − 1)))/2 down to (not including) 1/2, n/2 − 1 negative ones likewise, and 0; divided by the
largest. At 4 bits that is NF4 (offset 0.9677); 2 and 3 bits follow the same rule.
"""
from __future__ import annotations

import torch

from . import Levels, register


def normal_levels(bits: int) -> torch.Tensor:
    n = 1 << bits
    offset = 1 - (1 / (2 * n) + 1 / (2 * (n - 1))) / 2
    quantile = torch.special.ndtri
    pos = quantile(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -quantile(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    t = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (t / t.max()).float()


@register
class NormalFloat(Levels):
    name = "nf"
    summary = "normal-float levels (NF4 at 4 bits), one signed fp16 scale a group, no zero"
    bits = (2, 3, 4)

    def table(self, bits):
        return normal_levels(bits)
