"""Head scores with planted ground truth: an exact previous-token head built from sinusoidal positions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuronhunter.analysis import heads as Hd
from neuronhunter.causal.interventions import corpus_batches
from neuronhunter.data.corpus import Document
from neuronhunter.errors import ConfigError, SiteError
from neuronhunter.models.tiny import tiny_model

PLANTED = (0, 2)  # (layer, head)
PERIODS = (7.3, 19.1, 53.7, 311.0)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


@pytest.fixture(scope="module")
def planted():
    """Tiny GPT-2 whose head 0.2 attends (almost) exactly to the previous token.

    Positions are sinusoids in dims 0..7 (and their negatives in 8..15, so LayerNorm's centring leaves them alone);
    token embeddings live in dims 16.. only. The head's query rotates each (cos, sin) pair back by one position and
    its key reads the pair unchanged, so q(p)·k(j) = c * sum_f cos(w_f (p - 1 - j)): maximal exactly at j = p - 1.
    """
    m = tiny_model("gpt2", seed=7)
    hf = m.model
    L, h = PLANTED
    d, dh = m.d_model, m.d_head
    n_ctx = hf.transformer.wpe.weight.shape[0]
    omegas = [2 * math.pi / T for T in PERIODS]
    F = len(omegas)
    with torch.no_grad():
        pos = torch.zeros(n_ctx, d)
        p = torch.arange(n_ctx, dtype=torch.float32)
        for f, w in enumerate(omegas):
            pos[:, 2 * f], pos[:, 2 * f + 1] = torch.cos(w * p), torch.sin(w * p)
        pos[:, 2 * F : 4 * F] = -pos[:, : 2 * F]
        hf.transformer.wpe.weight.copy_(pos)
        hf.transformer.wte.weight[:, : 4 * F] = 0.0
        W = hf.transformer.h[L].attn.c_attn.weight  # Conv1D [d_model, 3 * d_model]: q | k | v
        b = hf.transformer.h[L].attn.c_attn.bias
        q0, k0 = h * dh, d + h * dh
        W[:, q0 : q0 + dh] = 0.0
        W[:, k0 : k0 + dh] = 0.0
        b[q0 : q0 + dh] = 0.0
        b[k0 : k0 + dh] = 0.0
        lam = 20.0
        for f, w in enumerate(omegas):
            i, j = 2 * f, 2 * f + 1
            W[i, q0 + i], W[j, q0 + i] = lam * math.cos(w), lam * math.sin(w)
            W[i, q0 + j], W[j, q0 + j] = -lam * math.sin(w), lam * math.cos(w)
            W[i, k0 + i], W[j, k0 + j] = 1.0, 1.0
    return m


@pytest.fixture(scope="module")
def batches(planted):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta river stone cloud paper lamp forest quiet north".split()
    docs = [Document(i, " ".join(rng.choice(words, 40)), f"d{i}") for i in range(4)]
    return corpus_batches(planted, docs, context_length=32, max_tokens=None, batch_size=4)


def test_planted_previous_token_head_ranks_first(planted, batches):
    scores, ind = Hd.head_scores(planted, batches, seq_len=20, n_seqs=4)
    best = Hd.top_heads(scores, "prev_token", k=2)
    assert (int(best.layer[0]), int(best["head"][0])) == PLANTED
    assert best.prev_token[0] > 0.95
    assert best.prev_token[0] - best.prev_token[1] > 0.5
    row = scores[(scores.layer == PLANTED[0]) & (scores["head"] == PLANTED[1])].iloc[0]
    assert row.bos_sink < 0.05 and row.entropy < 0.3
    # on repeated random tokens the previous-token head attends to q-1, not to the induction target q-T+1
    i = ind.layers.index(PLANTED[0])
    assert ind.prev_token[i, PLANTED[1]] > 0.95
    assert ind.scores[i, PLANTED[1]] < 0.05
    assert set(scores.columns) == {"layer", "head", *Hd.SCORES}
    assert len(scores) == planted.n_layers * planted.n_heads


def test_duplicate_token_score(planted):
    """On 'x x x x ...' every earlier token is a duplicate: the previous-token head puts ~all its mass there."""
    ids = planted.to_tokens(" x" * 20)
    from neuronhunter.data.batches import TokenBatch

    bt = TokenBatch(ids, torch.ones_like(ids), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long), None, True)
    s = Hd.corpus_head_scores(planted, [bt])
    assert s["duplicate_token"][PLANTED[0], PLANTED[1]] > 0.95
    assert np.all(s["duplicate_token"] <= 1 + 1e-6)


def test_attention_patterns(planted):
    pats = Hd.attention_patterns(planted, "one two three four five six", layers=[0])
    assert pats.pattern.shape == (1, planted.n_heads, 7, 7)
    np.testing.assert_allclose(pats.pattern.sum(-1), 1.0, atol=1e-5)
    assert np.triu(pats.pattern[0, 0], 1).max() < 1e-6  # causal
    prev = np.diagonal(pats.pattern[0, PLANTED[1]], offset=-1)
    assert prev.min() > 0.9
    assert pats.tokens[0] == "<|endoftext|>" and len(pats.tokens) == 7
    with pytest.raises(SiteError, match="layer 3 is out of range"):
        Hd.attention_patterns(planted, "hi", layers=[3])


def test_random_repeated_tokens_and_loss_curve(planted):
    ids = Hd.random_repeated_tokens(planted, seq_len=10, n_seqs=3, seed=1)
    assert ids.shape == (3, 21)
    assert torch.equal(ids[:, 1:11], ids[:, 11:])
    assert (ids[:, 1:] != planted.tokenizer.eos_token_id).all()
    res = Hd.induction_scores(planted, seq_len=10, n_seqs=3)
    assert len(res.loss_curve) == 20
    assert set(res.loss_curve.half) == {"first", "second"}
    assert np.isfinite(res.first_half_loss) and np.isfinite(res.second_half_loss)
    with pytest.raises(ConfigError):
        Hd.random_repeated_tokens(planted, seq_len=1)
    with pytest.raises(ConfigError, match="unknown head score"):
        Hd.top_heads(Hd.head_scores(planted, None, seq_len=5, n_seqs=2)[0], "banana")
