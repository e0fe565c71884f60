"""The steering check: a second, independent test of a claim, by *adding* to a neuron instead of removing it.

Ablation asks whether the model needs the neuron on the claimed tokens. Steering asks whether switching the
neuron on makes the model predict what the neuron is said to predict. For a claim about neuron ``n`` in
direction ``d``:

* **The intervention.** At ``steer_tokens`` verification tokens drawn at random (the same ones for every claim of
  a layer; not the claim's own tokens: the question is what the neuron's output does wherever it is switched on),
  the activation is raised in direction ``d`` by its high quantile: ``a -> a + d * q`` with
  ``q = quantile_0.99(d * (a - mu))`` over the verification tokens.
* **The predictions** (fixed before steering, from weights and the claim alone):

  - ``logit``: the ``k`` tokens the neuron's direct logit attribution promotes most in direction ``d``
    (:func:`~neuronhunter.analysis.attribution.direct_logit_weights`): does that prediction survive the rest of the
    network?
  - ``claim``: the tokens the claim names (its categories' lexicon words, its token set) read as outputs: what an
    explanation predicts when it means "this neuron says X next". Concept neurons often *detect* a concept without
    predicting it, so this one fails honestly for detectors.

* **The statistic**: the mean change, over the steered tokens, of ``log P(set)`` of the next-token distribution.
* **The null**: ``n_sets`` random token sets of the same size whose tokens are matched one for one on clean
  log-probability (each token replaced by a random token among its ``match_window`` neighbours in the ranking of
  mean clean log-probability at the steered tokens), read out from the very same steered passes.
  ``p = (1 + #{null sets changing as much}) / (n_sets + 1)``. A perturbation that raises every token of similar
  prior probability does not pass; only one that raises the predicted tokens in particular does.

The readouts cost nothing beyond one steered pass per claim and token, and one clean pass per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .nulls import rank_p


def high_quantile(values: np.ndarray, mean: float, sign: float, quantile: float) -> float:
    """``quantile(sign * (a - mu))`` over the verification tokens (floored at 0)."""
    return max(float(np.quantile(sign * (values - mean), quantile)), 0.0)


def matched_sets(target: np.ndarray, order_rank: np.ndarray, ranked: np.ndarray, n_sets: int, window: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``[n_sets, len(target)]`` random token sets, each token drawn among the ``window`` tokens on either side of
    the target token in a ranking of the vocabulary (``ranked``: token ids in rank order; ``order_rank``: the rank
    of each token id)."""
    r = order_rank[target]  # [k]
    off = rng.integers(-window, window + 1, size=(n_sets, len(target)))
    off[off == 0] = window + 1  # never the target token itself
    pos = np.clip(r[None, :] + off, 0, len(ranked) - 1)
    return ranked[pos]


@dataclass
class SteerTest:
    """One claim's steering readout sets: its prediction (row 0) and matched null sets (rows 1..)."""

    name: str  # "logit" or "claim"
    sets: np.ndarray  # [1 + n_sets, k]


def set_logp(logp: Tensor, sets: np.ndarray) -> Tensor:
    """``log sum_{v in set} p(v)``: ``[b, n_sets]`` from log-probabilities ``[b, vocab]`` and sets ``[n_sets, k]``."""
    idx = torch.as_tensor(sets, dtype=torch.long)
    return torch.logsumexp(logp[:, idx], -1)


def clean_ranking(clean_logp: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary ranked by mean clean log-probability at the steered tokens: ``(ranked ids, rank of each id)``."""
    score = clean_logp.mean(0).cpu().numpy()
    ranked = np.argsort(-score, kind="stable")
    rank = np.empty_like(ranked)
    rank[ranked] = np.arange(len(ranked))
    return ranked, rank


def steer_statistics(steered: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """``(effect, p)`` from set log-probabilities ``[positions, 1 + n_sets]`` steered and clean: the prediction's
    mean change and its rank among the matched null sets."""
    change = (steered - clean).mean(0)
    return float(change[0]), rank_p(float(change[0]), change[1:])
