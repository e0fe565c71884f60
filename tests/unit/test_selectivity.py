"""Selectivity scores and the verdict rule on hand-built neuron features (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuronhunter.analysis.selectivity import (
    NeuronFeatures,
    VerdictThresholds,
    champion,
    count_groups,
    dprime,
    related_matrix,
    score_neurons,
    top_neurons_per_category,
    topk_position_mode,
    verdict_counts,
)
from neuronhunter.config import validate
from neuronhunter.errors import ConfigError

CATS = ["animal", "food", "date", "numeric", "function"]
CONTROL = ["function"]


def features(rows: list[dict], *, counts=(50, 50, 50, 50, 200), base_count=400) -> NeuronFeatures:
    """One neuron per dict: cat_mean (list), cat_std, base_mean, base_std, max, min, first_mean, first_max,
    topk_pos_frac."""
    n, c = len(rows), len(CATS)

    def col(key, default):
        return np.array([r.get(key, default) for r in rows], dtype=np.float64)

    cat_mean = np.array([r.get("cat_mean", [0.0] * c) for r in rows], dtype=np.float64)
    cat_std = np.array([r.get("cat_std", [0.1] * c) for r in rows], dtype=np.float64)
    return NeuronFeatures(
        layer=np.array([r.get("layer", 0) for r in rows], dtype=np.int32), neuron=np.arange(n, dtype=np.int32),
        categories=list(CATS), cat_mean=cat_mean, cat_std=cat_std, cat_max=cat_mean + 1,
        cat_count=np.array(counts), base_mean=col("base_mean", 0.0), base_std=col("base_std", 0.1),
        base_count=base_count, max=col("max", 2.0), min=col("min", -0.2), std=col("std", 0.5), first_mean=col("first_mean", 0.0),
        first_max=col("first_max", 0.0), topk_pos=np.zeros(n, dtype=np.int32), topk_pos_frac=col("topk_pos_frac", 0.2),
        topk_n=np.full(n, 20, dtype=np.int32),
    )


CASES = {
    "mono": {"cat_mean": [2.0, 0.1, 0.0, 0.0, 0.0]},
    "poly": {"cat_mean": [2.0, 1.8, 0.0, 0.0, 0.0]},
    "related_pair": {"cat_mean": [0.0, 0.0, 1.9, 2.0, 0.0]},  # date + numeric: related -> one group
    "positional": {"cat_mean": [0.3, 0.0, 0.0, 0.0, 0.0], "first_mean": 5.0, "first_max": 5.0, "max": 1.0},
    "fixed_position": {"cat_mean": [2.0, 0.0, 0.0, 0.0, 0.0], "topk_pos_frac": 0.9},
    "syntactic": {"cat_mean": [0.5, 0.0, 0.0, 0.0, 1.5]},
    "dead": {"cat_mean": [-0.1] * 5, "base_mean": -0.1, "max": -0.01, "min": -0.2, "first_max": -0.05},
    "unselective": {"cat_mean": [0.12, 0.1, 0.11, 0.1, 0.1], "base_mean": 0.1},
    "bos_spike_but_strong": {"cat_mean": [2.0, 0.0, 0.0, 0.0, 0.0], "first_mean": 3.0, "first_max": 3.0, "max": 12.0},
}
EXPECTED = {"mono": "monosemantic", "poly": "polysemantic", "related_pair": "monosemantic",
            "positional": "positional", "fixed_position": "positional", "syntactic": "syntactic", "dead": "dead",
            "unselective": "unselective", "bos_spike_but_strong": "monosemantic"}


@pytest.fixture(scope="module")
def scored():
    names = list(CASES)
    return names, score_neurons(features([CASES[k] for k in names]), CONTROL)


def test_every_rule(scored):
    names, s = scored
    assert dict(zip(names, s.frame["verdict"], strict=True)) == EXPECTED


def test_scores_follow_their_formulas(scored):
    names, s = scored
    f = s.frame.set_index(pd_index(names))
    # CRS over concept categories only (function excluded): (2.0 - 0.1) / 2.0
    assert f.loc["mono", "crs"] == pytest.approx(0.95)
    assert f.loc["poly", "crs"] == pytest.approx((2.0 - 1.8) / 2.0)
    # d' of the top category vs unlabelled: (2 - 0) / sqrt((0.1^2 + 0.1^2) / 2)
    assert f.loc["mono", "dprime"] == pytest.approx(20.0, rel=1e-6)
    # entropy (bits) of the positive mass over the 4 concept categories
    p = np.array([2.0, 0.1]) / 2.1
    assert f.loc["mono", "entropy"] == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert f.loc["unselective", "entropy"] == pytest.approx(
        float(-(q := np.array([0.12, 0.1, 0.11, 0.1]) / 0.43) @ np.log2(q)))
    assert f.loc["poly", "categories"] == "animal;food" and f.loc["poly", "n_categories"] == 2
    assert f.loc["related_pair", "categories"] == "numeric;date"
    assert f.loc["mono", "top_category"] == "animal" and f.loc["mono", "second_category"] == "food"
    # position-0 share: f+ / (f+ + peak+) = 5 / (5 + 0.3); max share 5 / (5 + 1)
    assert f.loc["positional", "pos0_share"] == pytest.approx(5 / 5.3)
    assert f.loc["positional", "pos0_max_share"] == pytest.approx(5 / 6)
    assert f.loc["syntactic", "control_dprime"] == pytest.approx(15.0)
    assert ((s.frame["crs"] >= 0) & (s.frame["crs"] <= 1)).all()


def pd_index(names):
    import pandas as pd

    return pd.Index(names, name="case")


def test_dprime_formula():
    assert dprime(np.array(3.0), np.array(1.0), np.array(1.0), np.array(1.0)) == pytest.approx(2.0)
    # zero spread on both sides: finite thanks to eps
    assert math.isfinite(float(dprime(np.array(1.0), np.array(0.0), np.array(0.0), np.array(0.0))))


def test_thresholds_change_verdicts():
    row = {"cat_mean": [2.0, 1.2, 0.0, 0.0, 0.0]}
    strict = score_neurons(features([row]), CONTROL).frame.verdict[0]
    loose = score_neurons(features([row]), CONTROL, VerdictThresholds(co_response=0.7)).frame.verdict[0]
    assert (strict, loose) == ("polysemantic", "monosemantic")
    high = score_neurons(features([CASES["mono"]]), CONTROL, VerdictThresholds(dprime_min=50)).frame.verdict[0]
    assert high == "unselective"
    no_rel = score_neurons(features([CASES["related_pair"]]), CONTROL, VerdictThresholds(related=[])).frame
    assert no_rel.verdict[0] == "polysemantic"


def test_cooccurrence_relates_overlapping_categories():
    row = {"cat_mean": [2.0, 1.9, 0.0, 0.0, 0.0]}
    co = np.diag([50, 50, 50, 50, 200])
    co[0, 1] = co[1, 0] = 20  # 20 / min(50, 50) = 0.4 >= 0.3
    assert score_neurons(features([row]), CONTROL, cooccurrence=co).frame.verdict[0] == "monosemantic"
    co[0, 1] = co[1, 0] = 5  # 0.1 < 0.3
    assert score_neurons(features([row]), CONTROL, cooccurrence=co).frame.verdict[0] == "polysemantic"


def test_rare_categories_are_not_scored():
    row = {"cat_mean": [2.0, 1.9, 0.0, 0.0, 0.0]}
    f = features([row], counts=(50, 3, 50, 50, 200))
    out = score_neurons(f, CONTROL).frame
    assert out.verdict[0] == "monosemantic" and out.categories[0] == "animal"


def test_related_matrix_and_groups():
    rel = related_matrix(["a", "b", "c", "d"], [("a", "b"), ("b", "c"), ("x", "a")])
    assert rel[0, 1] and rel[1, 2] and not rel[0, 2] and rel.trace() == 4
    # a and c are related only through b, which is not a member: {a}, {c}, {d}
    assert count_groups(np.array([True, False, True, True]), rel) == 3
    assert count_groups(np.array([True, True, True, False]), rel) == 1  # a-b-c chain
    assert count_groups(np.zeros(4, dtype=bool), rel) == 0


def test_topk_position_mode():
    pos = torch.tensor([[3, 1], [3, 2], [3, 4], [7, 0]], dtype=torch.int32)
    window = torch.tensor([[0, 0], [1, 1], [2, -1], [3, -1]])
    mode, share, n = topk_position_mode(pos, window)
    assert mode[0] == 3 and share[0] == pytest.approx(0.75) and n.tolist() == [4, 2]
    assert share[1] == pytest.approx(0.5)


def test_champion_skips_positional_and_dead(scored):
    import pandas as pd

    names, s = scored
    neurons = pd.DataFrame({"layer": s.frame.layer, "neuron": s.frame.neuron,
                            "max": [features([CASES[k]]).max[0] for k in names]})
    neurons.loc[names.index("positional"), "max"] = 100.0
    champ = champion(s.frame, neurons)
    assert champ["verdict"] not in ("positional", "dead")
    assert names[int(champ["neuron"])] == "bos_spike_but_strong"  # max 12, the largest that is not positional


def test_top_neurons_and_counts(scored):
    names, s = scored
    top = top_neurons_per_category(s, n=2)
    animal_mono = top[(top.category == "animal") & (top.kind == "monosemantic")]
    # mono (d' 20), fixed_position is positional, bos_spike (d' 20): both d' 20, stable order keeps mono first
    assert animal_mono.neuron.tolist() == [names.index("mono"), names.index("bos_spike_but_strong")]
    assert top[(top.category == "food") & (top.kind == "polysemantic")].neuron.tolist() == [names.index("poly")]
    assert "function" not in set(top.category)
    counts = verdict_counts(s.frame)
    assert counts.loc["total"].sum() == len(names)
    assert counts.loc["total", "monosemantic"] == 3 and counts.loc["total", "positional"] == 2


def test_threshold_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key"):
        validate(VerdictThresholds, {"dprime_minimum": 2})
    with pytest.raises(ConfigError):
        validate(VerdictThresholds, {"related": [["date", "date"]]})
