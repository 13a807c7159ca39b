"""Streamed weights: a model whose float weights need not fit in memory. The model is built on the meta device (its
buffers, such as rotary tables, real); a `WeightSource` reads each tensor from disk on demand in its stored dtype
(safetensors shards through `safe_open`, a GGUF through gguf-py's memory map, dequantized one tensor at a time),
and a `Streamer` puts a block's weights in place (float32) when the block runs and takes them back to the meta
device after. Everything outside the blocks (embedding table, final norm, head) is read once.

Every forward call of a block loads and releases it (hooks), so code that runs the whole model works unchanged,
one block in memory at a time; `Streamer.hold` keeps a block loaded while the profile or the apply works on its
layers, and `keep` leaves a block in memory for good (the apply's packed blocks).

A released block's memory goes back to the system (`trim_heap`): else the C heap keeps the holes that a block's
large tensors leave, and a streamed run's memory grows with the number of blocks (1.5 GB over 30 blocks of
Llama-3-8B's shape, benchmarks/results/scale.md)."""
from __future__ import annotations

import ctypes
import functools
import json
import shutil
import tempfile
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, adapter_for


class StreamError(ValueError):
    """A source of weights that cannot be read; the message says which file or tensor."""


class SafetensorsSource:
    """The tensors of a Hugging Face folder: `model.safetensors`, or the shards `model.safetensors.index.json`
    names. Every shard is checked when the source opens: present, and as long as its header says."""

    def __init__(self, folder: Path, model: nn.Module):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise StreamError(f"{index} is not a readable safetensors index: {e}") from e
        elif (folder / "model.safetensors").exists():
            weight_map = None
        else:
            raise StreamError(f"{folder} holds no model.safetensors and no model.safetensors.index.json")
        shards = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        held = {}
        for shard in shards:
            path = folder / shard
            if not path.is_file():
                raise StreamError(f"{index.name} names shard {shard}, which is not in {folder}")
            _check_length(path)
            with safe_open(str(path), framework="pt") as f:
                held[shard] = set(f.keys())
        where = weight_map or {k: shards[0] for k in held[shards[0]]}
        for name, shard in where.items():
            if name not in held[shard]:
                raise StreamError(f"{index.name} puts {name} in {shard}, which does not hold it")
        self.folder = folder
        self.where = {n: (key, where[key]) for n, key in _checkpoint_keys(model, where).items()}

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, in its stored dtype. The shard is opened for this one read: its memory map (and the pages
        the read touched) goes with the tensor, not with the source."""
        from safetensors import safe_open

        key, shard = self.where[name]
        with safe_open(str(self.folder / shard), framework="pt") as f:
            return f.get_tensor(key)


def _checkpoint_keys(model: nn.Module, keys) -> dict[str, str]:
    """The model's parameter name → the checkpoint's key that holds it: the checkpoint's keys renamed as
    transformers renames them on loading (its conversion mapping, e.g. GPT-NeoX's embed_out → lm_head), with or
    without the base model's prefix (a GPT-2 checkpoint's h.0… for transformer.h.0…). A mapping that transforms
    tensors, not only their names, is refused (it cannot be read a tensor at a time)."""
    import re

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renames = []
    for t in get_model_conversion_mapping(model):
        if not isinstance(t, WeightRenaming):
            raise StreamError(f"transformers converts {type(model).__name__}'s checkpoint tensors on loading; mixq "
                              "cannot stream them")
        renames += [(re.compile(src), dst) for src, dst in zip(t.source_patterns, t.target_patterns * len(
            t.source_patterns))]
    renamed = {}
    for key in keys:
        new = key
        for pattern, dst in renames:
            new = pattern.sub(dst, new)
        renamed.setdefault(new, key)
    prefix = getattr(model, "base_model_prefix", "") + "."
    out = {}
    for name, _ in model.named_parameters():
        for candidate in (name, prefix + name, name.removeprefix(prefix)):
            if candidate in renamed:
                out[name] = renamed[candidate]
                break
    return out


def _check_length(path: Path) -> None:
    """Refuse a safetensors file shorter than its header says (a truncated download or copy)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StreamError(f"{path} is truncated (no header)")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise StreamError(f"{path} is not a safetensors file (unreadable header)") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise StreamError(f"{path} is truncated: {size} bytes where its header needs {8 + n + end}")


class GGUFSource:
    """The tensors of a GGUF file under their Hugging Face names: gguf-py's name tables, each tensor dequantized on
    demand from the memory-mapped file, its rows put back in Hugging Face's order and its norm convention undone
    (the inverse of the adapter's gguf_rows and gguf_norm_offset)."""

    def __init__(self, path: Path, model: nn.Module, adapter: Adapter, reader=None):
        import gguf

        self.reader = reader or gguf.GGUFReader(path)
        self.path, self.model, self.adapter = path, model, adapter
        names = adapter.gguf_names(model)
        tensors = {t.name: t for t in self.reader.tensors}
        self.where = {}
        for hf, _ in model.named_parameters():
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name in tensors:
                self.where[hf] = tensors[name]

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        import gguf

        t = self.where[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(d) for d in reversed(t.shape)]) if data.ndim != len(t.shape) else data
        perm = self.adapter.gguf_rows(self.model, name, len(data))
        if perm is not None:
            data = data[np.argsort(perm)]
        if t.name.endswith("norm.weight"):
            data = data - self.adapter.gguf_norm_offset
        return torch.from_numpy(np.ascontiguousarray(data))


class _Aliased:
    """A source under which some names read another's tensor (an untied head reads the table's)."""

    def __init__(self, source, aliases: dict[str, str]):
        self.inner, self.aliases = source, aliases
        self.oriented = getattr(source, "oriented", False)

    def keys(self) -> set[str]:
        return self.inner.keys() | set(self.aliases)

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self.aliases.get(name, name))


class _Written:
    """Tensors the run wrote itself (Streamer.rewrite), float32 and in the model's orientation, by parameter
    name."""

    oriented = True  # (a Conv1D weight is already turned: _oriented leaves it)

    def __init__(self, folder: Path):
        self.folder, self.where = folder, {}

    def add(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, self.folder / file)
        self.where.update(dict.fromkeys(tensors, file))

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.folder / self.where[name]), framework="pt") as f:
            return f.get_tensor(name)


class Streamer:
    """Puts a streamed model's weights in place from its source, a unit at a time (see the module's docstring). The
    units are the blocks and the tables (the embedding table, the head): each is read when it runs or is held and
    released after. The few other parameters (final norm, position table) are read once."""

    def __init__(self, model: nn.Module, source, device: str | torch.device = "cpu"):
        self.model, self.source, self.device = model, source, torch.device(device)
        self.adapter = adapter = adapter_for(model)
        self.held: dict[str, int] = {}  # unit → depth of hold
        self.kept: set[str] = set()
        self.loaded: set[str] = set()  # units whose weights are in memory
        self.loads = 0  # tensors read from the source (a test's measure of what streamed)
        # the most blocks whose weights were alive at once, kept ones aside (a test's measure of the bound): a
        # weight counts until its memory is freed, not only while it is in place (an autograd graph may hold it)
        self.peak = 0
        self.live: dict[str, int] = {}  # block → its weights read and not yet freed
        self.rounded: dict[str, torch.dtype] = {}  # parameters stored in a lower precision: rounded on reading
        self.scratch: Path | None = None  # the folder `rewrite` writes (None: a new one in the system's temp)
        self.passes = 0  # the transforms `rewrite` made (each writes a folder pass-N in the scratch)
        missing = sorted(n for n, _ in model.named_parameters() if n not in source.keys())
        if missing:
            raise StreamError(f"the weights do not hold the model's {missing[0]}"
                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
        blocks = _blocks(model, adapter)
        tables = [n for n in (adapter.embed, adapter.head) if n is not None]
        by_id = {id(p): n for n, p in model.named_parameters()}  # a tied head's weight is the table's
        self.params = {u: list(dict.fromkeys(by_id[id(p)] for p in model.get_submodule(u).parameters()))
                       for u in blocks + tables}
        self.blocks = set(blocks)
        self.hooks = []
        for unit in self.params:
            module = model.get_submodule(unit)
            self.hooks += [module.register_forward_pre_hook(self._pre(unit)),
                           module.register_forward_hook(self._post(unit))]
        inside = {n for names in self.params.values() for n in names}
        self.load([n for n, _ in model.named_parameters() if n not in inside])

    def to(self, device: str | torch.device) -> None:
        """Read blocks onto `device` from now on; move what is in memory (resident parameters, buffers) there."""
        self.device = torch.device(device)
        for module in self.model.modules():
            for key, t in module._buffers.items():
                if t is not None and not t.is_meta:
                    module._buffers[key] = t.to(self.device)
            for p in module._parameters.values():
                if p is not None and not p.is_meta:
                    p.data = p.data.to(self.device)

    def unit(self, which: int | str) -> str:
        """The unit of block `which` (an index) or of module path `which`."""
        return f"{self.adapter.blocks}.{which}" if isinstance(which, int) else which

    def load_unit(self, unit: str) -> None:
        absent = [n for n in self.params[unit] if getattr(self._param(n), "is_meta", False)]
        self.load(self.params[unit])
        self.loaded.add(unit)
        if unit in self.blocks:
            for name in absent:
                self.live[unit] = self.live.get(unit, 0) + 1
                weakref.finalize(self._param(name), self._freed, unit)
            self.peak = max(self.peak, sum(1 for u, n in self.live.items() if n and u not in self.kept))

    def _freed(self, unit: str) -> None:
        self.live[unit] -= 1

    def _param(self, name: str) -> nn.Parameter | None:
        return _parameter(self.model, name)

    def release_unit(self, unit: str) -> None:
        """Release a unit's parameters, but those another unit that stays holds too (a head tied to a kept
        table)."""
        staying = {n for u in self.kept | set(self.held) if u != unit for n in self.params[u]}
        self.release([n for n in self.params[unit] if n not in staying])
        self.loaded.discard(unit)
        trim_heap()

    def shard_of(self, name: str) -> str:
        """The unit a saved tensor belongs to (its block, its table), or "" for the rest: a saved model's shard."""
        for unit in self.params:
            if name.startswith(unit + "."):
                return unit
        return ""

    def load(self, names: list[str]) -> None:
        """Read parameters still on the meta device into place (float32, on the streamer's device)."""
        self.loads += fill(self.model, self.source, names, self.device, self.rounded)

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A parameter's value (as `load` would put it in place) in `dtype`, without keeping it. A dtype no wider
        than the one it is rounded to is cast straight from the stored tensor (the same values, no float32 copy
        of a table)."""
        p = dict(self.model.named_parameters())[name]
        if not p.is_meta:
            return p.detach().to(dtype)
        t = _oriented(self.model, self.source, name)
        if self.rounded.get(name) == dtype:
            return t.to(self.device, dtype)
        return _float32(t, self.device, self.rounded.get(name)).to(dtype)

    def release(self, names: list[str]) -> None:
        """Put parameters back on the meta device (their memory freed)."""
        for name in names:
            p = _parameter(self.model, name)
            if p is not None and not p.is_meta:
                _swap(self.model, p, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def round_on_load(self, names, dtype: torch.dtype) -> None:
        """Parameters (on the meta device now) that are to hold `dtype`'s values: rounded whenever read."""
        self.rounded.update(dict.fromkeys(names, dtype))

    @contextmanager
    def hold(self, which: int | str):
        """A unit loaded for the whole context (its forward calls do not release it)."""
        unit = self.unit(which)
        self.held[unit] = self.held.get(unit, 0) + 1
        self.load_unit(unit)
        try:
            yield
        finally:
            self.held[unit] -= 1
            if not self.held[unit]:
                del self.held[unit]
                if unit not in self.kept:
                    self.release_unit(unit)

    def keep(self, which: int | str) -> None:
        """Leave a unit in memory from now on (the apply has packed it)."""
        self.kept.add(self.unit(which))

    @contextmanager
    def recomputing(self):
        """Backward passes through the whole model with one block in memory: each block's forward runs under
        activation checkpointing (torch.utils.checkpoint), loading the block for the forward and again when the
        backward pass recomputes it, and keeping none of its weights in between. The autograd graph holds each
        block's input, not its weights; the gradients are those of the model in memory."""
        from torch.utils.checkpoint import checkpoint

        patched = []
        for unit in sorted(self.blocks):
            module = self.model.get_submodule(unit)
            if "forward" in vars(module):
                continue

            def run(*args, _unit=unit, _forward=module.forward, **kwargs):
                with self.hold(_unit):
                    return _forward(*args, **kwargs)

            def forward(*args, _run=run, **kwargs):
                return checkpoint(_run, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            patched.append(module)
        try:
            yield True
        finally:
            for module in patched:
                del module.forward

    def untie_head(self) -> None:
        """Give a head tied to the embedding table a weight of its own (adapter.untie_head), read from the table's
        tensor on disk."""
        a = self.adapter
        table, head = (self.model.get_submodule(u) for u in (a.embed, a.head))
        if head.weight is not table.weight:
            return
        a.untie_head(self.model)  # (a meta parameter of its own)
        name, of = f"{a.head}.weight", f"{a.embed}.weight"
        self.source = _Aliased(self.source, {name: of})
        self.params[a.head] = [name if n == of else n for n in self.params[a.head]]

    def rewrite(self, change) -> None:
        """Change every unit once by `change(unit, module)` (a transform, in float32, in place), each unit read,
        changed and written in turn to the scratch folder, which the streamer reads from from then on: a transform
        costs its work once, not at every read. The folder (float32: 4 bytes a weight) is checked for room first,
        replaces one an earlier run left, and is removed by `remove_scratch` or with the streamer; a second
        transform reads the first one's files and writes its own beside them."""
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix="mixq-transformed-"))
        earlier = self.source if isinstance(self.source, _Written) else None
        self.passes += 1
        written = _Written(self.scratch / f"pass-{self.passes}")
        units = _changed_units(self.model, self.adapter)
        need = 4 * sum(_parameter(self.model, n).numel() for u in units for n in self.params[u])
        if earlier is None:
            shutil.rmtree(self.scratch, ignore_errors=True)  # (an earlier run's)
            weakref.finalize(self, shutil.rmtree, self.scratch, True)
        self.scratch.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.scratch.parent).free
        if free < need:
            raise StreamError(f"transforming a streamed model needs {need / 1e9:.2f} GB of scratch (its float32 "
                              f"weights) on the disk of {self.scratch.parent}, which has {free / 1e9:.2f} GB free")
        written.folder.mkdir(parents=True)
        for k, unit in enumerate(units):
            with self.hold(unit):
                change(unit, self.model.get_submodule(unit))
                written.add(f"unit-{k:05d}.safetensors",
                            {n: _parameter(self.model, n).detach() for n in self.params[unit]})
        self.source = written
        if earlier is not None:
            shutil.rmtree(earlier.folder, ignore_errors=True)

    def remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _pre(self, unit: str):
        def hook(module, _args):
            if "forward" in vars(module):  # a block whose forward is replaced loads itself (recomputing) or
                return                      # needs no weights (capture.block_inputs passes its input on)
            self.load_unit(unit)
        return hook

    def _post(self, unit: str):
        def hook(module, _args, _out):
            if unit not in self.held and unit not in self.kept and "forward" not in vars(module):
                self.release_unit(unit)
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def fill(model: nn.Module, source, names: list[str], device="cpu", rounded: dict | None = None) -> int:
    """Read those of `names` (parameters) still on the meta device from `source` into place, float32 on `device`
    (a Conv1D weight transposed, as the adapter made its module nn.Linear); the count read. Refuse a missing
    tensor or one of another shape in one line."""
    keys, n = source.keys(), 0
    for name in names:
        p = _parameter(model, name)
        if p is None or not p.is_meta:
            continue
        if name not in keys:
            raise StreamError(f"the weights hold no {name}")
        t = _oriented(model, source, name)
        if t.shape != p.shape:
            raise StreamError(f"the weights' {name} is {tuple(t.shape)}, where the config makes it {tuple(p.shape)}")
        t = _float32(t, device, (rounded or {}).get(name))
        _swap(model, p, nn.Parameter(t, requires_grad=False))
        n += 1
    return n


CHUNK = 1 << 24  # elements converted at a time: the rounding of a 128k-row table costs 64 MB, not a second copy


def _float32(t: torch.Tensor, device, rounded: torch.dtype | None = None) -> torch.Tensor:
    """A stored tensor as a new float32 tensor on `device` (never the file's memory map), its values rounded to
    `rounded` first where given. Converted a slice of rows at a time, so that a table in memory costs its stored
    copy and its float32 one, nothing more (the whole rounded copy and a second float32 one was 5 GB of peak for
    Llama-3-8B's embedding table)."""
    def convert(part):
        return (part.to(rounded) if rounded is not None else part).to(device, torch.float32)

    if t.dim() == 0 or t.numel() <= CHUNK:
        out = convert(t)
        return out.clone() if out.data_ptr() == t.data_ptr() else out.contiguous()
    out = torch.empty(t.shape, dtype=torch.float32, device=device)
    rows = max(1, CHUNK // t[0].numel())
    for a in range(0, len(t), rows):
        out[a:a + rows] = convert(t[a:a + rows])
    return out


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; nothing where there is none). glibc
    serves allocations under its mmap threshold (which grows up to 32 MB as large blocks are freed) from the heap,
    and the holes a block's tensors leave there stay resident: without this, a streamed run's peak grew by 1.74
    blocks' fp32 weights from 2 to 32 blocks of Llama-3-8B's shape. A trim costs well under a millisecond against a
    block's seconds of work."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def _parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter a full name names (None where its module holds none by that name: a packed layer)."""
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name)._parameters.get(attr)


def _oriented(model: nn.Module, source, name: str) -> torch.Tensor:
    """Parameter `name` as the source stores it, in the model's orientation: a Conv1D's weight (GPT-2) transposed,
    as the adapter made its module nn.Linear."""
    t = source.get(name)
    adapter = adapter_for(model)
    module_name, _, attr = name.rpartition(".")
    turned = not getattr(source, "oriented", False) and adapter.transposed
    if turned and attr == "weight" and adapter.in_block(module_name) in adapter.linears:
        t = t.t()
    return t


def _swap(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Replace a parameter in every module that holds it (a head tied to its table is one parameter)."""
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is old:
                module._parameters[attr] = new


_STREAMERS: "weakref.WeakKeyDictionary[nn.Module, Streamer]" = weakref.WeakKeyDictionary()


def streamer_of(model: nn.Module) -> Streamer | None:
    """The streamer of a streamed model; None for a model in memory."""
    return _STREAMERS.get(model)


@contextmanager
def hold(model: nn.Module, which: int | str):
    """Block `which` (an index) or table `which` (a module path) of `model` in memory for the context: read from
    disk where the model is streamed."""
    s = streamer_of(model)
    if s is None:
        yield
    else:
        with s.hold(which):
            yield


def recomputing(model: nn.Module):
    """A context for backward passes through `model`: Streamer.recomputing where it is streamed (it yields True;
    else nothing is done and it yields False)."""
    s = streamer_of(model)
    return s.recomputing() if s is not None else nullcontext(False)


def keep(model: nn.Module, which: int | str) -> None:
    s = streamer_of(model)
    if s is not None:
        s.keep(which)


def untie_head(model: nn.Module) -> None:
    """adapter.untie_head, for a streamed model too (its head then reads the table's tensor from disk)."""
    s = streamer_of(model)
    if s is not None:
        s.untie_head()
    else:
        adapter_for(model).untie_head(model)


def change_units(model: nn.Module, change) -> None:
    """`change(unit, module)` in place on every unit of the model: its embedding table, its head (unless tied to
    the table) and each block. In memory, now; streamed, once, into a scratch folder it is read from afterwards
    (Streamer.rewrite)."""
    s = streamer_of(model)
    if s is not None:
        s.rewrite(change)
        return
    for unit in _changed_units(model, adapter_for(model)):
        change(unit, model.get_submodule(unit))


def _blocks(model: nn.Module, adapter: Adapter) -> list[str]:
    return [f"{adapter.blocks}.{i}" for i in range(len(adapter.block_list(model)))]


def _changed_units(model: nn.Module, adapter: Adapter) -> list[str]:
    """The units a transform changes: the embedding table, the head unless it is the table (tied), each block."""
    head = [adapter.head] if adapter.head is not None and not adapter.tied(model) else []
    return [adapter.embed] + head + _blocks(model, adapter)


def round_on_load(model: nn.Module, names, dtype: torch.dtype) -> None:
    """Parameters of a streamed model that are to hold `dtype`'s values: rounded whenever they are read."""
    streamer_of(model).round_on_load(names, dtype)


def value(model: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Parameter `name`'s value in `dtype`: read from disk (not kept) where it is streamed and not in memory."""
    s = streamer_of(model)
    return s.read(name, dtype) if s is not None else dict(model.named_parameters())[name].detach().to(dtype)


def streamed(model: nn.Module, source, device="cpu") -> nn.Module:
    """Attach a Streamer reading `source` to a model built on the meta device; the model, ready to run."""
    _STREAMERS[model] = Streamer(model, source, device)
    return model


def meta_model(config, adapter: Adapter) -> nn.Module:
    """The model of `config` with every parameter on the meta device and its buffers real (rotary tables)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = adapter.job.model_class.from_config(config)
    model.tie_weights()  # (from_config on the meta device leaves a tied head a parameter of its own)
    return adapter.prepare(model).eval()
