"""What a model is for decides how mixq loads, calibrates, judges and evaluates it: a `Task`, named by the
adapter (`Adapter.task`).

    causal      a decoder: next-token loss, logits, perplexity (the protocol's 512-token windows)
    embedding   a sentence encoder (BERT): no next-token loss, so a layer is judged by how far it moves the pooled
                sentence embedding. The Fisher role: the Gauss-Newton curvature of L = 1 − cos(e, e_float) at the
                float point, (I − ê êᵀ)/‖e‖², sampled by backward passes of e · v with v drawn from it (PROBES per
                window; E[g gᵀ] = Jᵀ (I − ê êᵀ) J / ‖e‖², g = Jᵀ v). The measured role (kl): the mean of 1 − cos
                between the float and the quantized embeddings of the probe windows. Calibration: windows of
                packed pydoc sentences (data.sentence_windows); evaluation: embedding fidelity (eval.fidelity).

The pooling (mean, CLS or max over tokens, then an optional L2 normalisation) is the sentence-transformers folder's
(1_Pooling/config.json, modules.json), kept in the model config as `sentence_pooling` so that a saved folder
carries it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import Registry

TASKS = Registry("task")
PROBES = 4  # embedding task: curvature probes per calibration window
FISHER_WINDOWS = 8  # a decoder's calibration windows that get a backward pass (capture: OUTPUT_FISHER, …)


class Task:
    name: ClassVar[str] = ""
    auto_class: ClassVar[str] = ""  # the transformers Auto class that builds the model
    fisher_windows: ClassVar[int | None] = None  # calibration windows with backward passes (None: all)
    probe_windows: ClassVar[int | None] = None  # calibration windows a measured estimator runs (None: its own)
    estimator: ClassVar[str | None] = None  # the damage estimator when the run names none (None: mixq's default)

    @property
    def model_class(self):
        """The transformers Auto class (`auto_class`) that builds and loads the model."""
        import transformers

        return getattr(transformers, self.auto_class)

    def loss(self, model, embeds: torch.Tensor, window: torch.Tensor, index: int) -> list[torch.Tensor]:
        """The losses whose gradients the Fisher-type statistics average, one backward pass each, for one window
        (`embeds`: its input embeddings, which need grad)."""
        raise NotImplementedError

    def output(self, adapter, model, h: torch.Tensor) -> torch.Tensor:
        """The model's output from the last block's hidden states h (windows × length × width)."""
        raise NotImplementedError

    def whole(self, model, ids: torch.Tensor) -> torch.Tensor:
        """The model's output on `ids`, run whole."""
        raise NotImplementedError

    def reference(self, out: torch.Tensor) -> torch.Tensor:
        """What divergence compares against, computed once from the float output."""
        return out

    def divergence(self, ref: torch.Tensor, out: torch.Tensor) -> float:
        raise NotImplementedError

    def check(self, config) -> None:
        """Refuse, in one line, run settings this kind of model cannot take (a QuantizeConfig)."""

    def calibration(self, model, tokenizer, path: str | None, count: int) -> torch.Tensor:
        """The calibration windows (windows × length ids) of a text file (None: pydoc's calibration split)."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, count: int, step, before=None) -> dict:
        """The run's evaluation on the held-out split (`count`: windows or sentences), as mixq.json's "eval":
        called on the float model (`before` None), then on the quantized one with what the first call gave."""
        raise NotImplementedError


def register(cls: type[Task]) -> type[Task]:
    TASKS.register(cls.name)(cls())
    return cls


@register
class CausalLM(Task):
    name = "causal"
    auto_class = "AutoModelForCausalLM"
    fisher_windows = FISHER_WINDOWS

    def loss(self, model, embeds, window, index):
        """The next-token NLL summed over the window."""
        logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
        return [F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1),
                                reduction="sum")]

    def output(self, adapter, model, h):
        return adapter.logits(model, h)

    def whole(self, model, ids):
        return model(ids, use_cache=False).logits

    def reference(self, out):
        """log p and p, once (Σ p·(log p − log q) keeps small KLs exact)."""
        logp = F.log_softmax(out.float(), -1)
        return logp, logp.exp()

    def divergence(self, ref, out):
        """KL(p_float ‖ p) per token, in nats."""
        logp, p = ref
        return float((p * (logp - F.log_softmax(out.float(), -1))).sum(-1).mean())

    def calibration(self, model, tokenizer, path, count):
        from .. import data

        return data.calibration_windows(tokenizer, path, count)

    def evaluate(self, model, tokenizer, count, step, before=None):
        """Perplexity over the protocol's first `count` evaluation windows."""
        from .. import data
        from ..eval import progress_counter
        from ..eval.perplexity import perplexity

        windows = data.evaluation_windows(tokenizer, count=count)
        ppl = perplexity(model, windows, progress_counter(step, "ppl after" if before else "ppl before", len(windows)))
        if before is None:
            return {"ppl_before": ppl, "windows": len(windows), "text": "pydoc evaluation split"}
        return {**before, "ppl_after": ppl}


@dataclass(frozen=True)
class Pooling:
    """How token states become a sentence embedding (sentence-transformers' Pooling and Normalize modules)."""

    mode: str = "mean"  # mean | cls | max
    normalize: bool = False
    max_length: int | None = None  # tokens read per sentence (sentence_bert_config.json's max_seq_length)

    @classmethod
    def of_folder(cls, folder: Path) -> "Pooling":
        """A sentence-transformers folder's pooling; mean pooling, unnormalised, where it says none."""
        folder = Path(folder)
        modules = _json(folder / "modules.json") or []
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        pool_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
        pool = _json(folder / pool_dir / "config.json") or {}
        mode = next((m for m in ("cls", "max", "mean") if pool.get(f"pooling_mode_{m}_token") or
                     pool.get(f"pooling_mode_{m}_tokens")), "mean")
        length = (_json(folder / "sentence_bert_config.json") or {}).get("max_seq_length")
        return cls(mode, normalize, length)

    @classmethod
    def of(cls, config) -> "Pooling":
        return cls(**(getattr(config, "sentence_pooling", None) or {}))

    def to_dict(self) -> dict:
        return asdict(self)

    def pool(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings (n × width) of token states h (n × length × width), padding masked out."""
        m = torch.ones(h.shape[:2], dtype=h.dtype) if mask is None else mask.to(h.dtype)
        if self.mode == "cls":
            e = h[:, 0]
        elif self.mode == "max":
            e = h.masked_fill(m[..., None] == 0, float("-inf")).max(1).values
        else:
            e = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(e, p=2, dim=1) if self.normalize else e


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@register
class SentenceEmbedding(Task):
    name = "embedding"
    auto_class = "AutoModel"
    probe_windows = 128
    estimator = "kl"  # the measured 1 − cos (benchmarks/results/encoders.md: it ranks damage, the Fisher does not)

    def loss(self, model, embeds, window, index):
        """PROBES losses e · v, v ~ N(0, (I − ê êᵀ)/‖e‖²) drawn with a seed of the window's index (module
        docstring); e the pooled embedding before any normalisation (which the curvature already discounts)."""
        h = model(inputs_embeds=embeds).last_hidden_state
        e = replace(Pooling.of(model.config), normalize=False).pool(h)
        gen = torch.Generator().manual_seed(index)
        unit = F.normalize(e.detach().float(), dim=-1)
        norm = e.detach().float().norm(dim=-1, keepdim=True)
        out = []
        for _ in range(PROBES):
            z = torch.randn(e.shape, generator=gen)
            out.append((e.float() * (z - (z * unit).sum(-1, keepdim=True) * unit) / norm).sum())
        return out

    def output(self, adapter, model, h):
        return Pooling.of(model.config).pool(h)

    def whole(self, model, ids):
        return Pooling.of(model.config).pool(model(ids).last_hidden_state)

    def divergence(self, ref, out):
        """Mean of 1 − cos(float embedding, embedding) over the windows."""
        return float((1 - F.cosine_similarity(ref.float(), out.float(), dim=-1)).mean())

    def check(self, config):
        if config.calibration.generated:
            raise ValueError("an encoder does not generate text: calibrate it on text (drop --calib-generated)")
        if config.budget is not None and config.budget.latency:
            raise ValueError("a latency budget times decoding, which an encoder does not do: give --bits or --size")

    def calibration(self, model, tokenizer, path, count):
        from .. import data

        length = min(data.SENTENCE_WINDOW, Pooling.of(model.config).max_length or data.SENTENCE_WINDOW,
                     model.config.max_position_embeddings)
        return data.sentence_windows(tokenizer, path, count * data.WINDOW // length, length)

    def evaluate(self, model, tokenizer, count, step, before=None):
        """Embedding fidelity (eval.fidelity) on the first EVAL_SENTENCES held-out pydoc sentences, EVAL_PAIRS
        pairs of them (`count` is a decoder's window count: any count above zero evaluates)."""
        from .. import data
        from ..eval import progress_counter
        from ..eval.fidelity import encode, fidelity

        sentences = data.evaluation_sentences()
        label = "embed after" if before else "embed before"
        emb = encode(model, tokenizer, sentences, progress=progress_counter(step, label, len(sentences)))
        if before is None:
            return {"reference": emb}
        return {**fidelity(before["reference"], emb, data.EVAL_PAIRS), "sentences": len(sentences),
                "pairs": data.EVAL_PAIRS, "text": "pydoc evaluation sentences"}
