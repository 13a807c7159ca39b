"""compressed-tensors export: a Hugging Face folder in the "pack-quantized" format that transformers (with the
compressed-tensors package) and vLLM load, one config group per format, each listing its layers by name.

mixq formats it stores exactly (`ct_args`): the "sym" grid with fp16 scales, w = (q − 2^(bits−1)) · s, any width
2–8, any group or whole rows ("channel"); compressed-tensors holds the codes as signed integers q − 2^(bits−1),
packed densely into int32 by its own `pack_to_int32`, and the (signed) scales as they are.
`mixq quantize --compatible compressed-tensors` allocates among such formats only. The "min" grids and
double-quantized scales of the default candidates have no compressed-tensors form; the asymmetric "int" grid has
one on paper (packed zero points), but compressed-tensors 0.20 with transformers 5.23 builds unpacked zero-point
buffers at load and then refuses the packed ones, so it is not offered.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from ..formats import QuantSpec
from . import Exporter, ExportError, register

CT_GROUPS = (32, 64, 192)  # --compatible compressed-tensors: these groups (whole rows where none divides)


def ct_args(spec: QuantSpec):
    """compressed-tensors' QuantizationArgs for `spec`, or None where it has no exact form."""
    from compressed_tensors.quantization import QuantizationArgs

    if spec.double or spec.high or spec.grid != "sym":
        return None
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=True,
                            strategy="group" if spec.group_size else "channel", group_size=spec.group_size or None)


def ct_specs(bits=(2, 3, 4, 5, 6, 8)) -> list[QuantSpec]:
    return [QuantSpec.of(b, g, "sym") for b in bits for g in CT_GROUPS]


def export_compressed(model: torch.nn.Module, tokenizer, out: Path) -> dict[str, int]:
    """Write `model` (a loaded mixq folder) as a compressed-tensors folder at `out` (atomically). Returns the
    count of layers of each format."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    from ..io import staged_folder
    from ..runtime.qlinear import QuantEmbedding, QuantLinear

    if out.exists():
        raise ExportError(f"{out} exists; choose another output folder or delete it")
    tensors, groups, seen = {}, {}, set()
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or id(m.qweight) in seen:
            continue
        seen.add(id(m.qweight))
        if isinstance(m, QuantEmbedding):
            raise ExportError(f"{name} is a quantized embedding table, which compressed-tensors does not store; "
                              "quantize with --compatible compressed-tensors (it keeps the tables float) or "
                              "--float-tables")
        args = ct_args(m.spec)
        if args is None:
            raise ExportError(f"{name} is {m.spec.name}, which compressed-tensors does not store exactly; quantize "
                              "with --compatible compressed-tensors")
        qt = m.quantized()
        half = 1 << (m.spec.bits - 1)
        tensors[f"{name}.weight_packed"] = pack_to_int32((qt.codes.int() - half).to(torch.int8), m.spec.bits)
        tensors[f"{name}.weight_scale"] = qt.scales.half().contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
        groups.setdefault(m.spec, (args, []))[1].append(name)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] + ".weight_packed" not in tensors or name.endswith(".bias"):
            tensors[name] = p.detach().half().contiguous()
    hf_config = model.config.to_dict()
    _zero_biases(model, hf_config, tensors)
    config = QuantizationConfig(
        config_groups={spec.name: QuantizationScheme(targets=names, weights=args)
                       for spec, (args, names) in groups.items()},
        format="pack-quantized", quantization_status="compressed")
    hf_config["quantization_config"] = config.model_dump(mode="json", exclude_none=True)
    hf_config["dtype"] = "float16"
    with staged_folder(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
        tokenizer.save_pretrained(tmp)
    return {spec.name: len(names) for spec, (_, names) in groups.items()}


def _zero_biases(model: torch.nn.Module, hf_config: dict, tensors: dict) -> None:
    """Bias compensation gives some layers a bias that a model built from the config lacks: switch on the config
    flag of their kind (the adapter's bias_flags) and store zeros for the layers the flag gives a bias that have
    none, so that transformers builds and fills every one. Biases the family has of its own (Qwen2's q/k/v, GPT-NeoX's
    everywhere) need nothing; one no flag declares is refused."""
    from ..models import adapter_for

    adapter = adapter_for(model)
    ours = {n for n in adapter.layer_names(model) if model.get_submodule(n).bias is not None}
    native = _biased(model, hf_config)
    flags = [flag for flag, kinds in adapter.biased_kinds().items()
             if flag in hf_config and any(adapter.in_block(n) in kinds for n in ours - native)]
    for flag in flags:
        hf_config[flag] = True
    declared = _biased(model, hf_config) if flags else native  # (a model built again only where a flag changed)
    missing = ours - declared
    if missing:
        raise ExportError(f"{sorted(missing)[0]} has a bias (bias compensation) that no field of its config "
                          f"({type(model.config).__name__}) can declare: quantize without a +bias chain")
    for n in declared - ours:
        tensors.setdefault(f"{n}.bias", torch.zeros(model.get_submodule(n).out_features, dtype=torch.float16))


def _biased(model: torch.nn.Module, hf_config: dict) -> set[str]:
    """The block linears that have a bias in a model built from `hf_config` (on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..models import adapter_for

    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "quantization_config"})
    adapter = adapter_for(model)
    with init_empty_weights():
        fresh = adapter.job.model_class.from_config(config)
    adapter.prepare(fresh)
    return {n for n in adapter.layer_names(fresh) if fresh.get_submodule(n).bias is not None}


@register
class CompressedTensors(Exporter):
    name = "compressed-tensors"
    summary = "transformers / vLLM: a Hugging Face folder in the pack-quantized format (needs compressed-tensors)"

    def specs(self) -> list[QuantSpec]:
        return ct_specs()

    def check_model(self, model, source=None) -> None:
        from ..models import adapter_for

        adapter = adapter_for(model)
        if adapter.transposed:  # transformers loads such a folder with float Conv1D layers: another model
            raise ExportError(f"{adapter.family}'s linears are Conv1D layers, which compressed-tensors does not "
                              "quantize: no compressed-tensors export")

    def write(self, folder: Path, out: Path) -> dict[str, int]:
        from transformers import AutoTokenizer

        from ..io import load

        if importlib.util.find_spec("compressed_tensors") is None:
            raise ExportError("the compressed-tensors export needs the compressed-tensors package: "
                              "pip install 'mixq[export]'")
        model = load(folder)
        self.check_model(model)
        return export_compressed(model, AutoTokenizer.from_pretrained(folder), out)
