"""Tokens per second of a causal LM on this machine: one forward over a prompt (prefill), then greedy decoding one
token at a time from the KV cache; and the bytes the model keeps in memory."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Speed:
    prompt_tps: float  # prompt tokens per second (one forward over the whole prompt)
    decode_tps: float  # new tokens per second (batch 1, KV cache)
    resident_mb: float  # parameters, buffers and decoded kernel tables held by the model


def resident_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for m in model.modules():  # QuantLinear's decoded (a, c), once it has run (a layout's own: one tensor)
        ac = getattr(m, "_ac", None)
        for t in (ac,) if isinstance(ac, torch.Tensor) else ac or ():
            tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())


def speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Speed:
    """`prompt`: 1 × n token ids. A short warm-up first (kernel builds, decoded tables, allocator)."""
    # newer transformers name the KV cache `cache` (past_key_values is deprecated, to go in 5.40): either works
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():  # the prompt's logits only at its last token, as generate() asks for them
        warm = model(prompt[:, :8], use_cache=True, logits_to_keep=1)
        model(prompt[:, 8:9], **{name: getattr(warm, name)}, use_cache=True)
        t = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, **{name: past}, use_cache=True)
            past, token = getattr(out, name), out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t
    return Speed(prompt.shape[1] / prefill, new_tokens / decode, resident_bytes(model) / 1e6)


def bench(folder, prompt_tokens: int = 512, new_tokens: int = 128) -> tuple[dict[str, Speed], float]:
    """({"float": its float source's speed, "mixq": the packed model's}, the packed model's bpw) of a saved mixq
    folder, on the first `prompt_tokens` of the evaluation split, in this process."""
    import json
    from pathlib import Path

    from .. import data
    from ..io import MARKER, SavedModelError, open_model
    from ..models import adapter_for, load_model

    if not (Path(folder) / MARKER).exists():
        raise SavedModelError(f"{folder} is not a mixq model folder (no {MARKER})")
    packed, tok, bpw = open_model(str(folder))
    if adapter_for(packed).task != "causal":
        raise ValueError(f"{folder} is a sentence encoder: mixq bench times decoding, which it does not do")
    float_model, _, _ = load_model(json.loads((Path(folder) / MARKER).read_text())["source"])
    ids = data.evaluation_windows(tok, count=1)[:, :prompt_tokens]
    if ids.shape[1] < prompt_tokens:
        raise data.DataError(f"the evaluation text has only {ids.shape[1]} tokens for a {prompt_tokens}-token prompt")
    return {"float": speed(float_model, ids, new_tokens), "mixq": speed(packed, ids, new_tokens)}, bpw
