"""Sentence encoders (BERT) on a tiny random-weight config: the whole flow from a sentence-transformers folder,
embedding fidelity, the Fisher and the measured estimator on the embedding, the refusals that an encoder gets, and
`mixq.encode` against sentence-transformers."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import mixq
from mixq.cli import app
from mixq.config import Calibration, QuantizeConfig
from mixq.models import adapter_for, load_model
from mixq.models.tasks import Pooling
from mixq.plan import Budget
from mixq.testing import make_family_model, make_wordpiece_tokenizer, write_sentence_folder

runner = CliRunner()
SENTENCES = ["the model reads the block", "a group of bits for each weight", "the plan and the budget",
             "scale and zero of the code", "this layer is the first one", "the token after the last"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    write_sentence_folder(make_family_model("bert"), make_wordpiece_tokenizer(), path)
    return path


def _config(text_file, **kw):
    return QuantizeConfig(**{"budget": Budget(bits=4.5), "calibration": Calibration(str(text_file), 4),
                             "eval_windows": 0, **kw})


def test_a_sentence_folder_loads_with_its_pooling(bert_dir):
    model, tok, _ = load_model(str(bert_dir))
    assert type(model).__name__ == "BertModel" and adapter_for(model).task == "embedding"
    assert Pooling.of(model.config) == Pooling("mean", True, 128)
    e = mixq.encode(model, tok, SENTENCES)
    assert e.shape == (len(SENTENCES), 64)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(len(SENTENCES)))


@pytest.mark.parametrize("estimator", ["kl", "fisher"])
def test_the_whole_flow_of_an_encoder(bert_dir, text_file, tmp_path, estimator):
    """Profile (the measured cosine or the embedding Fisher), allocate, apply, save, load: the loaded encoder gives
    the packed one's embeddings exactly, and they moved."""
    float_model, tok, _ = load_model(str(bert_dir))
    result = mixq.quantize(str(bert_dir), None, _config(text_file, estimator=estimator), out=tmp_path / "q")
    assert result.profile.estimator == estimator
    assert all(d >= -1e-6 for lp in result.profile.layers for d in lp.damage)
    assert any(d > 0 for lp in result.profile.layers for d in lp.damage)
    loaded = mixq.load(tmp_path / "q")
    packed, got = mixq.encode(result.model, tok, SENTENCES), mixq.encode(loaded, tok, SENTENCES)
    assert torch.equal(got, packed)
    assert (got - mixq.encode(float_model, tok, SENTENCES)).abs().max() > 1e-4
    assert json.loads((tmp_path / "q" / "config.json").read_text())["sentence_pooling"]["mode"] == "mean"


def test_the_default_estimator_of_an_encoder_is_the_measured_cosine(bert_dir, text_file):
    result = mixq.quantize(str(bert_dir), None, _config(text_file))
    assert result.profile.estimator == "kl"


def test_quantize_evaluates_embedding_fidelity_and_eval_prints_it(bert_dir, text_file, tmp_path):
    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", bert_dir, "--bits", 4, "--out", tmp_path / "q",
                                               "--calib", text_file, "--calib-windows", 2, "--eval-windows", 1)])
    assert res.exit_code == 0, res.output
    assert "cosine" in res.output and "Spearman" in res.output and "bits/param" in res.output
    ev = json.loads((tmp_path / "q" / "mixq.json").read_text())["eval"]
    assert 0 < ev["cosine"] <= 1 and ev["pairs"] == 1000  # (pydoc's sentences: mostly [UNK] to the tiny vocabulary)
    res = runner.invoke(app, ["eval", str(tmp_path / "q"), "--text", str(text_file)])
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.9 < line["cosine"] <= 1 and 3 < line["bpw"] <= 4 and line["sentences"] > 10
    res = runner.invoke(app, ["eval", str(bert_dir), "--text", str(text_file)])
    assert json.loads(res.stdout.strip().splitlines()[-1])["cosine"] == pytest.approx(1.0)
    res = runner.invoke(app, ["generate", str(tmp_path / "q"), "--prompt", "the model"])
    assert res.exit_code == 2 and "a sentence encoder does not generate" in " ".join(res.output.split())
    res = runner.invoke(app, ["bench", str(tmp_path / "q")])
    assert res.exit_code == 2 and "mixq bench times decoding" in " ".join(res.output.split())
    res = runner.invoke(app, ["report", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kw, phrase", [
    ({"transforms": ("rotate",)}, "rotate is not exact for bert"),
    ({"compatible": "gguf"}, "no GGUF export for bert"),
    ({"calibration": None}, "an encoder does not generate text"),
    ({"budget": Budget(of_float=0.5)}, "a latency budget times decoding"),
])
def test_what_an_encoder_cannot_take_is_refused_in_one_line(bert_dir, text_file, kw, phrase):
    if kw.get("calibration", 1) is None:
        kw = {"calibration": Calibration(str(text_file), 2, generated=2)}
    with pytest.raises(ValueError, match=phrase) as e:
        mixq.quantize(str(bert_dir), None, _config(text_file, **kw))
    assert "\n" not in str(e.value)


def test_aespa_takes_the_bidirectional_attention(bert_dir, text_file):
    from mixq.chain import Chain

    result = mixq.quantize(str(bert_dir), None, _config(text_file, solvers=(Chain.parse("aespa+comq"),)))
    assert str(result.plan.layers.pop("embeddings.word_embeddings").solver) == "rtn"  # the table joins by default
    assert {str(c.solver) for c in result.plan.layers.values()} == {"aespa+comq"}


def test_an_encoder_exports_to_compressed_tensors(bert_dir, text_file, tmp_path):
    from transformers import AutoModel

    res = runner.invoke(app, [str(a) for a in ("quantize", "--model", bert_dir, "--bits", 4, "--out", tmp_path / "q",
                                               "--compatible", "compressed-tensors", "--calib", text_file,
                                               "--calib-windows", 2, "--eval-windows", 0)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(tmp_path / "q"), "--to", "compressed-tensors", str(tmp_path / "ct")])
    assert res.exit_code == 0, res.output
    theirs = AutoModel.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(5, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = mixq.load(tmp_path / "q")(ids).last_hidden_state, theirs(ids).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_encode_matches_sentence_transformers_with_mixq_modules_swapped_in(bert_dir, text_file, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    mixq.quantize(str(bert_dir), None, _config(text_file), out=tmp_path / "q")
    ours = mixq.load(tmp_path / "q")
    model = st.SentenceTransformer(str(bert_dir), device="cpu")
    setattr(model[0], "model" if hasattr(model[0], "model") else "auto_model", ours)  # the float BertModel out,
    assert model[0].auto_model is ours                                                # mixq's quantized one in
    tok = make_wordpiece_tokenizer()
    theirs = torch.as_tensor(model.encode(SENTENCES, convert_to_numpy=True))
    torch.testing.assert_close(mixq.encode(ours, tok, SENTENCES), theirs, atol=1e-5, rtol=1e-4)
