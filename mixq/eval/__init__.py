"""Evaluation: perplexity (decoders), embedding fidelity (encoders), decode speed. `evaluate` is what `mixq eval`
prints."""
from __future__ import annotations


def _no_step(stage: str, done: int, total: int) -> None:
    pass


def evaluate(target: str, text: str | None = None, windows: int = 64, step=_no_step) -> dict:
    """A mixq folder, a .gguf file, a Hugging Face folder or 'smollm2' on the held-out split (or a text file):
    a decoder's perplexity over `windows` 512-token windows; an encoder's embedding fidelity against its float
    source (a float model's against itself), on the held-out sentences. With the stored bits per weight."""
    import json
    from pathlib import Path

    from .. import data
    from ..io import MARKER, folder_file_bits, open_model
    from ..models import adapter_for, load_model

    if text is not None:
        data.read_text(text)
    net, tok, bpw = open_model(target)
    whole = {"file_bits_per_param": round(b, 4)} if (b := folder_file_bits(target)) is not None else {}
    if adapter_for(net).task == "embedding":
        from .fidelity import encode, fidelity

        sentences = data.evaluation_sentences(text)
        marker = Path(target) / MARKER
        source = json.loads(marker.read_text())["source"] if marker.is_file() else None
        ref_model = load_model(source)[0] if source else net
        ref = encode(ref_model, tok, sentences, progress=progress_counter(step, "float", len(sentences)))
        got = ref if ref_model is net else encode(net, tok, sentences,
                                                  progress=progress_counter(step, "mixq", len(sentences)))
        return {**{k: round(v, 5) for k, v in fidelity(ref, got, data.EVAL_PAIRS).items()}, "bpw": round(bpw, 4),
                **whole, "sentences": len(sentences), "pairs": data.EVAL_PAIRS}
    from .perplexity import perplexity

    ids = data.evaluation_windows(tok, text, windows)
    ppl = perplexity(net, ids, progress_counter(step, "ppl", len(ids)))
    return {"ppl": round(ppl, 4), "bpw": round(bpw, 4), **whole, "windows": int(ids.shape[0])}


def progress_counter(step, stage: str, total: int):
    """progress(n) callbacks that add up to step(stage, done, total)."""
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        step(stage, done[0], total)
    return advance
