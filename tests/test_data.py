"""Calibration streams: text windows, windows the model samples itself, and their interleaving."""
from __future__ import annotations

import pytest
import torch

from mixq import data

from conftest import make_tiny_model


def test_generated_windows_are_seeded_and_leave_the_global_random_state(tiny_model):
    reported = []
    torch.manual_seed(5)
    a = data.generated_windows(tiny_model, 1, 3, 24, seed=0, step=lambda done, total: reported.append((done, total)))
    after_a = torch.rand(4)
    torch.manual_seed(5)
    b = data.generated_windows(tiny_model, 1, 3, 24, seed=0)
    assert torch.equal(torch.rand(4), after_a)  # the caller's random stream is untouched
    assert a.shape == (3, 24) and torch.equal(a, b)
    assert (a[:, 0] == 1).all() and (a[:, 12] == 1).all()  # two samples a window, each from the start token
    assert reported[-1] == (11, 11) and len(reported) == 11
    assert not torch.equal(a, data.generated_windows(tiny_model, 1, 3, 24, seed=1))
    assert not torch.equal(a[0], a[1])  # sampled, not greedy: the windows differ


def test_generated_windows_follow_the_model():
    """Sampled from the model's own distribution: a model whose head always favours one token writes mostly it."""
    model = make_tiny_model()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[7] = 5.0  # e^5 ≈ 148 against 255 others at 1: token 7 a third of the time
    model.lm_head = head
    ids = data.generated_windows(model, 1, 4, 33)
    share = (ids[:, 1:] == 7).float().mean()
    assert 0.15 < share < 0.6, share


def test_mixed_interleaves_so_every_prefix_has_both():
    text = torch.zeros(8, 4, dtype=torch.long)
    gen = torch.ones(4, 4, dtype=torch.long)
    mixed = data.mixed(text, gen)
    assert mixed.shape == (12, 4) and int(mixed.sum()) == 16
    kinds = mixed[:, 0].tolist()
    assert 0 < sum(kinds[:3]) < 3  # the first three windows already hold both kinds
    assert all(sum(kinds[:k]) <= k // 3 + 1 for k in range(1, 13))  # no run of generated windows at the start
    assert torch.equal(data.mixed(text, gen[:0]), text)


def test_start_token_falls_back_from_bos_to_eos_to_the_config_then_fails(tiny_model):
    from types import SimpleNamespace

    tok = SimpleNamespace(bos_token_id=5, eos_token_id=6)
    assert data.start_token(tok, tiny_model) == 5
    tok.bos_token_id = None
    assert data.start_token(tok, tiny_model) == 6
    tok.eos_token_id = None
    assert data.start_token(tok, tiny_model) == tiny_model.config.bos_token_id == 1
    tiny_model.config.bos_token_id = None
    with pytest.raises(data.DataError, match="start token"):
        data.start_token(tok, tiny_model)
