"""`Adapter`: everything the other stages ask of a model's architecture, as data (like gpt-fast's size table) plus
the few functions that data cannot say. Capture, solvers, transforms, runtime and exporters read the adapter; none
of them names a layer or tests a model type. Each family is a file of this package that registers its adapter for
the `model_type`s it serves (llama.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import attention, norms
from .tasks import TASKS
from ..registry import Registry

ADAPTERS = Registry("architecture")


@dataclass(frozen=True)
class Adapter:
    family: str  # the model_type it serves
    blocks: str  # attribute path of the ModuleList of blocks
    # linears inside a block, grouped by the input they share (one Hessian per group)
    groups: tuple[tuple[str, ...], ...]
    # final normalisation and output head: what turns the last block's output into logits (None: an encoder's)
    norm: str | None = "model.norm"
    head: str | None = "lm_head"
    embed: str = "model.embed_tokens"
    # the value projection, in the block's attention module (the ATTENTION statistic, rotate's head turn); None
    # where the family fuses it with the queries and keys
    value: str | None = "self_attn.v_proj"
    attn_out: str = "self_attn.o_proj"  # the attention's output projection, which reads the values
    # the block's norms and the linears that read each one's output; the linears that write the residual stream
    # (transforms.rotate)
    reads: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    writes: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    norm_kind: str = "rms"  # how every norm normalises and scales (models.norms)
    # why a rotation of the residual stream cannot keep this family's function ("" where it can: transforms.rotate)
    rotation: str = ""
    transposed: bool = False  # block linears are transformers' Conv1D (weights in × out): made nn.Linear on load
    softcap: str | None = None  # the config field of a soft cap on the logits, tanh(z / c) · c (Gemma)
    # config flags that switch biases on for a kind of linear at once (a bias compensation gives some layers one)
    bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
        ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))
    gguf_arch: str | None = "llama"  # llama.cpp's architecture name (None: no GGUF export)
    # linears whose rows GGUF stores in ggml's rotary order, and the config field with their head count
    gguf_rotary: tuple[tuple[str, str], ...] = (("self_attn.q_proj", "num_attention_heads"),
                                                ("self_attn.k_proj", "num_key_value_heads"))
    # fused query/key/value linears whose rows Hugging Face interleaves per head (head, q|k|v, dim) and GGUF stores
    # as all queries, all keys, all values (GPT-NeoX), and the config field with their head count
    gguf_interleaved: tuple[tuple[str, str], ...] = ()
    gguf_norm_offset: float = 0.0  # what GGUF adds to every norm weight (Gemma's files store 1 + γ)
    # the architecture's GGUF hyper-parameters: (gguf-py key, the config attribute or models.gguf_meta's derived
    # value it holds), as llama.cpp's convert_hf_to_gguf writes them
    gguf_hparams: tuple[tuple[str, str], ...] = ()
    task: str = "causal"  # what the model is for (models.tasks): how it is loaded, judged and evaluated

    @property
    def job(self):
        """The model's Task (models.tasks)."""
        return TASKS.lookup(self.task)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make every block linear an nn.Linear (rows × cols), as the rest of mixq expects: a family whose layers
        are transformers' Conv1D (GPT-2) gets each one's transposed weight, the same function. In place; also on
        a model built on the meta device."""
        if self.transposed:
            for name in self.layer_names(model):
                conv = model.get_submodule(name)
                if not isinstance(conv, nn.Linear):
                    model.set_submodule(name, _linear_of(conv))
        return model

    def logits(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The logits of the last block's output h: the final norm, the head and a soft cap where the family has
        one."""
        z = model.get_submodule(self.head)(model.get_submodule(self.norm)(h))
        cap = getattr(model.config, self.softcap, None) if self.softcap else None
        return z if cap is None else torch.tanh(z / cap) * cap

    def table_scale(self, table: nn.Module) -> float | None:
        """The factor an embedding module multiplies its rows by itself (Gemma 3's scaled embedding), which a
        module that replaces it must keep; None where it has none."""
        return getattr(table, "scalar_embed_scale", None)

    def check_needs(self, needs) -> None:
        """Refuse statistics this family cannot give (one line)."""
        from ..capture import ATTENTION

        if ATTENTION in needs and self.value is None:
            raise ValueError(f"{self.family} fuses its value projection with the queries and keys: no solver that "
                             f"needs the statistic {ATTENTION!r} runs on it")

    def check_rotation(self, transform: str) -> None:
        if self.rotation:
            raise ValueError(f"{transform} is not exact for {self.family}: {self.rotation}")

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def tables(self, model: nn.Module) -> list[str]:
        """The embedding table, and the output head unless the model has none (an encoder) or it is tied to the
        table (then the table's second use): what joins the allocation unless --float-tables."""
        return [self.embed] + ([self.head] if self.head is not None and not self.tied(model) else [])

    def tied(self, model: nn.Module) -> bool:
        """Whether the head is the embedding table's second use (packed: the same buffers)."""
        if self.head is None:
            return False
        head, table = model.get_submodule(self.head), model.get_submodule(self.embed)
        if hasattr(head, "qweight"):
            return getattr(table, "qweight", None) is head.qweight
        return getattr(head, "weight", None) is getattr(table, "weight", None)

    def layer_names(self, model: nn.Module) -> list[str]:
        """Full names of every quantizable linear, block after block."""
        n = len(self.block_list(model))
        return [f"{self.blocks}.{i}.{lin}" for i in range(n) for lin in self.linears]

    def in_block(self, name: str) -> str | None:
        """A full layer (or parameter) name's part inside its block ("self_attn.q_proj" of
        "model.layers.3.self_attn.q_proj"); None outside the blocks."""
        head, _, rest = name.partition(self.blocks + ".")
        if head or not rest:
            return None
        return rest.partition(".")[2] or None

    def head_dim(self, model) -> int:
        """The attention heads' width, of a model or a config."""
        c = getattr(model, "config", model)
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def normalised(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What `norm` makes of x before its own scale (x / rms(x) for an RMSNorm; centred first by a
        LayerNorm)."""
        return norms.normalised(self.norm_kind, norm, x)

    def fold_norm(self, norm: nn.Module, readers: list[nn.Linear]) -> None:
        """Fold `norm`'s scale into the input columns of the linears that read its output; the norm then scales
        by one (the model computes the same function)."""
        norms.fold(self.norm_kind, norm, readers)

    def untie_head(self, model: nn.Module) -> None:
        """Give a head tied to the embedding table a weight of its own (the config says so too)."""
        table, head = model.get_submodule(self.embed), model.get_submodule(self.head)
        if head.weight is table.weight:
            head.weight = nn.Parameter(table.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False

    def watch_attention(self, block: nn.Module, on_call):
        """A context manager under which every call of the block's attention function also calls
        on_call(value input x, query, key, mask, scaling, causal) (capture.attention_hessians)."""
        return attention.watch(block, self.value, on_call)

    def biased_kinds(self) -> dict[str, tuple[str, ...]]:
        """Config flag → the in-block linears whose biases it switches on together."""
        return dict(self.bias_flags)

    def gguf_names(self, model: nn.Module):
        """gguf-py's tensor name map of the model's architecture and block count (GGUF name of each HF name)."""
        import gguf

        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.gguf_arch)
        return gguf.get_tensor_name_map(arch, len(self.block_list(model)))

    def gguf_rows(self, model: nn.Module, name: str, rows: int) -> np.ndarray | None:
        """The order in which GGUF stores the rows of layer (or parameter) `name`, given in Hugging Face rows;
        None where it keeps them as they are."""
        local = self.in_block(name)
        local = local and local.removesuffix(".weight").removesuffix(".bias")
        if (heads := dict(self.gguf_rotary).get(local)) is not None:
            return rotary_rows(rows, getattr(model.config, heads))
        if (heads := dict(self.gguf_interleaved).get(local)) is not None:
            return np.arange(rows).reshape(getattr(model.config, heads), 3, -1).swapaxes(0, 1).reshape(-1)
        return None


def _linear_of(conv: nn.Module) -> nn.Linear:
    """A Conv1D (y = x W + b, W cols × rows) as the nn.Linear of the same function (W rows × cols)."""
    cols, rows = conv.weight.shape
    lin = nn.Linear(cols, rows, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    lin.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        lin.bias = conv.bias
    return lin


def rotary_rows(rows: int, heads: int) -> np.ndarray:
    """Row order of a q/k weight in ggml's rotary layout, given in HF rows: the inverse of the reverse permute that
    transformers applies on reading a llama GGUF."""
    half = rows // heads // 2
    back = np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)  # gguf row of each HF row
    return np.argsort(back)


def register(adapter: Adapter) -> Adapter:
    return ADAPTERS.register(adapter.family)(adapter)


def adapter_for(model) -> Adapter:
    """The adapter of a model, or of a config (before the model is built); a one-line error listing the supported
    architectures where there is none."""
    model_type = getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
