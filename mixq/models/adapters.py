"""One adapter per family: block path and linear names as data (like gpt-fast's size table)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Adapter:
    blocks: str  # attribute path of the ModuleList of blocks
    # linears inside a block, grouped by the input they share (one Hessian per group)
    groups: tuple[tuple[str, ...], ...]
    norm: str = "model.norm"  # final normalisation and output head: what turns the last block's output into logits
    head: str = "lm_head"
    embed: str = "model.embed_tokens"
    value: str = "self_attn.v_proj"  # the value projection, in the block's attention module (solvers.aespa)
    attn_out: str = "self_attn.o_proj"  # the attention's output projection, which reads the values
    # the block's norms and the linears that read each one's output; the linears that write the residual stream
    # (transforms.rotate)
    reads: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    writes: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def tables(self, model: nn.Module) -> list[str]:
        """The embedding table, and the output head unless it is tied to the table (then the table's second use):
        what joins the allocation with --include-embeddings."""
        head = model.get_submodule(self.head)
        return [self.embed] + ([] if head.weight is model.get_submodule(self.embed).weight else [self.head])

    def layer_names(self, model: nn.Module) -> list[str]:
        """Full names of every quantizable linear, block after block."""
        n = len(self.block_list(model))
        return [f"{self.blocks}.{i}.{lin}" for i in range(n) for lin in self.linears]


_LLAMA = Adapter(
    blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)

ADAPTERS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
