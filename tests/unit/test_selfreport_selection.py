"""Neuron selection: scan statistics against a hand computation, ranking, filters, scan-run tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuronhunter.errors import ConfigError, RunDirError
from neuronhunter.models import Site
from neuronhunter.models.tiny import tiny_model
from neuronhunter.selfreport import (
    DatasetConfig,
    NeuronRef,
    NeuronScanner,
    SelectionConfig,
    plant_token_neuron,
    scan_stats,
    write_toy_corpus,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", seed=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("corpus"), n_docs=6, words_per_doc=60)


def test_scan_stats_match_a_hand_computation(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    docs = torch.tensor([0, 1, 1])
    stats = scan_stats(model, [(ids[:2], mask[:2], docs[:2]), (ids[2:], mask[2:], docs[2:])], [0, 1],
                       active_threshold=0.1)
    _, cache = model.run_with_cache(ids, mask, sites=[Site.mlp_post(0), Site.mlp_post(1)])
    keep = mask.bool().clone()
    keep[:, 0] = False  # position 0 is never counted
    for layer in (0, 1):
        a = cache[Site.mlp_post(layer)][keep].double().numpy()  # [tokens, d_mlp]
        rows = stats[stats["layer"] == layer].sort_values("neuron")
        assert (rows["count"] == a.shape[0]).all()
        assert np.allclose(rows["mean"], a.mean(0), atol=1e-6)
        assert np.allclose(rows["std"], a.std(0), atol=1e-6)
        assert np.allclose(rows["max"], a.max(0), atol=1e-6)
        assert np.allclose(rows["frac_active"], (a > 0.1).mean(0))
        c = a - a.mean(0)
        kurt = (c**4).mean(0) / (c**2).mean(0) ** 2 - 3
        assert np.allclose(rows["kurtosis"], kurt, rtol=1e-4, atol=1e-4)
        full = cache[Site.mlp_post(layer)].masked_fill(~keep[..., None], -np.inf)
        doc0 = full[0].amax(0) > 0.1
        doc1 = full[1:].amax((0, 1)) > 0.1
        assert np.allclose(rows["doc_frac_active"], (doc0.double() + doc1.double()).numpy() / 2)
        assert (rows["n_docs"] == 2).all()


def test_fresh_scan_finds_the_planted_neuron(corpus):
    hm = tiny_model("llama", seed=0)
    plant_token_neuron(hm, layer=1, neuron=9, token_ids=[hm.tokenizer.encode(" cat")[0]])
    cfg = SelectionConfig(source="scan", criterion="variance", count=2, scan_tokens=200)
    sel = NeuronScanner(hm, cfg, DatasetConfig(corpus=str(corpus), context_length=32)).select()
    assert sel.neurons[0] == NeuronRef(layer=1, neuron=9)
    assert len(sel.neurons) == 2 and sel.info["source"] == "scan"
    js = sel.to_json()
    assert js["neurons"][0]["neuron"] == "L1.N9" and "variance" in js["reason"]
    assert json.dumps(js)  # serialisable


def test_explicit_selection_reports_stats(model, corpus):
    cfg = SelectionConfig(source="explicit", neurons=["L1.N4", "L0.N2"], scan_tokens=100)
    sel = NeuronScanner(model, cfg, DatasetConfig(corpus=str(corpus))).select()
    assert sel.neurons == [NeuronRef(layer=1, neuron=4), NeuronRef(layer=0, neuron=2)]
    assert list(sel.chosen["neuron"]) == [4, 2]
    with pytest.raises(ConfigError, match="out of range"):
        NeuronScanner(model, SelectionConfig(source="explicit", neurons=["L5.N0"]), DatasetConfig()).select()


def _run(tmp_path, **extra):
    n = 128
    df = pd.DataFrame({"layer": np.repeat([0, 1], n), "neuron": np.tile(np.arange(n), 2),
                       "std": np.linspace(0.1, 2.0, 2 * n), "frac_active": np.linspace(0.0, 0.5, 2 * n),
                       **extra})
    run = tmp_path / "scanrun"
    run.mkdir(exist_ok=True)
    df.to_parquet(run / "neurons.parquet")
    (run / "config.json").write_text(json.dumps({"model": "tiny-gpt2"}))
    return run


def test_selection_from_a_scan_run(model, tmp_path):
    run = _run(tmp_path, kurtosis=np.arange(256.0)[::-1], verdict=["mono" if i % 7 == 0 else "poly" for i in range(256)],
               top_category=["food" if i % 2 else "animal" for i in range(256)])

    def pick(**kw):
        return NeuronScanner(model, SelectionConfig(source="run", run=str(run), **kw), DatasetConfig()).select()

    assert pick(criterion="variance").neurons == [NeuronRef(layer=1, neuron=127)]
    assert pick(criterion="kurtosis").neurons == [NeuronRef(layer=0, neuron=0)]
    first = int(np.argmax(np.linspace(0.0, 0.5, 256) >= 0.1))  # the sparsest neuron allowed
    assert pick(criterion="density", min_frac_active=0.1).neurons[0].neuron == first
    sel = pick(criterion="variance", verdict="mono", layers=[0])
    assert sel.neurons == [NeuronRef(layer=0, neuron=126)]  # 126 = 7 * 18, the largest "mono" in layer 0
    sel = pick(criterion="variance", category="animal", count=3)
    assert all(n.neuron % 2 == 0 for n in sel.neurons) and len(sel.neurons) == 3


def test_scan_run_errors(model, tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ConfigError, match="no 'kurtosis' column"):
        NeuronScanner(model, SelectionConfig(source="run", run=str(run)), DatasetConfig()).select()
    with pytest.raises(ConfigError, match="no 'verdict' column"):
        NeuronScanner(model, SelectionConfig(source="run", run=str(run), criterion="variance", verdict="mono"),
                      DatasetConfig()).select()
    with pytest.raises(ConfigError, match="no neuron passes"):
        NeuronScanner(model, SelectionConfig(source="run", run=str(run), criterion="variance", min_frac_active=0.9),
                      DatasetConfig()).select()
    with pytest.raises(RunDirError, match="no neurons.parquet"):
        NeuronScanner(model, SelectionConfig(source="run", run=str(tmp_path / "nope")), DatasetConfig()).select()
