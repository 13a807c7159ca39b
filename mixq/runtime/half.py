"""Float tables kept as they are stored (fp16): the embedding table and an output head that mixq did not quantize.
Lookups and products give float32, the same numbers as the float32 copy they replace, in half the memory; a few
rows of x (decoding) go through the kernel's fp16 matrix-vector product (csrc/qgemv.cpp, `hgemv`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import kernel
from .qlinear import KERNEL_MAX_ROWS

CHUNK = 4096  # rows of an fp16 weight widened at a time for a long input


class HalfEmbedding(nn.Embedding):
    scale: float | None = None  # a factor the table it replaces multiplied its rows by (Adapter.table_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids).float()
        return rows if self.scale is None else rows * torch.tensor(self.scale, dtype=rows.dtype)


class HalfLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        k = kernel() if rows <= KERNEL_MAX_ROWS and x.dtype == torch.float32 and not x.requires_grad else None
        if k is not None:
            y = k.hgemv(self.weight, x.reshape(rows, self.in_features)).view(*x.shape[:-1], self.out_features)
        else:  # a float32 copy of CHUNK rows of W at a time, never of the whole table
            y = torch.cat([F.linear(x, w.to(x.dtype)) for w in self.weight.split(CHUNK)], -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def half_modules(table: nn.Embedding, head: nn.Linear | None,
                 scale: float | None = None) -> tuple[HalfEmbedding, HalfLinear | None]:
    """Empty (meta) fp16 counterparts of `table` (which multiplies its rows by `scale`, if given) and `head`, for
    the loader to assign the stored tensors to."""
    with torch.device("meta"):
        emb = HalfEmbedding(table.num_embeddings, table.embedding_dim, table.padding_idx, dtype=torch.float16)
        emb.scale = scale
        lin = None if head is None else HalfLinear(head.in_features, head.out_features, head.bias is not None,
                                                   dtype=torch.float16)
    return emb, lin
