"""Token streams for calibration and evaluation.

The protocol (every perplexity mixq reports uses it): the texts of `pydoc_data.topics` joined with blank lines and
tokenized whole; the first 60 % of tokens calibrate, the last 40 % evaluate; perplexity over the first 64
non-overlapping 512-token windows of the evaluation split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

CALIB_FRACTION = 0.6
WINDOW = 512
EVAL_WINDOWS = 64
CALIB_WINDOWS = 32  # default calibration: 32 × 512 tokens spread evenly over the calibration split


class DataError(ValueError):
    pass


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text's ids, tokenized whole (longer than the model's context: no warning, it is cut into windows)."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise DataError(f"{path} is empty: give a file with some text to calibrate or evaluate on")
    return text


def split(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(ids) * CALIB_FRACTION)
    return ids[:cut], ids[cut:]


def windows(ids: torch.Tensor, length: int = WINDOW, count: int | None = None, spread: bool = False) -> torch.Tensor:
    """count × length non-overlapping windows: the first ones, or (spread) evenly spaced over the stream."""
    available = len(ids) // length
    if available == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    count = available if count is None else min(count, available)
    starts = torch.linspace(0, available - 1, count).round().long() if spread else torch.arange(count)
    return torch.stack([ids[s * length:(s + 1) * length] for s in starts.tolist()])


def calibration_windows(tokenizer, path: str | None = None, count: int = CALIB_WINDOWS) -> torch.Tensor:
    """Default: the pydoc calibration split. A given file is used whole (short files give short windows)."""
    if path is None:
        return windows(split(tokenize(tokenizer, pydoc_text()))[0], count=count, spread=True)
    ids = tokenize(tokenizer, read_text(path))
    length = min(WINDOW, len(ids))
    if length < 16:
        raise DataError(f"{path} has only {len(ids)} tokens; calibration needs at least 16")
    return windows(ids, length, count, spread=True)


def generated_windows(model, start_id: int, count: int, length: int = WINDOW, seed: int = 0,
                      step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """count × length tokens the model samples itself from `start_id` (temperature 1, no truncation): data-free
    calibration text (LLM-QAT, arXiv 2305.17888) covering what the model knows rather than one text's topic.
    Each window packs two samples of half its length (half the decoding steps at twice the batch). Deterministic
    for a seed; the global random state is left as it was. `step(done, total)` reports the decoding steps."""
    from transformers.generation.streamers import BaseStreamer

    half = (length + 1) // 2

    class Counter(BaseStreamer):
        done = -1  # the first put() is the prompt

        def put(self, value):
            self.done += 1
            if step and self.done:
                step(self.done, half - 1)

        def end(self):
            pass

    prompt = torch.full((2 * count, 1), start_id, dtype=torch.long)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=half - 1, min_new_tokens=half - 1, pad_token_id=start_id,
                             streamer=Counter())
    return ids.reshape(count, 2 * half)[:, :length]


def start_token(tokenizer, model) -> int:
    """The token generated_windows starts each sample from: the tokenizer's BOS, else its EOS, else the config's."""
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, model.config.bos_token_id)
                  if t is not None), None)
    if start is None:
        raise DataError("generated calibration needs a start token: the tokenizer has no BOS or EOS token")
    return start


def mixed(text: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Text and generated windows interleaved evenly, so that every prefix (the Fisher's first windows) has both."""
    order = torch.cat([torch.linspace(0, 1, len(text) + 2)[1:-1], torch.linspace(0, 1, len(generated) + 2)[1:-1]])
    return torch.cat([text, generated])[order.argsort(stable=True)]


def evaluation_windows(tokenizer, path: str | None = None, count: int = EVAL_WINDOWS) -> torch.Tensor:
    """Default: the pydoc evaluation split by the protocol; a given file is evaluated whole, from its start."""
    ids = split(tokenize(tokenizer, pydoc_text()))[1] if path is None else tokenize(tokenizer, read_text(path))
    return windows(ids, min(WINDOW, len(ids)), count)


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """1 × n ids of `prompt`, wrapped in the tokenizer's chat template with `chat` (instruct models)."""
    if not chat:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    elif not getattr(tokenizer, "chat_template", None):
        raise DataError("this tokenizer has no chat template; drop --chat")
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    if ids.numel() == 0:
        raise DataError(f"the prompt {prompt[:40]!r} gives no tokens with this model's tokenizer")
    return ids


# --- sentences (encoders) ------------------------------------------------------------------------------------------
# The encoder protocol: pydoc's texts split into sentences; the first 60 % calibrate (packed into windows that open
# with the tokenizer's start token and close with its end token), the last 40 % evaluate, the first EVAL_SENTENCES
# of them, and EVAL_PAIRS random pairs of those for the similarity ranking.
EVAL_SENTENCES = 1000
EVAL_PAIRS = 1000
SENTENCE_WINDOW = 32


def sentences(text: str) -> list[str]:
    """The sentences of `text`: split after . ! ? and at blank lines, whitespace folded, kept between 3 and 80
    words, each once, in order."""
    import re

    out, seen = [], set()
    for part in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
        s = " ".join(part.split())
        if 3 <= len(s.split()) <= 80 and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def sentence_split(path: str | None = None) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences: pydoc's by the protocol, or a file's (split the same way)."""
    found = sentences(pydoc_text() if path is None else read_text(path))
    if len(found) < 10:
        raise DataError(f"{path or 'the text'} has {len(found)} sentences; calibration needs at least 10")
    cut = int(len(found) * CALIB_FRACTION)
    return found[:cut], found[cut:]


def sentence_windows(tokenizer, path: str | None = None, count: int = CALIB_WINDOWS,
                     length: int = SENTENCE_WINDOW) -> torch.Tensor:
    """count × length windows of the calibration sentences, packed one after another, each window wrapped in the
    tokenizer's special tokens (an encoder reads [CLS] … [SEP]), spread evenly over them. A given file calibrates
    whole."""
    calib, rest = sentence_split(path)
    ids = tokenize(tokenizer, " ".join(calib if path is None else calib + rest))
    first, last = _special(tokenizer, "cls", "bos"), _special(tokenizer, "sep", "eos")
    chunks = windows(ids, min(length - len(first) - len(last), len(ids)), count, spread=True)
    return torch.cat([torch.tensor(first).expand(len(chunks), -1).long(), chunks,
                      torch.tensor(last).expand(len(chunks), -1).long()], 1)


def _special(tokenizer, *kinds: str) -> list[int]:
    """The id of the first of the tokenizer's special tokens `kinds` it has ([] for none)."""
    for kind in kinds:
        token = getattr(tokenizer, f"{kind}_token_id", None)
        if token is not None:
            return [token]
    return []


def evaluation_sentences(path: str | None = None, count: int = EVAL_SENTENCES) -> list[str]:
    """The first `count` evaluation sentences (pydoc's last 40 %, or a file's whole)."""
    calib, rest = sentence_split(path)
    return (rest if path is None else calib + rest)[:count]
