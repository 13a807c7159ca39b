"""Embedding fidelity of a sentence encoder: how far quantization moves its sentence embeddings, on held-out
sentences (data.evaluation_sentences).

    cosine    the mean cosine between the float and the quantized embedding of each sentence
    spearman  Spearman's rank correlation between the cosine similarities of EVAL_PAIRS random sentence pairs under
              the float model and under the quantized one: whether search and clustering rank as before

`encode` computes what `SentenceTransformer.encode` does for a folder with Transformer, Pooling (and Normalize)
modules: batches of tokenized sentences (truncated to the pooling's max_length), token states pooled over the
attention mask, L2-normalised where the folder says so."""
from __future__ import annotations

import torch
from scipy.stats import spearmanr

from ..models.tasks import Pooling

BATCH = 32


def encode(model, tokenizer, sentences: list[str], batch_size: int = BATCH, progress=None) -> torch.Tensor:
    """Sentence embeddings (n × width, float32) of a loaded encoder, by its config's `sentence_pooling`."""
    pooling = Pooling.of(model.config)
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                              max_length=pooling.max_length, return_tensors="pt")
            h = model(**batch).last_hidden_state.float()
            out.append(pooling.pool(h, batch["attention_mask"]))
            if progress:
                progress(len(batch["input_ids"]))
    return torch.cat(out)


def pairs(n: int, count: int, seed: int = 0) -> torch.Tensor:
    """count × 2 distinct random index pairs of n sentences (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, n, (count,), generator=gen)
    b = (a + torch.randint(1, n, (count,), generator=gen)) % n
    return torch.stack([a, b], 1)


def fidelity(reference: torch.Tensor, embeddings: torch.Tensor, pair_count: int) -> dict:
    """{"cosine", "spearman"} of `embeddings` against the float `reference` (module docstring)."""
    cos = torch.nn.functional.cosine_similarity
    p = pairs(len(reference), pair_count)
    ref = cos(reference[p[:, 0]], reference[p[:, 1]], dim=-1)
    got = cos(embeddings[p[:, 0]], embeddings[p[:, 1]], dim=-1)
    return {"cosine": float(cos(reference, embeddings, dim=-1).mean()),
            "spearman": float(spearmanr(ref.cpu().numpy(), got.cpu().numpy()).statistic)}
