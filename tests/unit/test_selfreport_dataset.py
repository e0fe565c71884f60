"""Activation datasets: shapes, values, leakage-free splits, window-max targets, balancing, Parquet round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronhunter.errors import ConfigError
from neuronhunter.models import Site
from neuronhunter.models.tiny import tiny_model
from neuronhunter.selfreport import (
    ActivationDataset,
    ActivationDatasetGenerator,
    DatasetConfig,
    NeuronRef,
    assign_splits,
    write_toy_corpus,
)
from neuronhunter.selfreport.dataset import trailing_max

N1 = NeuronRef(layer=1, neuron=5)
N0 = NeuronRef(layer=0, neuron=7)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("corpus"), n_docs=10, words_per_doc=80)


@pytest.fixture(scope="module")
def datasets(model, corpus):
    cfg = DatasetConfig(corpus=str(corpus), max_tokens=900, context_length=24)
    return ActivationDatasetGenerator(model, cfg).generate([N1, N0])


def test_assign_splits_is_a_partition_with_every_split_nonempty():
    for n in (3, 4, 5, 10, 37):
        labels = assign_splits(n, (0.7, 0.15, 0.15), seed=3)
        assert len(labels) == n
        assert {"train", "val", "test"} == set(labels)
        assert labels.count("train") >= labels.count("test")
    assert assign_splits(10, (0.7, 0.15, 0.15), 1) == assign_splits(10, (0.7, 0.15, 0.15), 1)
    with pytest.raises(ConfigError, match="at least 3 documents"):
        assign_splits(2, (0.7, 0.15, 0.15), 0)


def test_shapes_columns_and_metadata(datasets, model):
    ds = datasets[N1]
    df = ds.table
    for col in ("split", "doc_id", "window_id", "position", "token_id", "token", "activation", "target", "selected",
                "model", "site", "layer", "neuron"):
        assert col in df.columns
    assert set(df["site"].astype(str)) == {"blocks.1.mlp.hook_post"}
    assert ds.meta["site"] == "blocks.1.mlp.hook_post" and ds.meta["neuron"] == 5 and ds.meta["model"] == model.name
    counts = ds.meta["counts"]
    for split, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
        assert 0 < counts[split]["tokens"] <= round(900 * frac)  # the budget, or all the split's documents
    # position 0 (BOS) is never a target; every other position is (no balancing)
    assert not df[df["position"] == 0]["selected"].any()
    assert df[df["position"] > 0]["selected"].all()
    assert (df[df["position"] == 0]["token_id"] == model.bos_token_id).all()
    # both neurons share the token layout
    other = datasets[N0].table
    assert (other["token_id"].to_numpy() == df["token_id"].to_numpy()).all()
    tr = ds.tensors("train")
    assert tr.input_ids.shape == tr.target.shape == tr.selected.shape
    assert tr.input_ids.shape[1] <= 24
    assert tr.n_targets == counts["train"]["tokens"]


def test_no_document_or_window_in_two_splits(datasets):
    df = datasets[N1].table
    docs = df.groupby("doc_id")["split"].nunique()
    assert (docs == 1).all()
    wins = df.groupby("window_id")["split"].nunique()
    assert (wins == 1).all()
    assert set(df["split"].astype(str)) == {"train", "val", "test"}
    by_split = {s: set(df[df["split"] == s]["doc_id"]) for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])


def test_activations_equal_a_direct_forward_pass(datasets, model):
    ds = datasets[N1]
    split = ds.tensors("test")
    _, cache = model.run_with_cache(split.input_ids, split.attention_mask, sites=[Site.mlp_post(1)])
    direct = cache[Site.mlp_post(1)][..., 5]
    mask = split.attention_mask.bool()
    assert torch.allclose(direct[mask], split.activation[mask], atol=1e-5)
    assert torch.equal(split.activation, split.target)


def test_window_max_target(model, corpus):
    cfg = DatasetConfig(corpus=str(corpus), max_tokens=300, context_length=16, target="window_max", window=3)
    ds = ActivationDatasetGenerator(model, cfg).generate([N1])[N1]
    for _, w in ds.table.groupby("window_id"):
        act = w.sort_values("position")["activation"].to_numpy()
        tgt = w.sort_values("position")["target"].to_numpy()
        for t in range(1, len(act)):
            assert tgt[t] == pytest.approx(act[max(1, t - 2) : t + 1].max())
    assert np.allclose(trailing_max(np.array([1.0, 3.0, 2.0, 0.0, 0.0]), 2), [1, 3, 3, 2, 0])


def test_balanced_sampling_only_touches_training_tokens(model, corpus):
    cfg = DatasetConfig(corpus=str(corpus), max_tokens=900, context_length=24, balance=True,
                        balance_quantile=0.8, balance_ratio=1.0)
    ds = ActivationDatasetGenerator(model, cfg).generate([N1], seed=0)[N1]
    df = ds.table
    train = df[(df["split"] == "train") & (df["position"] > 0)]
    kept = train[train["selected"]]
    thr = np.quantile(train["target"], 0.8)
    high = (kept["target"] >= thr).sum()
    assert high == (train["target"] >= thr).sum()  # every high token kept
    assert abs(int((kept["target"] < thr).sum()) - int(high)) <= 1  # one low per high
    for split in ("val", "test"):
        s = df[(df["split"] == split) & (df["position"] > 0)]
        assert s["selected"].all()


def test_parquet_round_trip(datasets, tmp_path):
    ds = datasets[N1]
    path = ds.save(tmp_path / "d.parquet")
    back = ActivationDataset.load(path)
    assert back.meta == ds.meta
    assert back.neuron == N1
    assert len(back.table) == len(ds.table)
    assert np.array_equal(back.table["activation"].to_numpy(), ds.table["activation"].to_numpy())
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_inputs(model, tmp_path):
    corpus = write_toy_corpus(tmp_path / "two", n_docs=2)
    with pytest.raises(ConfigError, match="at least 3 documents"):
        ActivationDatasetGenerator(model, DatasetConfig(corpus=str(corpus))).generate([N1])
    corpus = write_toy_corpus(tmp_path / "ok", n_docs=4)
    with pytest.raises(ConfigError, match="does not exist"):
        ActivationDatasetGenerator(model, DatasetConfig(corpus=str(corpus))).generate([NeuronRef(layer=9, neuron=0)])
