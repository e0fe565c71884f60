"""The hunt on the real embedded model (SmolLM2-135M): invariants that must hold whatever the model learned."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from neuronhunter.data.batches import iter_windows
from neuronhunter.data.concepts import ConceptLabeller
from neuronhunter.data.corpus import Corpus
from neuronhunter.hunt import HuntConfig, run_hunt
from neuronhunter.judge.thresholds import VERDICTS

pytestmark = pytest.mark.integration

MAX_TOKENS = 1000


@pytest.fixture(scope="module")
def hunted(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("hunt") / "run"
    cfg = HuntConfig(out=str(out), max_tokens=MAX_TOKENS, top_k=6, formats=["parquet"])
    return run_hunt(cfg, model=embedded), out


def test_every_neuron_gets_one_verdict(hunted, embedded):
    result, out = hunted
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert len(neurons) == embedded.n_layers * embedded.d_mlp
    assert not neurons.duplicated(["layer", "neuron"]).any()
    assert set(neurons["verdict"]) <= set(VERDICTS)
    assert result.info["verdicts"] == neurons["verdict"].value_counts().reindex(VERDICTS, fill_value=0).to_dict()


def test_scores_are_in_range(hunted):
    _, out = hunted
    n = pd.read_parquet(out / "neurons.parquet")
    assert ((n.crs >= 0) & (n.crs <= 1)).all()
    k = 8  # concept categories (function and noun are controls)
    assert ((n.entropy >= -1e-9) & (n.entropy <= math.log2(k) + 1e-9)).all()
    for col in ("precision", "recall", "f1", "auprc", "p_value", "q_value"):
        v = n[col].dropna()
        assert ((v >= 0) & (v <= 1 + 1e-12)).all(), col
    assert (n.q_value.dropna() >= n.p_value[n.q_value.notna()] - 1e-15).all()  # BH never lowers a p-value
    assert set(n.direction) == {"+", "-"}  # SmolLM2's gated neurons are judged in both directions
    mono = n[n.verdict == "monosemantic"]
    poly = n[n.verdict == "polysemantic"]
    assert mono.claim_category.notna().all() and poly.claim_categories.str.contains(",").all()
    assert (mono.q_value <= 0.01).all() and (mono.precision >= 0.5).all()
    assert (n.n_categories == n.categories.map(lambda s: len(s.split(";")) if s else 0)).all()


def test_category_counts_equal_labelled_tokens(hunted, embedded):
    result, out = hunted
    labeller = ConceptLabeller(None)
    total = np.zeros(len(labeller.categories) + 1, dtype=np.int64)
    split = HuntConfig().document_split()
    for w in iter_windows(split.select(Corpus("master"), "train"), embedded.tokenizer, context_length=128,
                          bos_token_id=embedded.bos_token_id, labeller=labeller, max_tokens=MAX_TOKENS):
        lab = w.labels[1:]  # position 0 (BOS) is not counted
        total[:-1] += lab.sum(0)
        total[-1] += int((~lab.any(1)).sum())
    concepts = pd.read_parquet(out / "concepts.parquet")
    assert {"layer", "neuron", "category", "mean", "max", "count"} <= set(concepts.columns)
    per_cat = concepts.groupby("category")["count"].agg(["min", "max"])
    assert (per_cat["min"] == per_cat["max"]).all()  # the same for every neuron
    expected = dict(zip([*labeller.categories, "unlabelled"], total.tolist(), strict=True))
    assert per_cat["min"].to_dict() == expected
    assert result.info["labelled_tokens"] == expected
    assert expected["unlabelled"] + sum(v for k, v in expected.items() if k != "unlabelled") >= MAX_TOKENS


def test_champion_is_not_positional(hunted):
    result, out = hunted
    champ = result.champion
    assert champ is not None and champ["verdict"] not in ("positional", "dead")
    n = pd.read_parquet(out / "neurons.parquet")
    eligible = n[~n.verdict.isin(["positional", "dead"])]
    assert abs(champ["activation"]) == pytest.approx(float(np.fmax(eligible["max"], -eligible["min"]).max()))
    assert "[[" in champ["example"]


def test_positional_neurons_exist_and_are_excluded(hunted):
    # the embedded model has BOS "massive activation" neurons: the hunt must flag them, not crown them
    result, out = hunted
    n = pd.read_parquet(out / "neurons.parquet")
    positional = n[n.verdict == "positional"]
    assert len(positional) > 0
    bos = np.fmax(positional.first_max, -positional.first_min)
    rest = n[n.verdict != "positional"]
    assert bos.max() > np.fmax(rest["max"], -rest["min"]).max()


def test_relabelled_signs_change_only_direction(embedded):
    """Negate up_proj rows and down_proj columns of 40 neurons in two layers of the real model (the same model),
    hunt both, compare: everything but ``direction`` is equal, and it swaps for the flipped neurons."""
    import torch

    layers = [3, 9]
    rng = np.random.default_rng(0)
    flipped = {layer: sorted(rng.choice(embedded.d_mlp, size=20, replace=False).tolist()) for layer in layers}

    @torch.no_grad()
    def flip():
        for layer, idx in flipped.items():
            mlp = embedded.model.model.layers[layer].mlp
            mlp.up_proj.weight[idx] *= -1
            mlp.down_proj.weight[:, idx] *= -1

    cfg = HuntConfig(layers=layers, max_tokens=400, top_k=6)
    before = run_hunt(cfg, model=embedded, write=False).neurons
    flip()
    try:
        after = run_hunt(cfg, model=embedded, write=False).neurons
    finally:
        flip()  # exact: the shared model is restored bit for bit
    key = ["layer", "neuron"]
    a, b = before.set_index(key).sort_index(), after.set_index(key).sort_index()
    for col in ("verdict", "claim_category", "claim_categories", "claim_token", "flags", "top_tokens"):
        assert a[col].fillna("").tolist() == b[col].fillna("").tolist(), col
    for col in ("precision", "recall", "f1", "auprc", "q_value", "crs", "dprime", "peak", "threshold", "n_high"):
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-9, atol=1e-12,
                                   equal_nan=True, err_msg=col)
    is_flipped = np.array([n in flipped[layer] for layer, n in a.index])
    swap = {"+": "-", "-": "+"}
    expected = [swap[d] if f and v != "dead" else d for d, f, v in zip(a.direction, is_flipped, a.verdict,
                                                                        strict=True)]
    assert b.direction.tolist() == expected
