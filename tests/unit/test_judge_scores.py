"""The judgement's scores against independent computations on raw tokens (no model).

Random activations and labels for a few neurons are binned exactly as the scan bins them (the scan's own
:class:`~neuronhunter.stats.accumulators.Histogram` and per-category histograms); the scores computed from those
histograms must equal precision, recall, F1, AUPRC and hypergeometric p-values computed directly from the tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuronhunter.config import validate
from neuronhunter.errors import ConfigError
from neuronhunter.judge.features import LayerFeatures
from neuronhunter.judge.specificity import bh_qvalues, hypergeom_sf, specificity, token_evidence
from neuronhunter.judge.thresholds import VerdictThresholds
from neuronhunter.judge.verdicts import choose_direction, crs_entropy, groups_of, related_matrix
from neuronhunter.stats.accumulators import Histogram, add_group_bins
from neuronhunter.stats.concepts import label_bits
from neuronhunter.stats.kernels import bin_index

N, D, C, NB = 4000, 4, 3, 32
LO, HI = -12.0, 12.0  # every neuron's histogram range; activations sit at bin centres (no token on an edge)


def exact_sf(k: int, total: int, good: int, draws: int) -> float:
    denom = math.comb(total, draws)
    return sum(math.comb(good, x) * math.comb(total - good, draws - x)
               for x in range(k, min(good, draws) + 1)) / denom


def test_hypergeometric_tail_is_exact():
    cases = [(0, 50, 10, 5), (3, 50, 10, 5), (5, 50, 10, 5), (6, 50, 10, 5), (12, 400, 30, 40), (1, 20, 20, 3),
             (2, 30, 0, 4), (40, 1000, 60, 50)]
    got = hypergeom_sf(*(np.array(v) for v in zip(*cases, strict=True)))
    want = [exact_sf(*c) if c[0] > 0 else 1.0 for c in cases]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)


def test_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    # sorted 0.01, 0.03, 0.04, 0.2 -> p * m / rank = 0.04, 0.06, 0.0533, 0.2 -> running min from the top
    np.testing.assert_allclose(bh_qvalues(p), [0.04, 0.0533333333, 0.0533333333, 0.2, np.nan], rtol=1e-6)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = rng.random((N, C)) < [0.05, 0.1, 0.3]
    acts = rng.normal(0, 1, (N, D))
    acts[:, 0] += 4 * labels[:, 0]  # neuron 0 fires on category 0
    acts[:, 1] -= 5 * labels[:, 1]  # neuron 1 fires on category 1, negatively
    acts[:, 2] += 6 * (labels[:, 0] & (rng.random(N) < 0.1))  # neuron 2: sparse on category 0
    width = (HI - LO) / NB
    acts = LO + (np.floor((np.clip(acts, LO, HI - 1e-9) - LO) / width) + 0.5) * width
    return acts, labels


def features(acts: np.ndarray, labels: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> LayerFeatures:
    x = torch.from_numpy(acts).float()
    hist = Histogram(D, torch.from_numpy(lo), torch.from_numpy(hi), NB)
    cat_hist = torch.zeros((C + 1, D, NB + 2), dtype=torch.int64)
    bins = bin_index(x, *hist.constants(x.device))
    hist.add_bins(bins.reshape(-1))
    add_group_bins(cat_hist, bins.reshape(N, D), label_bits(torch.from_numpy(labels)), hist.trash)
    onehot = np.concatenate([labels, ~labels.any(1, keepdims=True)], 1).astype(float)
    count = onehot.sum(0)
    mean = (onehot.T @ acts) / count[:, None]
    std = np.sqrt(np.maximum((onehot.T @ acts**2) / count[:, None] - mean**2, 0))
    k = 10
    order = np.argsort(-acts, axis=0)[:k]
    top = np.take_along_axis(acts, order, 0)
    order_b = np.argsort(acts, axis=0)[:k]
    bottom = -np.take_along_axis(acts, order_b, 0)
    zeros = np.zeros((k, D), dtype=np.int64)
    return LayerFeatures(
        layer=0, d=D, categories=["a", "b", "c"], n_tokens=N, hist=hist.counts.numpy(), lo=lo, hi=hi, n_bins=NB,
        cat_hist=cat_hist.numpy(), cat_count=count.astype(np.int64), cat_mean=mean, cat_std=std,
        mean=acts.mean(0), std=acts.std(0), max=acts.max(0), min=acts.min(0), first_mean=np.zeros(D),
        first_max=np.zeros(D), first_min=np.zeros(D), top=(top, zeros, zeros, zeros),
        bottom=(bottom, zeros, zeros, zeros), types=[],
    )


def brute_force(x: np.ndarray, labels: np.ndarray, threshold: float, qbin: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of one neuron (activation ``x`` in the direction's convention) straight from the tokens: the high set
    is ``x >= threshold``; AUPRC ranks tokens by their bin ``qbin`` (higher = stronger), ties as blocks."""
    high = x >= threshold
    hits = (labels & high[:, None]).sum(0)
    n_high, k_c = high.sum(), labels.sum(0)
    precision, recall = hits / n_high, hits / k_c
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    ap = np.zeros(labels.shape[1])
    for c in range(labels.shape[1]):
        for b in np.unique(qbin)[::-1]:
            at_or_above = qbin >= b
            new = (labels[:, c] & (qbin == b)).sum()
            ap[c] += new / k_c[c] * (labels[at_or_above, c].sum() / at_or_above.sum())
    p = [exact_sf(int(hits[c]), len(x), int(k_c[c]), int(n_high)) for c in range(labels.shape[1])]
    return {"hits": hits, "precision": precision, "recall": recall, "f1": f1, "auprc": ap, "p_value": np.array(p)}


@pytest.mark.parametrize("direction", ["+", "-"])
def test_specificity_equals_brute_force(data, direction):
    acts, labels = data
    lo, hi = np.full(D, LO), np.full(D, HI)
    feat = features(acts, labels, lo, hi)
    view = feat.view(direction)
    sp = specificity(view, N, feat.cat_count, feat.scale, floor=2.0, peak_fraction=0.5, quantile=0.02)
    sign = 1 if direction == "+" else -1
    width = (hi - lo) / NB
    for j in range(D):
        x = sign * acts[:, j]
        raw_bin = np.clip(np.floor((acts[:, j] - lo[j]) / width[j]) + 1, 0, NB + 1)
        qbin = raw_bin if direction == "+" else -raw_bin
        want = brute_force(x, labels, sp.threshold[j], qbin)
        for key in ("hits", "precision", "recall", "f1", "auprc", "p_value"):
            np.testing.assert_allclose(getattr(sp, key)[j], want[key], rtol=1e-7, atol=1e-12, err_msg=key)
        # the high set respects its three limits
        assert sp.threshold[j] >= 2.0 * feat.scale and sp.threshold[j] >= 0.5 * sp.peak[j]
        assert sp.n_high[j] <= 0.02 * N + view.counts[j].max()
    if direction == "+":
        assert sp.precision[0, 0] > 0.8 and sp.lift[0, 0] > 10 and sp.p_value[0, 0] < 1e-50
        assert sp.precision[2, 0] > 0.8 and sp.recall[2, 0] < 0.2  # sparse but specific
        assert sp.n_high[1] == 0 or sp.precision[1, 1] < 0.5  # neuron 1 fires downwards
    else:
        assert sp.precision[1, 1] > 0.8 and sp.p_value[1, 1] < 1e-50


def test_the_minus_view_is_the_mirror_image(data):
    """Scores of direction - of ``a`` equal scores of direction + of ``-a`` (binned on the mirrored range)."""
    acts, labels = data
    lo, hi = np.full(D, LO), np.full(D, HI)
    a = features(acts, labels, lo, hi)
    b = features(-acts, labels, -hi, -lo)
    sa = specificity(a.view("-"), N, a.cat_count, a.scale, floor=2.0, peak_fraction=0.5, quantile=0.02)
    sb = specificity(b.view("+"), N, b.cat_count, b.scale, floor=2.0, peak_fraction=0.5, quantile=0.02)
    for key in ("threshold", "n_high", "precision", "recall", "auprc", "p_value"):
        np.testing.assert_allclose(getattr(sa, key), getattr(sb, key), rtol=1e-12, err_msg=key)


def test_token_evidence():
    from neuronhunter.judge.features import DirectionView

    k, d = 10, 3
    types = np.array([[0] * 10, [0, 1] * 5, list(range(10))]).T  # one type / two types / ten types
    types[8:, 1] = -1  # two empty slots
    bits = np.zeros((k, d), dtype=np.int64)
    bits[:5, 2] = 0b01  # five of neuron 2's peaks are labelled category 0
    view = DirectionView("+", *([None] * 5), np.zeros((k, d)), np.zeros((k, d), dtype=np.int64), types, bits,
                         np.zeros(d), np.zeros(d))
    tk = token_evidence(view, 2)
    assert tk.n_valid.tolist() == [10, 8, 10] and tk.n_types.tolist() == [1, 2, 10]
    np.testing.assert_allclose(tk.top2_share, [1.0, 1.0, 0.2])
    assert tk.top_types[0].tolist() == [0, -1, -1] and tk.top_shares[1].tolist() == [0.5, 0.5, 0.0]
    assert tk.cat_share[2].tolist() == [0.5, 0.0] and tk.cat_types[2].tolist() == [5, 0]


def test_crs_has_a_floor_and_direction_choice_is_ordered():
    crs, ent = crs_entropy(np.array([[0.01, 0.0, 0.0], [2.0, 0.5, 0.0], [1.0, 1.0, 1.0]]), floor=0.1)
    np.testing.assert_allclose(crs, [0.0, 0.75, 0.0])  # noise-level means are not selective
    np.testing.assert_allclose(ent[2], math.log2(3))
    chosen = choose_direction({"+": np.array(["unexplained", "monosemantic", "token", "token"], dtype=object),
                               "-": np.array(["positional", "polysemantic", "token", "token"], dtype=object)},
                              {"+": np.array([1.0, 1.0, 2.0, 1.0]), "-": np.array([1.0, 5.0, 1.0, 1.0])})
    assert chosen.tolist() == ["-", "+", "+", "+"]


def test_related_groups():
    rel = related_matrix(["date", "numeric", "animal", "food"], [("date", "numeric")],
                         np.array([[10, 0, 0, 0], [0, 10, 0, 0], [0, 0, 10, 4], [0, 0, 4, 10]]), overlap=0.3)
    assert groups_of([0, 1, 2], rel) == [[0, 1], [2]]
    assert groups_of([2, 3], rel) == [[2, 3]]  # 4 shared of 10: related by label overlap


def test_threshold_config_is_validated():
    with pytest.raises(ConfigError, match="unknown key"):
        validate(VerdictThresholds, {"dprime_min": 2})
    with pytest.raises(ConfigError):
        validate(VerdictThresholds, {"related": [["date", "date"]]})
    assert VerdictThresholds().alpha == 0.01


def test_broad_class_includes_its_members(gpt2_tok):
    from neuronhunter.data.concepts import ConceptLabeller, load_lexicon

    lex = {"categories": {"animal": {"words": ["dog"]}, "food": {"words": ["bread"]},
                          "noun": {"control": True, "words": ["house"], "includes": ["animal", "food"]}}}
    lab = ConceptLabeller(lex)
    ids, labels = lab.label_text(gpt2_tok, "A dog ate bread in the house today.")
    noun = labels[:, 2]
    words = [gpt2_tok.decode([i]) for i in ids]
    assert [w for w, n in zip(words, noun, strict=True) if n] == [" dog", " bread", " house"]
    with pytest.raises(ConfigError, match="includes 'cat'"):
        load_lexicon({"categories": {"noun": {"words": ["x"], "includes": ["cat"]}}})
