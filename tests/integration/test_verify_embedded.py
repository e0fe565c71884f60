"""The verification toolbox on the real embedded model (SmolLM2-135M), with small inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronhunter.analysis.attribution import direct_logit_weights, top_logit_tokens
from neuronhunter.analysis.heads import induction_scores, random_repeated_tokens
from neuronhunter.causal.interventions import head_ablation, next_token_nll, run_with_interventions
from neuronhunter.causal.patching import patching_sweep

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread_module")]  # 1 thread, see conftest


@pytest.fixture(scope="module")
def induction(embedded):
    return induction_scores(embedded, seq_len=20, n_seqs=4, batch_size=4)


def test_induction_heads_found(embedded, induction):
    s = induction.scores
    flat = np.argsort(-s.ravel())[:3]
    top = [divmod(int(i), embedded.n_heads) for i in flat]
    assert s.ravel()[flat[0]] > 0.5
    assert all(10 <= layer <= 25 for layer, _ in top)  # induction heads sit in the middle layers
    assert induction.second_half_loss < induction.first_half_loss - 5.0  # copying makes the repeat predictable


def test_ablating_induction_heads_breaks_the_repeat(embedded, induction):
    flat = np.argsort(-induction.scores.ravel())[:4]
    heads = [divmod(int(i), embedded.n_heads) for i in flat]
    ids = random_repeated_tokens(embedded, seq_len=20, n_seqs=2, seed=5)
    clean, _ = next_token_nll(embedded.forward(ids), ids)
    ablated, _ = next_token_nll(run_with_interventions(embedded, ids, None, head_ablation(embedded, heads)), ids)
    second = slice(21, None)  # targets r_1.. of the second copy
    assert float(ablated[:, second].mean()) > float(clean[:, second].mean()) + 0.5


def test_patching_capital_city(embedded):
    res = patching_sweep(embedded, "The capital of France is", "The capital of Italy is", " Paris", " Rome",
                         layers=[0, 12, 29], heads=False)
    assert res.clean_metric > 0 > res.corrupted_metric
    p = res.clean_tokens.index(" France")
    assert float(res.resid[0, p]) == pytest.approx(1.0, abs=1e-3)  # layer 0: the country token carries it all
    assert float(res.resid[0, :p].abs().max()) < 1e-3


def test_logit_attribution_tied_embeddings(embedded):
    assert embedded.tied_embeddings
    w = embedded.model.model.layers[29].mlp.down_proj.weight[:, 7]
    g = embedded.model.model.norm.weight
    hand = (w * g) @ embedded.model.model.embed_tokens.weight.T
    torch.testing.assert_close(direct_logit_weights(embedded, 29, [7])[0], hand, atol=1e-4, rtol=1e-4)
    df = top_logit_tokens(embedded, 29, [7], k=5)
    assert len(df) == 10 and df.token_id.iloc[0] == int(hand.argmax())


# ------------------------------------------------------------------------------------------------ causal verification
@pytest.fixture(scope="module")
def heldout_batches(embedded):
    from neuronhunter.causal.interventions import corpus_batches, load_concept_labeller
    from neuronhunter.data.corpus import Corpus
    from neuronhunter.data.split import DocumentSplit

    labeller = load_concept_labeller()
    docs = list(DocumentSplit(0.3, 0).select(Corpus("master"), "heldout"))
    return corpus_batches(embedded, docs, context_length=128, max_tokens=2048, batch_size=8, labeller=labeller), labeller


def test_start_at_layer_and_probes_on_the_embedded_model(embedded, heldout_batches):
    from neuronhunter.causal.engine import AblationEngine, full_pass_effects
    from neuronhunter.models.sites import Site

    batches, _ = heldout_batches
    b = batches[0]
    ids, mask = b.input_ids[:2], b.attention_mask[:2]
    site = Site(20, "hook_resid_pre")
    full, cache = embedded.run_with_cache(ids, mask, sites=[site])
    assert torch.equal(embedded.forward(ids, mask, start_at_layer=20, resid=cache[site]), full)
    eng = AblationEngine(embedded, batches[:2])
    rng = np.random.default_rng(0)
    tok = rng.integers(0, len(eng.tokens), 6)
    unit = rng.integers(0, embedded.d_mlp, 6)
    value = eng.layer(20).means.numpy()[unit]
    np.testing.assert_allclose(eng.run(20, tok, unit, value),
                               full_pass_effects(embedded, eng.tokens, 20, tok, unit, value), atol=2e-4)


def test_colour_neuron_on_heldout_text(embedded, heldout_batches):
    """L20.N882, the hunt's colour neuron, on held-out documents. Mean-ablating it at colour words raises the loss
    there, but 50 same-layer neurons forced to write a vector of exactly the same norm at the same tokens cost about
    as much (measured: 0.018 vs 0.026 nats on 8 tokens; 0.078 vs 0.039 on 64 tokens of 8,192, p_neuron 0.18): the
    matched null does not confirm the claim that the unmatched random-neuron comparison of the old verify did."""
    from neuronhunter.causal.claims import parse_claim
    from neuronhunter.causal.verification import VerifyConfig, verify_claims

    batches, labeller = heldout_batches
    cfg = VerifyConfig(max_claim_tokens=8, max_nulls=50, steer=False, attribution=False, early_stop=0)
    df, summary = verify_claims(embedded, batches, [parse_claim("20:882=color")], labeller.categories, cfg)
    r = df.iloc[0]
    assert r.n_tokens == 8 and r.n_nulls == 50 and summary["n_documents"] > 1 and r.verdict != "dead"
    assert r.causal_effect > 0.005 and r.perturbation > 0  # ablation hurts at colour words ...
    assert r.null_neuron_mean > 0.5 * r.causal_effect  # ... but equally sized perturbations hurt about as much
    assert 0.2 < r.p_neuron <= 1 and not r.causally_confirmed
    again, _ = verify_claims(embedded, batches, [parse_claim("20:882=color")], labeller.categories, cfg)
    assert again.iloc[0].causal_effect == r.causal_effect and again.iloc[0].p_value == r.p_value  # seeded
