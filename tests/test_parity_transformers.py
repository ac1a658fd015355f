"""Parity with transformers' RecurrentGemma on random weights, through its save_pretrained files."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

import rgemma
from reference import transformers_model

ATOL = 2e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # lru_width == width: transformers sizes its conv state by hidden_size.
    config = rgemma.Config.preset("tiny")
    hf = transformers_model(config, seed=5)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    ours = rgemma.load_model(path).eval()
    assert ours.config == config
    return hf, ours


def tokens(batch, length, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefill_logits(pair):
    hf, ours = pair
    window = ours.config.attention_window
    seq = tokens(2, window)
    torch.testing.assert_close(ours(seq)[0], hf(seq).logits, rtol=0, atol=ATOL)


@torch.no_grad()
def test_prefill_then_decode(pair):
    hf, ours = pair
    seq = tokens(2, 16, seed=1)
    cache = DynamicCache(config=hf.config)
    positions = torch.arange(16).repeat(2, 1)
    expected = [hf(seq[:, :6], position_ids=positions[:, :6], cache=cache, use_cache=True).logits]
    for t in range(6, 16):
        expected.append(hf(seq[:, t : t + 1], position_ids=positions[:, t : t + 1], cache=cache, use_cache=True).logits)
    logits, state = ours(seq[:, :6])
    steps = [logits]
    for t in range(6, 16):
        logits, state = ours(seq[:, t : t + 1], state=state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), torch.cat(expected, dim=1), rtol=0, atol=ATOL)


@torch.no_grad()
def test_window_follows_the_official_code_where_transformers_differs(pair):
    """transformers lets a query see W keys including itself; the official code
    (and rgemma, see test_parity_official) sees W + 1. The outputs agree on the
    first W positions and part from position W on."""
    hf, ours = pair
    window = ours.config.attention_window
    seq = tokens(1, window + 6, seed=2)
    ours_logits, hf_logits = ours(seq)[0], hf(seq).logits
    torch.testing.assert_close(ours_logits[:, :window], hf_logits[:, :window], rtol=0, atol=ATOL)
    assert (ours_logits[:, window:] - hf_logits[:, window:]).abs().amax(dim=-1).min() > 1e-3
