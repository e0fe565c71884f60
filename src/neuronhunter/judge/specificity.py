"""Specific selectivity: "when this neuron fires strongly, what is it firing on?" — per direction, from histograms.

For one direction ``s`` of a neuron (activation ``x = s * a``) the scan's histograms (per neuron, and per concept
category on the same bins) give, for every bin edge ``t``, how many counted tokens, and how many of each category,
have ``x >= t``. With ``N`` counted tokens, ``K_c`` tokens of category ``c`` and the layer's activation scale
``S`` (median over the layer's neurons of their standard deviation):

* **peak** ``P``: the median of the neuron's top-k window peaks in this direction (its typical strong value);
* **high set** ``H``: the whole histogram bins, from the extreme inwards, whose inner edge is at least

      t_min = max(floor * S, peak_fraction * P)

  and that start before ``ceil(high_quantile * N)`` tokens have been taken (so ``H`` is at most about the top
  ``high_quantile`` of the tokens, and never reaches into noise below the floor or below half the typical peak);
  ``threshold`` is the smallest inner edge taken, ``n_high = |H|``;
* per category: ``hits_c = |H ∩ c|``, **precision** ``hits_c / n_high``, **recall** ``hits_c / K_c``, **F1**
  (their harmonic mean), **lift** ``precision / (K_c / N)``, and the **hypergeometric p-value**
  ``P(X >= hits_c)`` for ``X ~ Hypergeometric(N, K_c, n_high)`` (drawing ``|H|`` tokens at random, how often do
  this many fall in ``c``?);
* **AUPRC** of category ``c`` with tokens ranked by ``x`` (bins as tied blocks), the step-wise average precision
  ``sum_b (hits_c[b] / K_c) * precision(x >= inner edge of b)``; a random ranking scores the base rate ``K_c / N``.

For a category that a broad class includes (``noun`` includes ``animal``) the same test is run *inside* the class:
precision ``hits_c / hits_class`` against the base rate ``K_c / K_class`` (``lift_in``, ``p_in``), the baseline
matched to the claim: a neuron that fires on nouns in general shows no animal specificity inside the nouns.

NeuronEval (Oikarinen et al. 2025) found F1, IoU, AUPRC, correlation and cosine pass its sanity checks for such
scores; precision and lift are reported because a sparse but specific neuron (it fires on a tenth of the colour
words and nowhere else) has high precision and low recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .features import DirectionView


def hypergeom_sf(k: np.ndarray, total: np.ndarray, good: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``P(X >= k)`` for ``X ~ Hypergeometric(total, good, draws)``, element-wise (broadcast), exact summation of
    the upper tail in log space (no scipy). Entries with ``k <= 0`` give 1; impossible ``k`` give 0."""
    k, total, good, draws = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (k, total, good, draws)))
    out = np.ones(k.shape)
    hi = np.minimum(good, draws)
    lo = np.maximum(0.0, good + draws - total)
    todo = (k > lo) & (k <= hi) & (total > 0)
    out[(k > hi) & (k > 0)] = 0.0
    if not todo.any():
        return out
    kk, nn, gg, dd, hh = (v[todo] for v in (k, total, good, draws, hi))
    lg = torch.lgamma

    def lchoose(n: np.ndarray, r: np.ndarray) -> torch.Tensor:
        n_t, r_t = torch.from_numpy(n), torch.from_numpy(r)
        return lg(n_t + 1) - lg(r_t + 1) - lg(n_t - r_t + 1)

    log_term = (lchoose(gg, kk) + lchoose(nn - gg, dd - kk) - lchoose(nn, dd)).numpy()  # log pmf(k)
    total_log = log_term.copy()
    x = kk.copy()
    active = x < hh
    while active.any():
        # pmf(x + 1) / pmf(x) = (good - x)(draws - x) / ((x + 1)(total - good - draws + x + 1))
        ratio = (gg - x) * (dd - x) / ((x + 1) * (nn - gg - dd + x + 1))
        with np.errstate(divide="ignore"):
            log_term = np.where(active, log_term + np.log(np.where(active, ratio, 1.0)), log_term)
        total_log = np.where(active, np.logaddexp(total_log, log_term), total_log)
        x = x + 1
        # stop once past the end or once terms no longer change the sum (past the mode they only shrink)
        active = active & (x < hh) & (log_term - total_log > -40.0)
    out[todo] = np.minimum(np.exp(total_log), 1.0)
    return out


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of a flat array of p-values (NaN entries are left out and stay NaN)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    vals = p[ok]
    order = np.argsort(vals, kind="stable")
    ranked = vals[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


@dataclass
class Specificity:
    """Per-direction scores of one layer: ``[d]`` per neuron, ``[d, C]`` per neuron and category (the unlabelled
    row dropped). ``p_in``/``lift_in`` are NaN for categories no broad class includes."""

    peak: np.ndarray
    threshold: np.ndarray
    n_high: np.ndarray
    hits: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    lift: np.ndarray
    auprc: np.ndarray
    p_value: np.ndarray
    lift_in: np.ndarray
    p_in: np.ndarray
    unlabelled_precision: np.ndarray  # [d] share of the high set with no label at all


def peak_value(top_values: np.ndarray) -> np.ndarray:
    """``[d]`` median of the valid top-k peaks (NaN where there is none)."""
    valid = np.isfinite(top_values)
    n = valid.sum(0)
    out = np.full(top_values.shape[1], np.nan)
    has = n > 0
    if has.any():
        out[has] = np.nanmedian(top_values[:, has], axis=0)
    return out


def high_set(view: DirectionView, n_tokens: int, t_min: np.ndarray, quantile: float) -> np.ndarray:
    """Bool ``[d, B]``: the bins of the high set (module docstring)."""
    target = math.ceil(quantile * n_tokens)
    before = np.cumsum(view.counts, axis=1) - view.counts  # tokens in the bins before each bin
    return (view.edges >= t_min[:, None]) & (before < target) & (view.counts > 0)


def specificity(view: DirectionView, n_tokens: int, cat_count: np.ndarray, scale: float, *, floor: float,
                peak_fraction: float, quantile: float, broad: dict[int, list[int]] | None = None) -> Specificity:
    """Scores of one direction of one layer's neurons (see the module docstring).

    Args:
        view: the layer's statistics in this direction.
        n_tokens: counted tokens ``N``.
        cat_count: ``[C+1]`` tokens per category (last: unlabelled).
        scale: the layer's activation scale ``S``.
        floor, peak_fraction, quantile: the high-set thresholds.
        broad: ``{class index: [member category indices]}`` of broad classes (the within-class test).
    """
    peak = peak_value(view.top_values)
    t_min = np.fmax(floor * scale, peak_fraction * np.nan_to_num(peak, nan=0.0))
    mask = high_set(view, n_tokens, t_min, quantile)  # [d, B]
    n_high = (view.counts * mask).sum(1)  # [d]
    cats = view.cat_counts[:-1]  # [C, d, B]
    hits = (cats * mask[None]).sum(2).T.astype(np.float64)  # [d, C]
    unlabelled = (view.cat_counts[-1] * mask).sum(1).astype(np.float64)
    k_c = cat_count[:-1].astype(np.float64)[None, :]
    n_h = n_high.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_h > 0, hits / n_h, 0.0)
        recall = np.where(k_c > 0, hits / np.maximum(k_c, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        base = k_c / max(n_tokens, 1)
        lift = np.where(base > 0, precision / np.where(base > 0, base, 1), 0.0)
    p_value = hypergeom_sf(hits, n_tokens, k_c, n_h)
    threshold = np.where(mask.any(1), np.where(mask, view.edges, np.inf).min(1), np.nan)

    # AUPRC: bins from the extreme inwards as tied blocks
    cum_n = np.cumsum(view.counts, axis=1).astype(np.float64)  # [d, B]
    cum_hits = np.cumsum(cats, axis=2).astype(np.float64)  # [C, d, B]
    with np.errstate(divide="ignore", invalid="ignore"):
        prec_at = np.where(cum_n[None] > 0, cum_hits / np.maximum(cum_n[None], 1), 0.0)
        auprc = (cats * prec_at).sum(2).T / np.maximum(k_c, 1)  # [d, C]
    auprc = np.where(k_c > 0, auprc, 0.0)

    lift_in = np.full(hits.shape, np.nan)
    p_in = np.full(hits.shape, np.nan)
    for cls, members in (broad or {}).items():
        k_cls = float(cat_count[cls])
        h_cls = hits[:, cls]
        for m in members:
            with np.errstate(divide="ignore", invalid="ignore"):
                prec_in = np.where(h_cls > 0, hits[:, m] / np.maximum(h_cls, 1), 0.0)
                base_in = float(cat_count[m]) / k_cls if k_cls > 0 else 0.0
                lift_m = prec_in / base_in if base_in > 0 else np.zeros_like(prec_in)
            p_m = hypergeom_sf(hits[:, m], k_cls, float(cat_count[m]), h_cls)
            # a category in several broad classes must pass inside each: keep the weakest evidence
            lift_in[:, m] = np.fmin(lift_in[:, m], lift_m) if np.isfinite(lift_in[:, m]).any() else lift_m
            p_in[:, m] = np.fmax(p_in[:, m], p_m) if np.isfinite(p_in[:, m]).any() else p_m
    unl_prec = np.where(n_high > 0, unlabelled / np.maximum(n_high, 1), 0.0)
    return Specificity(peak=peak, threshold=threshold, n_high=n_high, hits=hits, precision=precision,
                       recall=recall, f1=f1, lift=lift, auprc=auprc, p_value=p_value, lift_in=lift_in, p_in=p_in,
                       unlabelled_precision=unl_prec)


@dataclass
class TokenEvidence:
    """Word-type evidence from the peak tokens of the top-k windows of one direction (``[d]`` / ``[d, C]``).

    Attributes:
        n_valid: valid top-k entries.
        n_types: distinct word types among them.
        top2_share: share of the entries whose type is one of the two most common.
        top_types: ``[d, 3]`` indices of the three most common types (-1 where fewer).
        top_shares: ``[d, 3]`` their shares.
        top_bits: ``[d, 3]`` the label bits of each of them (at its first top-k entry; bit ``C``: unlabelled).
        cat_share: ``[d, C]`` share of the entries whose peak token is labelled with each category.
        cat_types: ``[d, C]`` distinct word types among the entries labelled with each category.
    """

    n_valid: np.ndarray
    n_types: np.ndarray
    top2_share: np.ndarray
    top_types: np.ndarray
    top_shares: np.ndarray
    top_bits: np.ndarray
    cat_share: np.ndarray
    cat_types: np.ndarray


def _distinct(types: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[d]`` number of distinct values of ``types [k, d]`` where ``mask``."""
    t = np.sort(np.where(mask, types, -1), axis=0)
    first = (t[:1] >= 0).sum(0)
    changes = ((t[1:] != t[:-1]) & (t[1:] >= 0)).sum(0)
    return first + changes


def token_evidence(view: DirectionView, n_categories: int) -> TokenEvidence:
    """Word-type evidence of one direction (see :class:`TokenEvidence`)."""
    types, bits = view.top_type, view.top_bits  # [k, d]
    valid = types >= 0
    n_valid = valid.sum(0)
    n_types = _distinct(types, valid)
    same = (types[:, None, :] == types[None, :, :]) & valid[:, None, :] & valid[None, :, :]  # [k, k, d]
    count = same.sum(1)  # [k, d]: how often entry i's type occurs
    k = types.shape[0]
    earlier = np.tril(np.ones((k, k), dtype=bool), -1)  # earlier[i, j]: j < i
    first = valid & ~(same & earlier[:, :, None]).any(1)  # first occurrence of each type
    per_type = np.where(first, count, 0)  # [k, d]
    order = np.argsort(-per_type, axis=0, kind="stable")[:3]  # [3, d]
    top_counts = np.take_along_axis(per_type, order, axis=0)
    top_types = np.where(top_counts > 0, np.take_along_axis(types, order, axis=0), -1).T
    top_bits = np.where(top_counts > 0, np.take_along_axis(bits, order, axis=0), 0).T
    denom = np.maximum(n_valid, 1)
    top_shares = (top_counts / denom).T
    top2_share = top_counts[:2].sum(0) / denom
    cat_share = np.zeros((types.shape[1], n_categories))
    cat_types = np.zeros((types.shape[1], n_categories), dtype=np.int64)
    for c in range(n_categories):
        has = valid & (((bits >> c) & 1) == 1)
        cat_share[:, c] = has.sum(0) / denom
        cat_types[:, c] = _distinct(types, has)
    return TokenEvidence(n_valid=n_valid, n_types=n_types, top2_share=top2_share, top_types=top_types,
                         top_shares=top_shares, top_bits=top_bits, cat_share=cat_share, cat_types=cat_types)
