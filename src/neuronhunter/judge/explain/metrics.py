"""Scores of rule-based explanations from the held-out sufficient statistics (:mod:`.scoring`).

For an explanation of neuron ``n`` in direction ``s`` with features ``j`` (disjoint: a token has at most one) and
weights ``w_j``, on ``N`` held-out tokens with activation ``a``:

* **simulation r**: Pearson's correlation of the prediction ``x`` (``w_j`` where feature ``j`` holds, else 0) with
  ``s a``: ``Σx = Σ_j w_j N_j``, ``Σx² = Σ_j w_j² N_j``, ``Σx·sa = s Σ_j w_j A_j`` with ``N_j`` the tokens where
  ``j`` holds and ``A_j`` the sum of ``a`` over them.
* **detection** of the neuron's *high* tokens by the predicate "some feature holds": F1, balanced accuracy
  ``(TPR + TNR) / 2``, precision, recall, and the average precision (AUPRC) of the graded prediction (the features
  in descending weight are the thresholds; the tokens no feature covers come last, all tied, at the base rate).
* **hard-negative accuracy**: balanced accuracy of the predicate on the high tokens against the hard negatives
  (the neuron's top tokens where it is silent): ``(TPR + (1 - covered hard negatives / hard negatives)) / 2``.
  A token-set explanation of a context-dependent neuron covers all its hard negatives and scores at most 0.5.

Undefined scores (no high token, no variance, no hard negative) are NaN.
"""

from __future__ import annotations

import numpy as np

from .candidates import LayerCandidates
from .scoring import LayerScorer

SCORE_COLUMNS = ("simulation_r", "detection_f1", "detection_auprc", "detection_balanced_accuracy",
                 "detection_precision", "detection_recall", "hard_negative_accuracy", "n_heldout_tokens",
                 "n_high", "n_hard_negatives", "n_covered")


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def layer_scores(lc: LayerCandidates, scorer: LayerScorer, feature_counts: np.ndarray,
                 folds: tuple[int, ...] = (0, 1)) -> dict[str, np.ndarray]:
    """Scores of every candidate of a layer on the given held-out folds.

    Args:
        feature_counts: ``[2, n_features]`` tokens per feature and fold.
    """
    f = list(folds)
    n = float(scorer.count[f].sum())
    s1, high, hard = (x.numpy() for x in scorer.neuron_totals(f))
    s2 = scorer.sumsq[f].sum(0).numpy()
    nc = len(lc.neuron)
    present = lc.pair >= 0
    pair = np.where(present, lc.pair, 0)
    feat = np.where(present, lc.feature, 0)
    w = np.where(present, lc.weight, 0.0)
    cnt = np.where(present, feature_counts[f].sum(0)[feat], 0).astype(np.float64)
    psum = np.where(present, scorer.sum[f].sum(0).numpy()[pair], 0.0)
    ptp = np.where(present, scorer.high_count[f].sum(0).numpy()[pair], 0).astype(np.float64)
    phn = np.where(present, scorer.hard_count[f].sum(0).numpy()[pair], 0).astype(np.float64)
    sign = np.where(lc.direction == 0, 1.0, -1.0)
    neuron, direction = lc.neuron, lc.direction
    out: dict[str, np.ndarray] = {}
    sx, sxx = (w * cnt).sum(1), (w * w * cnt).sum(1)
    sxa = sign * (w * psum).sum(1)
    mean_a = sign * s1[neuron] / max(n, 1)
    var_a = s2[neuron] / max(n, 1) - (s1[neuron] / max(n, 1)) ** 2
    mean_x = sx / max(n, 1)
    var_x = sxx / max(n, 1) - mean_x**2
    cov = sxa / max(n, 1) - mean_x * mean_a
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where((var_x > 1e-12) & (var_a > 1e-12), cov / np.sqrt(np.maximum(var_x * var_a, 1e-300)), np.nan)
    out["simulation_r"] = np.clip(r, -1.0, 1.0)
    n_pos = high[direction, neuron]
    n_hn = hard[direction, neuron]
    n_pred, tp, hn = cnt.sum(1), ptp.sum(1), phn.sum(1)
    fp, fn = n_pred - tp, n_pos - tp
    tn = n - n_pos - fp
    out["detection_f1"] = _div(2 * tp, (2 * tp + fp + fn) * (n_pos > 0))
    tpr, tnr = _div(tp, n_pos), _div(tn, n - n_pos)
    out["detection_balanced_accuracy"] = (tpr + tnr) / 2
    out["detection_precision"] = _div(tp, n_pred)
    out["detection_recall"] = tpr
    # average precision of the graded prediction: one threshold per distinct weight (features in descending
    # weight; equal weights are one threshold), then every other token at score 0 (recall 1, base-rate precision)
    ctp, cpred = np.cumsum(ptp, 1), np.cumsum(cnt, 1)
    nxt_w = np.concatenate([w[:, 1:], np.full((nc, 1), -np.inf)], 1)
    nxt_present = np.concatenate([present[:, 1:], np.zeros((nc, 1), dtype=bool)], 1)
    is_end = present & ~(nxt_present & (nxt_w == w))
    ap, last = np.zeros(nc), np.zeros(nc)
    for k in range(w.shape[1]):
        rec_k = np.nan_to_num(_div(ctp[:, k], n_pos))
        prec_k = np.nan_to_num(_div(ctp[:, k], cpred[:, k]))
        end = is_end[:, k]
        ap += np.where(end, (rec_k - last) * prec_k, 0.0)
        last = np.where(end, rec_k, last)
    ap += (1 - last) * n_pos / max(n, 1)
    out["detection_auprc"] = np.where(n_pos > 0, ap, np.nan)
    out["hard_negative_accuracy"] = (tpr + (1 - _div(hn, n_hn))) / 2
    out["n_heldout_tokens"] = np.full(nc, int(n), dtype=np.int64)
    out["n_high"] = n_pos.astype(np.int64)
    out["n_hard_negatives"] = n_hn.astype(np.int64)
    out["n_covered"] = n_pred.astype(np.int64)
    return out
