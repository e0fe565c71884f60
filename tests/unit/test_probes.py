"""Probes with a planted linearly separable feature and a planted neuron; user token-label files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuronhunter.analysis import probes as P
from neuronhunter.causal.interventions import corpus_batches
from neuronhunter.data.corpus import Document
from neuronhunter.errors import ConfigError
from neuronhunter.models.tiny import tiny_model

ANIMALS = ["cat", "dog", "fox", "bird", "horse", "mouse"]
COLORS = ["red", "blue", "green", "yellow", "purple", "brown"]
FILLER = ["the", "a", "saw", "near", "and", "then", "with", "under", "old", "small"]
PLANTED_NEURON = (0, 5)


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


class WordLabeller:
    def __init__(self, sets: dict[str, set[str]]):
        self.categories = list(sets)
        self.sets = sets

    def label(self, text, offsets):
        out = np.zeros((len(offsets), len(self.categories)), dtype=bool)
        for i, (s, e) in enumerate(offsets):
            for c, name in enumerate(self.categories):
                out[i, c] = text[s:e].strip().lower() in self.sets[name]
        return out


LABELLER = WordLabeller({"animal": set(ANIMALS), "color": set(COLORS)})


@pytest.fixture(scope="module")
def model():
    """Tiny GPT-2 with a planted feature: animal tokens get +1 on residual dim 0 (their embedding), and neuron
    0.5 reads dim 0, so it fires on animals only."""
    m = tiny_model("gpt2", seed=21)
    hf = m.model
    with torch.no_grad():
        for w in ANIMALS:
            (tid,) = m.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            hf.transformer.wte.weight[tid, 0] += 1.0
        c_fc = hf.transformer.h[0].mlp.c_fc  # Conv1D [d_model, d_mlp]
        c_fc.weight[:, PLANTED_NEURON[1]] = 0.0
        c_fc.weight[0, PLANTED_NEURON[1]] = 1.0
        c_fc.bias[PLANTED_NEURON[1]] = -1.0
    return m


@pytest.fixture(scope="module")
def data(model):
    rng = np.random.default_rng(0)
    vocab = ANIMALS + COLORS + FILLER * 2
    docs = [Document(i, " ".join(rng.choice(vocab, 60)), f"d{i}") for i in range(12)]
    batches = corpus_batches(model, docs, context_length=64, max_tokens=None, batch_size=6, labeller=LABELLER)
    return {site: P.collect_features(model, batches, LABELLER.categories, site=site) for site in ("resid", "mlp")}


def test_probe_on_planted_feature_is_perfect_and_control_at_chance(data):
    for site in ("resid", "mlp"):
        df = P.linear_probes(data[site], n_splits=3)
        assert list(df.layer) == [0, 1]
        first = df.iloc[0]
        assert first.accuracy > 0.97 and first.macro_f1 > 0.97
        assert first.n_classes == 2 and first.n_docs == 12 and first.n_tokens > 200
        assert 0.4 < first.majority_accuracy < 0.65
        assert abs(first.control_accuracy - first.majority_accuracy) < 0.15  # shuffled labels: chance
        assert first.control_macro_f1 < 0.65
        assert first.selectivity > 0.3


def test_include_none_and_single_labels():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=bool)
    y, names = P.single_labels(labels, ["a", "b"])
    assert y.tolist() == [0, 1, -1, -1] and names == ["a", "b"]
    y, names = P.single_labels(labels, ["a", "b"], include_none=True)
    assert y.tolist() == [0, 1, -1, 2] and names == ["a", "b", "none"]


def test_sparse_probe_finds_planted_neuron(data):
    res = P.sparse_probe(data["mlp"], ks=[1, 2, 4], n_splits=3)
    best = res.best.set_index("category")
    assert (int(best.loc["animal", "layer"]), int(best.loc["animal", "neuron"])) == PLANTED_NEURON
    assert best.loc["animal", "f1"] > 0.97
    curve = res.curve[res.curve.category == "animal"]
    assert list(curve.k) == [1, 2, 4]
    assert curve.mcc.iloc[0] > 0.95
    assert curve.neurons.iloc[0] == [f"{PLANTED_NEURON[0]}.{PLANTED_NEURON[1]}"]
    hunt = pd.DataFrame({"layer": [0, 1, 1], "neuron": [5, 3, 7], "verdict": ["monosemantic", "monosemantic", "dead"],
                         "top_category": ["animal", "color", None]})
    cmp = P.compare_with_hunt(data["mlp"], res, hunt).set_index("category")
    assert bool(cmp.loc["animal", "probe_best_is_hunt"]) and cmp.loc["animal", "hunt_best_rank"] == 1
    assert cmp.loc["animal", "hunt_best_f1"] > 0.97
    assert cmp.loc["color", "n_hunt"] == 1 and not cmp.loc["color", "probe_best_is_hunt"]
    with pytest.raises(ConfigError, match="hunt columns"):
        P.compare_with_hunt(data["mlp"], res, hunt[["layer", "neuron"]])


def test_token_label_files(tmp_path, model):
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("Paris\tLOC\nis\tO\nlovely\tO\n\nAda\tPER\nvisited\tO\nBerlin\tLOC\n", encoding="utf-8")
    docs, lab = P.read_token_labels(tsv)
    assert [d.text for d in docs] == ["Paris is lovely", "Ada visited Berlin"]
    assert lab.categories == ["LOC", "PER"]
    from neuronhunter.data.batches import tokenize_document

    ids, offsets = tokenize_document(model.tokenizer, docs[1].text)
    labels = lab.label(docs[1].text, offsets)
    toks = [model.tokenizer.decode([i]) for i in ids]
    assert "".join(t for t, row in zip(toks, labels, strict=True) if row[1]) == "Ada"
    assert "".join(t for t, row in zip(toks, labels, strict=True) if row[0]).strip() == "Berlin"
    jl = tmp_path / "labels.jsonl"
    jl.write_text(json.dumps({"text": "red fox", "spans": [[0, 3, "color"], [4, 7, "animal"]]}) + "\n")
    docs, lab = P.read_token_labels(jl)
    assert lab.categories == ["animal", "color"] and docs[0].text == "red fox"
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    with pytest.raises(ConfigError, match="word<TAB>label"):
        P.read_token_labels(bad)
    with pytest.raises(ConfigError, match="not found"):
        P.read_token_labels(tmp_path / "missing.tsv")


def test_probe_needs_two_documents(model):
    docs = [Document(0, "the cat and the red dog", "one")]
    batches = corpus_batches(model, docs, context_length=32, max_tokens=None, batch_size=2, labeller=LABELLER)
    d = P.collect_features(model, batches, LABELLER.categories, layers=[0])
    with pytest.raises(ConfigError, match="two documents"):
        P.linear_probes(d)
    with pytest.raises(ConfigError, match="probe site"):
        P.collect_features(model, batches, LABELLER.categories, site="banana")


def test_standardised_mean_difference_and_f1_threshold():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3)).astype(np.float32) * np.array([1.0, 100.0, 0.01], dtype=np.float32)
    y = (rng.random(50) < 0.3).astype(int)
    rows = np.arange(10, 50)
    Xr, yr = X[rows].astype(np.float64), y[rows].astype(bool)
    raw = Xr[yr].mean(0) - Xr[~yr].mean(0)
    np.testing.assert_allclose(P.mean_difference(X, y, rows, standardize=False), raw, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(P.mean_difference(X, y, rows), raw / (Xr.std(0) + 1e-6), rtol=1e-5)
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    assert P._f1_threshold(scores, np.array([1, 1, 0, 0, 0])) == 0.8
