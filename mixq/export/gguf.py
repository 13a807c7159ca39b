"""GGUF export: the codes and scales mixq chose, written as the ggml block types that hold them exactly, so that
llama.cpp runs the very model mixq evaluated.

mixq formats that are ggml types (`GGML_TYPES`, `K_QUANTS`):
    32-weight groups with an fp16 scale,
        sym 4 / 5 / 8 bits → Q4_0 / Q5_0 / Q8_0   (w = d · (q − 2^(bits−1)), d signed: ggml's convention too)
        min 4 / 5 bits     → Q4_1 / Q5_1          (w = d · q + m, m an fp16 minimum)
        iq4nl (4 bits)     → IQ4_NL               (w = d · L[q], L ggml's 16 non-uniform levels)
    16- or 32-weight groups with scale codes and one fp16 step per 256 weights (rows of a multiple of 256),
        sym 3 bits, 6-bit codes, groups of 16 → Q3_K     (w = d · (sc − 32) · (q − 4))
        sym 6 bits, 8-bit codes, groups of 16 → Q6_K     (w = d · (sc − 128) · (q − 32))
        iq4nl, 6-bit codes, groups of 32      → IQ4_XS   (w = d · (sc − 32) · L[q])
        kmin 2 bits, 4-bit codes, groups of 16 → Q2_K    (w = d · sc · q − dmin · m)
        kmin 4 / 5 bits, 6-bit codes, groups of 32 → Q4_K / Q5_K
        iq 2 bits, 4-bit codes, groups of 16  → IQ2_S    (runs of 8 on its E8 points: w = d · (sc + ½) / 4 · ±p)
        iq 3 bits, 4-bit codes, groups of 32  → IQ3_S    (runs of 4 on its D4 points: w = d · (2 · sc + 1) · ±p)
`mixq quantize --compatible gguf` allocates among these only. Every other tensor is written as mixq stores it:
norms in F32 (Gemma's as 1 + γ, as its GGUF files store them), other float matrices in F16.

A model quantized from a GGUF is written on its source file: the metadata (architecture, hyper-parameters,
tokenizer) is copied and each tensor replaced by the saved model's. A model quantized from a Hugging Face folder
gets its metadata from its config and the saved folder's tokenizer.json (models.gguf_meta: what llama.cpp's
convert_hf_to_gguf.py writes) and every tensor it has, with Llama 3's rotary factors as `rope_freqs`. Either way
tensors are named by gguf-py's tables for the architecture and their rows put in ggml's order (the adapter's
`gguf_rows`: Llama's q and k in its rotary order, GPT-NeoX's fused q/k/v as all q, all k, all v).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..formats import QuantizedTensor, QuantSpec
from ..runtime.qlinear import QuantLinear
from . import Exporter, ExportError, register

BLOCK = 32

# (bits, grid) of the 32-group fp16-scale formats → ggml type name
GGML_TYPES = {(4, "sym"): "Q4_0", (4, "min"): "Q4_1", (5, "sym"): "Q5_0", (5, "min"): "Q5_1", (8, "sym"): "Q8_0",
              (4, "iq4nl"): "IQ4_NL"}
SUPER = 256
K_QUANTS = {QuantSpec.of(2, 16, "kmin", 4, SUPER): "Q2_K", QuantSpec.of(3, 16, "sym", 6, SUPER): "Q3_K",
            QuantSpec.of(4, 32, "kmin", 6, SUPER): "Q4_K", QuantSpec.of(5, 32, "kmin", 6, SUPER): "Q5_K",
            QuantSpec.of(6, 16, "sym", 8, SUPER): "Q6_K", QuantSpec.of(4, 32, "iq4nl", 6, SUPER): "IQ4_XS",
            QuantSpec.of(2, 16, "iq", 4, SUPER): "IQ2_S", QuantSpec.of(3, 32, "iq", 4, SUPER): "IQ3_S"}


def ggml_type(spec: QuantSpec) -> str | None:
    """The ggml type that stores `spec` exactly, or None."""
    if spec.high:  # split rows: no ggml type has two widths in a row
        return None
    if spec in K_QUANTS:
        return K_QUANTS[spec]
    if spec.group_size != BLOCK or spec.double:
        return None
    return GGML_TYPES.get((spec.bits, spec.grid))


def gguf_specs() -> list[QuantSpec]:
    """The formats `--compatible gguf` allocates among (the k-quants only where rows are multiples of 256)."""
    return [QuantSpec.of(b, BLOCK, g) for b, g in GGML_TYPES] + list(K_QUANTS)


def check_rows(model: torch.nn.Module) -> None:
    """Refuse, before any work, a model with a block linear whose rows no ggml block type divides."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    for name in adapter.layer_names(model):
        cols = model.get_submodule(name).in_features
        if cols % BLOCK:
            raise ExportError(f"{name}'s rows of {cols} weights are not a multiple of {BLOCK}: no ggml block type "
                              "fits them, so --compatible gguf cannot quantize this model")


def encode_blocks(qt: QuantizedTensor) -> np.ndarray:
    """A quantized rows × cols tensor → ggml blocks, uint8 rows × (cols / 32 · block bytes)."""
    name = ggml_type(qt.spec)
    if name is None:
        raise ExportError(f"{qt.spec.name} is not a ggml type")
    rows, cols = qt.codes.shape
    if name in ("Q3_K", "Q6_K"):
        return _encode_k(qt, name).reshape(rows, -1)
    if name == "IQ4_XS":
        return _encode_iq4_xs(qt).reshape(rows, -1)
    if name in ("IQ2_S", "IQ3_S"):
        return _encode_iq_lattice(qt, name).reshape(rows, -1)
    if name in ("Q2_K", "Q4_K", "Q5_K"):
        return _encode_k_min(qt, name).reshape(rows, -1)
    q = qt.codes.numpy().reshape(-1, BLOCK)
    d = qt.scales.numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)
    parts = [d]
    if qt.spec.grid == "min":
        parts.append(qt.zeros.numpy().astype(np.float16).reshape(-1, 1).view(np.uint8))
    if qt.spec.bits == 8:
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:  # low nibbles: weight j in byte j's low half, weight j + 16 in its high half
        if qt.spec.bits == 5:  # the fifth bits, weight j at bit j of a little-endian uint32
            parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
        parts.append((q[:, :16] & 15) | ((q[:, 16:] & 15) << 4))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def _encode_k(qt: QuantizedTensor, name: str) -> np.ndarray:
    """Q3_K / Q6_K super-blocks (the layouts of ggml-quants.c, as the gguf package's reference reads them)."""
    q = qt.codes.numpy().reshape(-1, SUPER)
    n = len(q)
    sc = qt.scales.numpy().reshape(n, 16)  # codes c: the scale is d · (c − 2^(scale_bits − 1))
    d = qt.steps.numpy().astype(np.float16).reshape(n, 1).view(np.uint8)
    shifts = np.arange(8, dtype=np.uint8)
    if name == "Q3_K":
        # weight j·32 + l: bit j of hmask[l] holds its third bit; weight h·128 + j·32 + l: bits 2j of qs[h·32 + l]
        hmask = (((q.reshape(n, 8, 32) >> 2) & 1) << shifts[:, None]).sum(1, dtype=np.uint8)
        low = (q & 3).reshape(n, 2, 4, 32) << (2 * shifts[:4])[:, None]
        qs = low.sum(2, dtype=np.uint8).reshape(n, 64)
        # 16 six-bit codes: low nibbles of codes s and s + 8 in byte s; high pairs of code k·4 + b at bits 2k of 8 + b
        high = ((sc.reshape(n, 4, 4) >> 4) & 3) << (2 * shifts[:4])[:, None]
        scales = np.concatenate([(sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4), high.sum(1, dtype=np.uint8)], axis=1)
        return np.concatenate([hmask, qs, scales, d], axis=1)
    # Q6_K: weight h·128 + k·64 + l: nibble k of ql[h·64 + l]; its top two bits at bits 2j of qh[h·32 + l] for
    # weight h·128 + j·32 + l; scales as int8
    nib = (q & 15).reshape(n, 2, 2, 64)
    ql = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(n, 128)
    qh = (((q >> 4) & 3).reshape(n, 2, 4, 32) << (2 * shifts[:4])[:, None]).sum(2, dtype=np.uint8).reshape(n, 64)
    signed = (sc.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, signed, d], axis=1)


def _encode_k_min(qt: QuantizedTensor, name: str) -> np.ndarray:
    """Q2_K / Q4_K / Q5_K super-blocks: fp16 d and dmin (the steps of the scale and minimum codes), the codes of each
    group's scale and minimum, then the weights' codes (block_q2_K, block_q4_K, block_q5_K of ggml-common.h)."""
    q = qt.codes.numpy().reshape(-1, SUPER)
    n = len(q)
    sc, mn = qt.scales.numpy().reshape(n, -1), qt.zeros.numpy().reshape(n, -1)  # unsigned codes, m = −dmin · mn
    steps = qt.steps.numpy().astype(np.float16).reshape(n, 2)
    d, dmin = steps[:, :1].copy().view(np.uint8), steps[:, 1:].copy().view(np.uint8)
    if name == "Q2_K":  # scale code in a byte's low nibble, minimum code in its high one; weight c·128 + j·32 + l
        # at bits 2j of qs[c·32 + l]; d and dmin last
        qs = (q.reshape(n, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(2, dtype=np.uint8)
        return np.concatenate([(sc & 15) | (mn << 4), qs.reshape(n, 64), d, dmin], axis=1)
    # eight 6-bit scale and minimum codes in 12 bytes: codes 0-3 in the low six bits of bytes 0-3 (scales) and 4-7
    # (minima); codes 4-7 with their low nibbles in bytes 8-11 (scale low, minimum high) and top two bits in the
    # top two bits of bytes 0-3 and 4-7
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1).astype(np.uint8)
    # the low nibbles: each 64 weights as 32 bytes, weight l in byte l's low half, weight 32 + l in its high half
    chunks = q.reshape(n, 4, 2, 32)
    ql = ((chunks[:, :, 0] & 15) | ((chunks[:, :, 1] & 15) << 4)).reshape(n, 128)
    if name == "Q4_K":
        return np.concatenate([d, dmin, scales, ql], axis=1)
    # Q5_K: the fifth bits, weight j·32 + l at bit j of qh[l]
    qh = (((q.reshape(n, 8, 32) >> 4) & 1) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
    return np.concatenate([d, dmin, scales, qh, ql], axis=1)


def _encode_iq4_xs(qt: QuantizedTensor) -> np.ndarray:
    """IQ4_XS super-blocks (block_iq4_xs of ggml-common.h): d, then the eight 6-bit scale codes of its blocks of 32
    (high pairs: bits 2b of a uint16; low nibbles: block b in byte b/2, odd blocks in the high half), then the
    codes, each block's 32 as 16 bytes (weight j in byte j's low half, weight j + 16 in its high half)."""
    q = qt.codes.numpy().reshape(-1, SUPER)
    n = len(q)
    sc = qt.scales.numpy().reshape(n, 8).astype(np.uint16)  # codes c: the scale is d · (c − 32)
    d = qt.steps.numpy().astype(np.float16).reshape(n, 1).view(np.uint8)
    high = (((sc >> 4) & 3) << (2 * np.arange(8, dtype=np.uint16))).sum(1, dtype=np.uint16)
    low = (sc[:, 0::2] & 15) | ((sc[:, 1::2] & 15) << 4)
    blocks = q.reshape(n, 8, 32)
    qs = (blocks[:, :, :16] | (blocks[:, :, 16:] << 4)).reshape(n, 128)
    return np.concatenate([d, high.reshape(n, 1).view(np.uint8), low.astype(np.uint8), qs], axis=1)


def _encode_iq_lattice(qt: QuantizedTensor, name: str) -> np.ndarray:
    """IQ2_S / IQ3_S super-blocks (block_iq2_s, block_iq3_s of ggml-common.h): d, then the low bytes of the point
    indices, and the signs and the indices' high bits (IQ2_S: signs first; IQ3_S: high bits first), then the
    4-bit scale codes, two a byte (low nibble first). LatticeLinear's rows hold the same bytes in the same order
    within each super-block; its step is d for IQ3_S (s = d · (2c + 1)) and d / 8 for IQ2_S (s = d · (c + ½) / 4)."""
    from ..runtime.lattice import LatticeLinear

    layer = LatticeLinear.from_quantized(qt)
    rows, cols = qt.codes.shape
    n = rows * cols // SUPER

    def per_block(t: torch.Tensor) -> np.ndarray:
        return t.numpy().reshape(n, -1)

    d = (qt.steps.float() * (8 if name == "IQ2_S" else 1)).numpy().astype(np.float16).reshape(n, 1).view(np.uint8)
    sc = qt.scales.numpy().reshape(n, -1)
    scales = (sc[:, 0::2] | (sc[:, 1::2] << 4)).astype(np.uint8)
    qs, qh, signs = per_block(layer.qweight), per_block(layer.qh), per_block(layer.signs)
    middle = [signs, qh] if name == "IQ2_S" else [qh, signs]
    return np.concatenate([d, qs, *middle, scales], axis=1)


def export_gguf(model: torch.nn.Module, source: Path, out: Path, folder: Path | None = None) -> dict[str, int]:
    """Write `model` (a loaded mixq folder) as a GGUF at `out` (atomically). Built on `source`'s metadata where the
    model came from a GGUF; otherwise the metadata is written from the model's config and the tokenizer from
    `folder` (the saved mixq folder). Returns the count of tensors of each ggml type."""
    import gguf

    from ..models import adapter_for
    from ..models.gguf_meta import rope_tensors

    adapter = adapter_for(model)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give the path of the .gguf file to write")
    arch = adapter.gguf_arch
    names = adapter.gguf_names(model)
    ours = _tensors_by_gguf_name(model, names)
    if source.suffix == ".gguf" or folder is None:
        reader = _read_source(source)
        if _field(reader, "general.architecture") != arch:
            raise ExportError(f"{source} is a {_field(reader, 'general.architecture')!r} GGUF, but the saved model's "
                              f"family is written as {arch!r}: export from a model quantized from its own family's "
                              "GGUF")
        wanted = {t.name: int(t.shape[-1]) for t in reader.tensors}  # name → rows (ggml: fastest dimension first)
        # biases that bias compensation added are in no source; llama.cpp reads them where present
        wanted |= {n: len(p) for n, (_, p) in ours.items() if n.startswith("blk.") and n.endswith(".bias")
                   and n not in wanted}
        if "output.weight" in ours and "output.weight" not in wanted:  # a head untied from a tied source (rotate)
            wanted["output.weight"] = 0
        extra = {}

        def metadata(w):
            _copy_fields(reader, w)
    else:  # a model from a Hugging Face folder: every tensor it has, its head once where tied to the table
        _check_unnamed(model, names)
        wanted = {n: _rows(obj) for n, (_, obj) in ours.items()
                  if not (n == "output.weight" and adapter.tied(model))}
        try:
            extra = rope_tensors(adapter, model.config)
        except ValueError as e:
            raise ExportError(str(e)) from e

        def metadata(w):
            _fresh_fields(w, adapter, model, folder)
        source = folder
    tensors = [(name, data, getattr(gguf.GGMLQuantizationType, "F32")) for name, data in extra.items()]
    counts: dict[str, int] = {"F32": len(extra)} if extra else {}
    for name, rows in wanted.items():
        if name not in ours:
            raise ExportError(f"{source} holds tensor {name}, which the saved model has no counterpart for")
        hf, obj = ours.pop(name)
        kind, data = _tensor_data(adapter, model, name, hf, obj, rows)
        counts[kind] = counts.get(kind, 0) + 1
        tensors.append((name, np.ascontiguousarray(data), getattr(gguf.GGMLQuantizationType, kind)))
    left = [hf for hf, obj in ours.values() if isinstance(obj, QuantLinear)]
    if left:
        raise ExportError(f"the saved model's {left[0]} has no tensor in {source}")
    _write(arch, metadata, tensors, out)
    return counts


def _rows(obj) -> int:
    return obj.out_features if isinstance(obj, QuantLinear) else len(obj)


def _tensor_data(adapter, model, name: str, hf: str, obj, rows: int) -> tuple[str, np.ndarray]:
    """(ggml type, data) of one tensor: a quantized layer's ggml blocks, a float one in F16 (a vector in F32),
    rows in GGUF's order, norms in its convention."""
    perm = adapter.gguf_rows(model, hf, rows)
    if isinstance(obj, QuantLinear):
        qt = obj.quantized()
        kind = ggml_type(qt.spec)
        if kind is None:
            raise ExportError(f"{hf} is {qt.spec.name}, which no ggml type stores; quantize with "
                              "--compatible gguf to allocate among ggml types only")
        if perm is not None:
            qt = QuantizedTensor(qt.codes[perm], qt.scales[perm], qt.zeros[perm], qt.spec,
                                 None if qt.steps is None else qt.steps[perm])
        return kind, encode_blocks(qt)
    data = obj.detach().float().numpy()
    data = data[perm] if perm is not None else data
    if name.endswith("norm.weight"):  # Gemma's files store a norm's scale as 1 + γ
        data = data + adapter.gguf_norm_offset
    return ("F32", data.astype(np.float32)) if data.ndim == 1 else ("F16", data.astype(np.float16))


def _check_unnamed(model: torch.nn.Module, names) -> None:
    """Refuse a model with a parameter gguf-py's tables give no name (it would be lost)."""
    for hf, _ in model.named_parameters():
        if names.get_name(hf, try_suffixes=(".weight", ".bias")) is None:
            raise ExportError(f"the saved model's {hf} has no GGUF tensor name for its architecture")


def _tensors_by_gguf_name(model: torch.nn.Module, names) -> dict[str, tuple[str, object]]:
    """GGUF tensor name → (HF name, QuantLinear or float parameter) of the saved model. A head tied to its
    embedding table is the table's tensor (GGUF stores it once)."""
    from ..runtime.qlinear import QuantLinear

    out, seen = {}, set()
    for hf, m in model.named_modules():
        if isinstance(m, QuantLinear) and id(m.qweight) not in seen:
            seen.add(id(m.qweight))
            out[f"{names.get_name(hf)}.weight"] = (hf, m)
    for hf, p in model.named_parameters():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out.setdefault(name, (hf, p))
    return out


def _read_source(source: Path):
    from gguf import GGUFReader

    if not source.exists():
        raise ExportError(f"the model's source GGUF {source} is gone (moved or deleted?); GGUF export copies its "
                          "tokenizer and metadata")
    if not source.is_file() or source.suffix != ".gguf":
        raise ExportError(f"GGUF export builds on the model's source GGUF (its tokenizer and metadata); the source "
                          f"{source} is not a .gguf file: convert the model with llama.cpp's convert_hf_to_gguf.py "
                          "and quantize that file")
    try:
        return GGUFReader(source)
    except Exception as e:
        raise ExportError(f"{source} is a corrupt GGUF file: {str(e).splitlines()[0][:200]}") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ExportError(f"the source GGUF has no {key}")
        return default
    return f.contents()


def _copy_fields(reader, w) -> None:
    """The source GGUF's metadata (its architecture's hyper-parameters, its tokenizer), but for what mixq
    changes."""
    import gguf

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def _fresh_fields(w, adapter, model, folder: Path) -> None:
    """The metadata of a model from a Hugging Face folder: hyper-parameters from its config, the tokenizer from
    the saved folder (models.gguf_meta)."""
    from ..models.gguf_meta import GGUFMetaError, write_hparams, write_vocab

    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(str(getattr(model.config, "_name_or_path", "") or folder)).name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(w, adapter, model.config)
    try:
        write_vocab(w, folder, model.get_submodule(adapter.embed).num_embeddings)
    except GGUFMetaError as e:
        raise ExportError(str(e)) from e


def _write(arch: str, metadata, tensors, out: Path) -> None:
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        metadata(w)
        w.add_string("general.quantized_by", "mixq")
        for name, data, dtype in tensors:
            w.add_tensor(name, data, raw_dtype=dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@register
class GGUF(Exporter):
    name = "gguf"
    summary = ("llama.cpp: a .gguf file of ggml block types, with the source GGUF's tokenizer and metadata or, from a "
               "Hugging Face folder, the config's and tokenizer.json's")

    def specs(self) -> list[QuantSpec]:
        return gguf_specs()

    def table_specs(self) -> list[QuantSpec]:
        """llama.cpp quantizes its tables too (a tied output table: Q6_K, or Q8_0 where rows are no multiple of 256)."""
        return [s for s in gguf_specs() if s.bits >= 4]

    def check_model(self, model, source=None) -> None:
        from ..models import adapter_for

        from ..models.gguf_meta import GGUFMetaError, check_tokenizer, rope_tensors

        adapter = adapter_for(model)
        if adapter.gguf_arch is None:
            raise ExportError(f"mixq has no GGUF export for {adapter.family}")
        check_rows(model)
        if source is not None and Path(source).is_dir():  # from a Hugging Face folder: its rotary scaling and
            try:                                               # tokenizer must have GGUF forms
                rope_tensors(adapter, model.config)
                check_tokenizer(Path(source))
            except GGUFMetaError as e:
                raise ExportError(str(e)) from e

    def write(self, folder: Path, out: Path) -> dict[str, int]:
        import json

        from ..io import MARKER, load

        source = Path(json.loads((folder / MARKER).read_text())["source"])
        if source.suffix == ".gguf":
            return export_gguf(load(folder), source, out)
        return export_gguf(load(folder), source, out, folder)
