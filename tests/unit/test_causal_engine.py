"""The fast intervention engine: start_at_layer, probe positions and gradients against plain full passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronhunter.causal.engine import AblationEngine, VerificationTokens, full_pass_effects
from neuronhunter.causal.interventions import corpus_batches
from neuronhunter.data.corpus import Document
from neuronhunter.errors import ConfigError, SiteError
from neuronhunter.models.sites import Site
from neuronhunter.models.tiny import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest

TEXT = ("The red cat sat near the blue door on Monday. A dog ran to the green tree in March, and the fox watched "
        "the yellow car. ")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param, n_layers=3, seed=1)


def _batches(m, n_docs=3, context_length=24):
    docs = [Document(i, TEXT * (i + 1), f"d{i}") for i in range(n_docs)]
    return corpus_batches(m, docs, context_length=context_length, max_tokens=None, batch_size=2)


def test_start_at_layer_equals_full_pass(family_model):
    """Every family, every layer: starting from the cached residual stream gives the full pass's logits bit for bit
    (rotary and learned positions, Gemma's post-norms and soft-caps, padding included)."""
    m = family_model
    ids = torch.randint(100, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    full = m.forward(ids, mask)
    for layer in range(m.n_layers):
        site = Site(layer, "hook_resid_pre")
        _, cache = m.run_with_cache(ids, mask, sites=[site])
        assert torch.equal(m.forward(ids, mask, start_at_layer=layer, resid=cache[site]), full)
        hidden = m.final_hidden(ids, mask, start_at_layer=layer, resid=cache[site])
        assert torch.equal(m.unembed(hidden), full)
    # the model is left as it was: no pass-through blocks, no hooks
    assert all("forward" not in b.__dict__ for b in m.blocks)
    assert all(not mod._forward_pre_hooks for mod in m.model.modules())
    garbage = torch.randn(2, 12, m.d_model)
    assert not torch.equal(m.forward(ids, mask, start_at_layer=1, resid=garbage), full)


def test_probes_equal_single_interventions_in_full_passes(family_model):
    """Hundreds of single-token interventions packed as probe positions equal one full pass each."""
    m = family_model
    eng = AblationEngine(m, _batches(m), batch_tokens=200, probes_per_row=7)
    rng = np.random.default_rng(0)
    n = 30
    tok = rng.integers(0, len(eng.tokens), n)
    unit = rng.integers(-1, m.d_mlp, n)
    layer = 1
    value = eng.layer(layer).means.numpy()[np.maximum(unit, 0)] + rng.normal(0, 2.0, n)
    got = eng.run(layer, tok, unit, value)
    want = full_pass_effects(m, eng.tokens, layer, tok, unit, value)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    clean = unit < 0
    np.testing.assert_allclose(got[clean], eng.clean_nll()[tok[clean]], atol=1e-5)
    assert np.abs(got[~clean] - eng.clean_nll()[tok[~clean]]).max() > 1e-3  # the interventions did something


def test_unembedding_in_slices(tiny_llama, monkeypatch):
    """The probes' log-probabilities are computed a slice of rows at a time (a large vocabulary would need
    gigabytes at once): the losses, the clean losses and what a readout sees do not depend on the slice size."""
    import neuronhunter.causal.engine as E

    m = tiny_llama
    rng = np.random.default_rng(3)

    def run(rows):
        monkeypatch.setattr(E, "UNEMBED_ROWS", rows)
        eng = AblationEngine(m, _batches(m), batch_tokens=400, probes_per_row=40)
        tok = rng.integers(0, len(eng.tokens), 60)
        unit = np.random.default_rng(4).integers(-1, m.d_mlp, 60)
        seen = []
        got = eng.run(1, tok, unit, np.zeros(60),
                      readout=lambda idx, logp: seen.append((idx, logp.exp().sum(1))))
        return tok, got, eng.clean_nll(), seen

    rng = np.random.default_rng(3)
    tok, whole, clean_whole, seen_whole = run(4096)
    rng = np.random.default_rng(3)
    tok2, sliced, clean_sliced, seen = run(3)
    assert np.array_equal(tok, tok2)
    np.testing.assert_allclose(sliced, whole, atol=1e-6)
    np.testing.assert_allclose(clean_sliced, clean_whole, atol=1e-6)
    assert len(seen) > len(seen_whole) and max(len(i) for i, _ in seen) <= 3
    assert sorted(np.concatenate([i for i, _ in seen]).tolist()) == list(range(60))  # every probe read once
    np.testing.assert_allclose(torch.cat([p for _, p in seen]).numpy(), 1.0, atol=1e-5)  # log-probabilities


def test_layer_states_and_means(tiny_llama):
    m = tiny_llama
    batches = _batches(m)
    eng = AblationEngine(m, batches)
    st = eng.layer(1)
    # plain capture of the same activations, averaged over the tokens that count
    site = Site(1, "mlp.hook_post")
    acts = []
    for b in batches:
        _, cache = m.run_with_cache(b.input_ids, b.attention_mask, sites=[site])
        acts.append(cache[site])
    width = eng.tokens.ids.shape[1]
    flat = torch.cat([torch.nn.functional.pad(a, (0, 0, 0, width - a.shape[1])) for a in acts])
    want = flat[torch.as_tensor(eng.tokens.window), torch.as_tensor(eng.tokens.pos)]
    torch.testing.assert_close(st.acts, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.means, want.double().mean(0).float(), atol=1e-6, rtol=1e-5)
    assert eng.layer(0).layer == 0 and eng.layer(1).layer == 1  # going back restarts, forward advances
    torch.testing.assert_close(eng.layer(1).acts, want, atol=1e-5, rtol=1e-5)


def test_gradients_are_same_position_derivatives(tiny_llama):
    m = tiny_llama
    eng = AblationEngine(m, _batches(m), batch_tokens=300, probes_per_row=5)
    layer = 1
    st = eng.layer(layer)
    tok = np.arange(0, len(eng.tokens), 7)
    g = eng.gradients(layer, tok)
    assert g.shape == (len(tok), m.d_mlp)
    eps = 1e-2
    for j in (3, 40):
        a = st.acts[tok, j].numpy().astype(np.float64)
        up = eng.run(layer, tok, np.full(len(tok), j), a + eps)
        down = eng.run(layer, tok, np.full(len(tok), j), a - eps)
        np.testing.assert_allclose(g[:, j].numpy(), (up - down) / (2 * eps), atol=5e-4)
    assert all(p.grad is None for p in m.model.parameters())  # no gradients left on the weights


def test_tokens_that_count(tiny_gpt2):
    m = tiny_gpt2
    batches = _batches(m, context_length=16)
    t = VerificationTokens.from_batches(batches)
    assert t.pos.min() >= 1  # position 0 (BOS) is never intervened on
    lengths = t.mask.sum(1).numpy()
    assert np.all(t.pos < lengths[t.window] - 1)  # every token has a next token
    assert len(t) == int(sum((ln - 2) for ln in lengths))
    np.testing.assert_array_equal(t.target_ids, t.ids.numpy()[t.window, t.pos + 1])
    np.testing.assert_array_equal(t.prev_ids, t.ids.numpy()[t.window, t.pos - 1])


def test_bad_inputs(tiny_gpt2):
    m = tiny_gpt2
    with pytest.raises(SiteError, match="start_at_layer"):
        m.forward(torch.ones(1, 3, dtype=torch.long), start_at_layer=5, resid=torch.zeros(1, 3, m.d_model))
    with pytest.raises(SiteError, match="resid"):
        m.forward(torch.ones(1, 3, dtype=torch.long), start_at_layer=1)
    with pytest.raises(SiteError, match="shape"):
        m.forward(torch.ones(1, 3, dtype=torch.long), start_at_layer=1, resid=torch.zeros(1, 4, m.d_model))
    assert all("forward" not in b.__dict__ for b in m.blocks)  # restored after the error
    with pytest.raises(ConfigError, match="no verification tokens"):
        AblationEngine(m, [])
    short = tiny_model("mistral", n_layers=2, n_ctx=8)
    with pytest.raises(ConfigError, match="sliding window"):
        AblationEngine(short, _batches(short, context_length=16))
