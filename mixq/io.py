"""Atomic files and the saved-model folder.

A saved folder holds `model.safetensors` (packed codes, scales, zeros; every other parameter in fp16),
`config.json` and the tokenizer (Hugging Face), `plan.json`, `profile.json` and `mixq.json` (what was done).
It is written under a temporary name and renamed into place, so an interrupted run never leaves a folder that
looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .plan import Plan
from .runtime.half import half_modules
from .runtime.qlinear import QuantEmbedding, QuantLinear

MARKER = "mixq.json"
FLOAT_DTYPE = torch.float16  # storage of everything that is not a quantized block linear


class SavedModelError(ValueError):
    pass


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_file(path: str | Path, what: str) -> str:
    """A file's text, or a one-line error naming what the file should have been."""
    if not Path(path).is_file():
        raise ValueError(f"{what} not found: {path}")
    return Path(path).read_text()


def check_out_dir(out: str | Path, source: str) -> None:
    """Refuse, before any work, an output folder that holds something else than an earlier run on `source`."""
    out = Path(out)
    if not out.exists():
        ancestor = next(p for p in out.parents if p.exists())  # missing folders are created at save
        if not ancestor.is_dir():
            raise SavedModelError(f"cannot create {out}: {ancestor} is a file, not a folder")
        return
    if not out.is_dir():
        raise SavedModelError(f"{out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    marker = out / MARKER
    if not marker.exists():
        raise SavedModelError(f"{out} is not empty and holds no mixq model; choose another --out or empty it")
    try:
        old = json.loads(marker.read_text()).get("source")
    except (json.JSONDecodeError, AttributeError):
        old = None
    if old != source:
        raise SavedModelError(f"{out} already holds a different model (quantized from {old}); "
                              "choose another --out or delete it")


@contextmanager
def staged_folder(out: str | Path):
    """A temporary folder beside `out` to write into; when the block ends it is swapped into place (replacing an
    earlier `out`), and if the block fails it is removed: `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        tmp.chmod(0o755)
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_quantized(model: nn.Module, tokenizer, plan: Plan, out: str | Path, meta: dict,
                   extra_files: dict[str, str], blocks: "BlockShards | None" = None) -> None:
    """Write the folder under a temporary name, then swap it into place (replacing an earlier run's folder). A
    streamed model is written in shards, a block or a table each (`model-0000k-of-0000n.safetensors` and
    `model.safetensors.index.json`, as Hugging Face writes them), one shard in memory at a time, its blocks
    already written by the apply where `blocks` holds them; any other in one model.safetensors."""
    from .models.stream import streamer_of

    written = blocks.names() if blocks is not None else set()
    tensors = {k: v for k, v in stored_tensors(model, plan).items() if k not in written}
    with staged_folder(out) as tmp:
        streamer = streamer_of(model)
        if streamer is None:
            save_file({k: (v() if callable(v) else v).contiguous() for k, v in tensors.items()},
                      tmp / "model.safetensors", metadata={"format": "mixq"})
        else:
            _save_shards(tensors, streamer.shard_of, tmp, blocks)
        (tmp / "config.json").write_text(model.config.to_json_string())
        tokenizer.save_pretrained(tmp)
        (tmp / "plan.json").write_text(plan.to_json())
        for fname, text in extra_files.items():
            (tmp / fname).write_text(text)
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))


def stored_tensors(model: nn.Module, plan: Plan, prefix: str = "") -> dict:
    """What the saved folder stores of `model` (of its modules under `prefix`): name → the tensor, or a function
    that gives it (a streamed table, read from disk only then). QuantLinear buffers as they are; every other
    parameter in FLOAT_DTYPE."""
    from .models.stream import value

    stored = set()  # a head tied to a QuantEmbedding holds the table's buffers: stored once, under the table
    tensors: dict[str, object] = {}
    for name, p in model.named_parameters():
        if name.startswith(prefix) and not _in_quantized(name, plan):
            tensors[name] = (lambda name=name: value(model, name, FLOAT_DTYPE)) if p.is_meta else \
                (lambda p=p: p.detach().to(FLOAT_DTYPE))
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and name.startswith(prefix):
            for key, buf in m.named_buffers(recurse=False):
                if id(buf) not in stored:
                    stored.add(id(buf))
                    tensors[f"{name}.{key}"] = buf
    return tensors


INDEX = "model.safetensors.index.json"


class BlockShards:
    """A streamed model's packed blocks, written as the apply finishes each (a block's QuantLinear buffers and its
    other parameters as saved) into a folder beside the output, under a key of everything that decides them: a run
    started again with the same key keeps the blocks already written, and save_quantized moves them into the
    output folder as its first shards. Nothing here looks like a finished output."""

    PROGRESS = "progress.json"

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key
        self.blocks: dict[int, dict] = {}  # block → {"names": its tensors, "bytes": their size}
        progress = self.folder / self.PROGRESS
        try:
            d = json.loads(progress.read_text()) if progress.exists() else {}
        except (OSError, ValueError):
            d = {}
        if d.get("key") == key:
            self.blocks = {int(i): b for i, b in d["blocks"].items() if (self.folder / self.file(int(i))).is_file()}
        elif self.folder.exists():  # from other arguments: start over
            shutil.rmtree(self.folder)

    @staticmethod
    def file(i: int) -> str:
        return f"block-{i:05d}.safetensors"

    def done(self, i: int) -> bool:
        return i in self.blocks

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.file(i)}.partial"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "mixq"})
        os.replace(tmp, self.folder / self.file(i))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self.blocks[i] = {"names": sorted(tensors), "bytes": size}
        atomic_write_text(self.folder / self.PROGRESS, json.dumps({"key": self.key, "blocks": self.blocks}))

    def read(self, i: int) -> dict[str, torch.Tensor]:
        try:
            return load_file(self.folder / self.file(i))
        except (OSError, SafetensorError) as e:
            raise SavedModelError(f"{self.folder / self.file(i)} is unreadable: {e}") from e

    def names(self) -> set[str]:
        return {n for b in self.blocks.values() for n in b["names"]}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _save_shards(tensors: dict, shard_of, folder: Path, blocks: "BlockShards | None" = None) -> None:
    """The tensors in shards by `shard_of(name)` (a key of their unit), each built, written and freed in turn;
    first the block files the apply wrote (`blocks`), moved in."""
    groups: dict[str, list[str]] = {}
    for name in tensors:
        groups.setdefault(shard_of(name), []).append(name)
    written = sorted(blocks.blocks) if blocks is not None else []
    n = len(written) + len(groups)
    weight_map, total = {}, 0
    for k, i in enumerate(written):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.link(blocks.folder / blocks.file(i), folder / file)  # (a link: the block files stay till the end)
        total += blocks.blocks[i]["bytes"]
        weight_map.update(dict.fromkeys(blocks.blocks[i]["names"], file))
    for k, names in enumerate(groups.values(), start=len(written)):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        shard = {n: (tensors[n]() if callable(tensors[n]) else tensors[n]).contiguous() for n in names}
        save_file(shard, folder / file, metadata={"format": "mixq"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(names, file))
        del shard
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A saved folder's tensors: model.safetensors, or every shard its index names (each checked)."""
    if not (path / INDEX).exists():
        return load_file(path / "model.safetensors")
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    state = {}
    for file in sorted(set(weight_map.values())):
        if not (path / file).is_file():
            raise SavedModelError(f"{path} is incomplete: its index names {file}, which is not there")
        state.update(load_file(path / file))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise SavedModelError(f"{path} is corrupt: its index puts {missing[0]} in a shard that does not hold it")
    return state


def _in_quantized(param_name: str, plan: Plan) -> bool:
    owner = param_name.rsplit(".", 1)[0]
    return owner in plan.layers and param_name.endswith(".weight")


def install_quant_linears(model: nn.Module, plan: Plan) -> None:
    """Swap each planned nn.Linear for an empty QuantLinear of its spec, and an embedding table for a
    QuantEmbedding (the loader fills the buffers)."""
    from .models import adapter_for

    adapter = adapter_for(model)
    for name, cand in plan.layers.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Embedding):
            model.set_submodule(name, QuantEmbedding(m.num_embeddings, m.embedding_dim, cand.spec,
                                                     adapter.table_scale(m)))
        else:
            model.set_submodule(name, QuantLinear(m.in_features, m.out_features, cand.spec,
                                                  m.bias is not None or cand.bias))


def load(path: str | Path):
    """A saved mixq folder as a transformers model (float32 compute, for inference: no parameter requires a
    gradient) whose block linears are QuantLinear."""
    from transformers import AutoConfig

    from .models import adapter_for

    path = Path(path)
    if not (path / MARKER).exists():
        raise SavedModelError(f"{path} is not a mixq model folder (no {MARKER})")
    try:
        plan = Plan.from_json((path / "plan.json").read_text())
        state = _load_tensors(path)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise SavedModelError(f"{path} is corrupt: {str(e).splitlines()[0][:200]}") from e
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(path)
    adapter = adapter_for(config)
    with init_empty_weights(include_buffers=False):  # parameters on meta: the fp32 model is never allocated
        model = adapter.job.model_class.from_config(config, dtype=torch.float32)
    adapter.prepare(model)  # Conv1D layers as nn.Linear, as they were saved
    names = {id(m): n for n, m in model.named_modules()}
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and (head.weight is table.weight or bool(getattr(config, "tie_word_embeddings", False)))
    table_name, head_name = names[id(table)], names.get(id(head))
    with init_empty_weights(include_buffers=True):  # the packed buffers too are assigned, not copied into
        install_quant_linears(model, plan)
    keep_half, half_head = set(), None  # float tables stay fp16 as stored (runtime/half.py)
    if table_name not in plan.layers and isinstance(table, nn.Embedding):
        float_head = isinstance(head, nn.Linear) and head_name not in plan.layers
        half_table, half_head = half_modules(table, head if float_head else None, adapter.table_scale(table))
        model.set_submodule(table_name, half_table)
        keep_half.add(f"{table_name}.weight")
        if half_head is not None and not tied:
            model.set_submodule(head_name, half_head)
            keep_half |= {f"{head_name}.weight", f"{head_name}.bias"}
    state = {k: v.float() if v.dtype == FLOAT_DTYPE and not k.endswith(".scales") and k not in keep_half else v
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied_keys = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied_keys and not _is_tied(model, k)]
    if missing or unexpected:
        raise SavedModelError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied and table_name in plan.layers:  # the head computes from the table's packed buffers
        model.set_submodule(head_name, model.get_input_embeddings().tied_head())
    elif tied and half_head is not None:  # … or from the fp16 table itself
        half_head.weight = model.get_input_embeddings().weight
        model.set_submodule(head_name, half_head)
    else:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SavedModelError(f"{path} does not hold {left[0]} (and {len(left) - 1} more)")
    model.eval().requires_grad_(False)  # for inference: a forward pass outside no_grad must not keep every
    return model                         # layer's decoded weight for a backward pass


def _is_tied(model: nn.Module, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and key.startswith(next(n for n, m in model.named_modules() if m is out))


def file_bits(meta: dict) -> float | None:
    """Bits per parameter of a saved run's whole weights file (its safetensors: tables, norms, headers, everything,
    over every parameter, a tied table once), from its mixq.json; None where it was saved before mixq recorded it."""
    if not meta.get("weight_bytes") or not meta.get("parameters"):
        return None
    return meta["weight_bytes"] * 8 / meta["parameters"]


def folder_file_bits(target) -> float | None:
    """file_bits of a mixq folder; None for anything else."""
    marker = Path(target) / MARKER
    return file_bits(json.loads(marker.read_text())) if marker.is_file() else None


def open_model(target: str):
    """(model, tokenizer, block-linear bpw) of a mixq folder, a .gguf file, a Hugging Face folder or 'smollm2'
    (the last three in float: 32 bits a weight)."""
    from .models import load_model

    if Path(target).is_dir() and (Path(target) / MARKER).exists():
        from transformers import AutoTokenizer

        return load(target), AutoTokenizer.from_pretrained(target), \
            json.loads((Path(target) / MARKER).read_text())["bpw"]
    net, tok, _ = load_model(target)
    return net, tok, 32.0
