"""The hunt on the real embedded model (SmolLM2-135M): invariants that must hold whatever the model learned."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from neuronhunter.analysis.selectivity import VERDICTS
from neuronhunter.data.batches import iter_windows
from neuronhunter.data.concepts import ConceptLabeller
from neuronhunter.data.corpus import Corpus
from neuronhunter.hunt import HuntConfig, run_hunt

pytestmark = pytest.mark.integration

MAX_TOKENS = 1000


@pytest.fixture(scope="module")
def hunted(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("hunt") / "run"
    cfg = HuntConfig(out=str(out), max_tokens=MAX_TOKENS, top_k=2, formats=["parquet"])
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
    k = 8  # concept categories (function is the control)
    assert ((n.entropy >= -1e-9) & (n.entropy <= math.log2(k) + 1e-9)).all()
    assert ((n.pos0_share >= 0) & (n.pos0_share <= 1)).all()
    mono = n[n.verdict == "monosemantic"]
    poly = n[n.verdict == "polysemantic"]
    assert (mono.n_categories >= 1).all() and (poly.n_categories >= 2).all()
    assert (n[n.verdict == "unselective"].n_categories == 0).all()
    assert (n.n_categories == n.categories.map(lambda s: len(s.split(";")) if s else 0)).all()


def test_category_counts_equal_labelled_tokens(hunted, embedded):
    result, out = hunted
    labeller = ConceptLabeller(None)
    total = np.zeros(len(labeller.categories) + 1, dtype=np.int64)
    for w in iter_windows(Corpus("master"), embedded.tokenizer, context_length=128,
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
    assert champ["max"] == pytest.approx(float(eligible["max"].max()))
    assert "[[" in champ["example"]


def test_positional_neurons_exist_and_are_excluded(hunted):
    # the embedded model has BOS "massive activation" neurons: the hunt must flag them, not crown them
    result, out = hunted
    n = pd.read_parquet(out / "neurons.parquet")
    positional = n[n.verdict == "positional"]
    assert len(positional) > 0
    assert positional.first_max.max() > n[n.verdict != "positional"]["max"].max()
