"""Features and circuits on the real embedded model (small runs): a dictionary trained on one layer's neurons
reconstructs them better than their mean, the feature view equals the dictionary applied to plain captured neurons,
and circuit discovery on a bundled task is exact at both ends of its faithfulness curve."""

from __future__ import annotations

import pytest
import torch

from neuronhunter.circuits.features import DictionaryModel
from neuronhunter.circuits.training import DictionaryConfig, train_dictionaries
from neuronhunter.models.sites import Site

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("feat") / "dict"
    cfg = DictionaryConfig(layers=[2], out=str(out), expansion=2, k=16, train_tokens=6000, eval_tokens=1024,
                           token_batch=512, shuffle_tokens=2048, batch_size=8)
    return train_dictionaries(cfg, model=embedded)


def test_dictionary_on_real_neurons(trained):
    m = trained.metrics[2]
    assert m["tokens"] >= 1000 and m["l0"] <= 16
    assert 0.0 < m["fvu"] < 0.9  # a small dictionary after a few steps: better than the mean, far from perfect
    # both replacements cost loss; after only 6,000 tokens the splice was measured no better than mean ablation
    # (3.568 vs 3.559 nats), so the test does not claim that it is
    assert m["loss_clean"] < m["loss_dictionary"] and m["loss_clean"] < m["loss_mean_ablated"]
    assert trained.summary["dictionary"]["n_features"] == 2 * 1536


def test_feature_view_on_the_real_model(embedded, trained):
    view = DictionaryModel(embedded, trained.dictionary)
    ids = embedded.to_tokens("The capital of France is Paris, and the capital of Spain is Madrid.")
    _, plain = embedded.run_with_cache(ids, sites=[Site.mlp_post(2)], stop_at_layer=3)
    _, feats = view.run_with_cache(ids, sites=[Site.mlp_post(2)], stop_at_layer=3)
    expected = trained.dictionary.features(2, plain[Site.mlp_post(2)])
    torch.testing.assert_close(feats[Site.mlp_post(2)], expected, atol=1e-4, rtol=1e-4)
    with view.hooks({Site.mlp_post(2): lambda f, _s: f.clone()}):
        same = view.forward(ids)
    torch.testing.assert_close(same, embedded.forward(ids), atol=1e-4, rtol=1e-4)


def test_circuit_curve_ends_are_exact_on_the_real_model(embedded):
    from neuronhunter.circuits.discovery import discover
    from neuronhunter.circuits.tasks import load_task

    res = discover(embedded, load_task("capitals", limit=4), sizes=(10,), check_top=1)
    assert res.clean > 2.0 and res.corrupted < -2.0
    assert abs(res.curve[-1]["faithfulness"] - 1.0) < 1e-3  # every edge: the clean run
    top = res.checks[0]  # the best-scored edge really matters, in the direction its score says
    assert top["score"] * top["exact"] > 0 and abs(top["exact_normalised"]) > 0.05
    assert torch.isfinite(torch.tensor(res.edges["score"].to_numpy())).all()
