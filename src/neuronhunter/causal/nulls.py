"""Matched nulls, empirical p-values and Benjamini–Hochberg q-values for causal claims.

A claim "neuron ``n`` of layer ``L`` drives the next-token loss on tokens ``C``" is tested by mean-ablating ``n``
at each token ``t`` of ``C`` alone and measuring the loss change ``e_n(t)`` there. Any perturbation of the residual
stream tends to raise the loss, and a neuron selected *because* it deviates most on ``C`` perturbs the residual
most there, so the raw effect proves nothing by itself. Two nulls remove that confound; both perturb the residual
stream by as much as the claim does:

* **Neuron null** (is the *neuron* special?). Downstream layers see a neuron only through what it writes to the
  residual stream, so each null writes a vector of **exactly the claim's norm at each token** (pre-norm blocks; for
  post-norm blocks the norm through the linear part of the post-norm, :mod:`neuronhunter.analysis.attribution`),
  only in its own direction. The ``n_nulls`` other neurons of the layer whose mean perturbation
  on ``C`` is closest to the claim's (in log scale), each moved at every token ``t`` of ``C`` towards its own mean
  by ``|delta_n(t)| / |w_j|`` (the claim's perturbation norm ``delta_n(t) = |mu_n - a_n(t)| * |w_n|`` divided by
  the null's write norm). Neurons that carry a claim about an overlapping category are excluded.
  ``p_neuron = (1 + #{nulls with mean effect >= the claim's}) / (n_nulls + 1)``.
* **Token null** (are the *tokens* special?). For each claim token ``t``, the ``k`` tokens outside the claim whose
  deviation ``a_n(u) - mu_n`` is closest to ``a_n(t) - mu_n`` form a stratum, and the neuron is mean-ablated at each
  of them as at the claim tokens. A selective neuron rarely deviates as much off its category, so the statistic is
  the effect *per unit* of perturbation, ``sum(effects) / sum(delta)``. Under the null hypothesis the claim token is
  exchangeable with its stratum; a stratified permutation test (one token drawn from each stratum, ``n_draws``
  Monte-Carlo draws) gives ``p_token``.

A claim's p-value is ``max(p_neuron, p_token)`` (valid for the union of the two null hypotheses: it must beat
both). Benjamini–Hochberg q-values across all claims of a run control the false discovery rate; a claim is
*confirmed* at ``q <= alpha``. A claim whose neuron does not perturb the residual stream at its tokens (zero write
or no deviation from the mean) gets ``p = 1``: there is nothing to test.

Effects are reported raw (mean nats of next-token loss per ablated token) and per unit of perturbation
(divided by the mean residual perturbation norm ``mean_t delta_n(t)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TINY = 1e-12


def perturbation_norms(acts: np.ndarray, means: np.ndarray, write_norms: np.ndarray) -> np.ndarray:
    """``delta[i, j] = |mu_j - a_j(t_i)| * |w_j|``: the residual-stream norm mean ablation of neuron ``j`` adds at
    token ``t_i`` (``acts``: ``[n, d]``, ``means`` and ``write_norms``: ``[d]``)."""
    return np.abs(means[None, :] - acts) * write_norms[None, :]


def match_neurons(sizes: np.ndarray, claim: int, n_nulls: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """The ``n_nulls`` neurons (not ``claim``, not ``exclude``, not zero-size) whose ``sizes`` are closest to the
    claim's in log scale; ties go to the lower index."""
    ok = sizes > TINY
    ok[claim] = False
    ok[list(exclude)] = False
    cand = np.flatnonzero(ok)
    if sizes[claim] <= TINY or not len(cand):
        return np.zeros(0, dtype=np.int64)
    dist = np.abs(np.log(sizes[cand]) - np.log(sizes[claim]))
    return cand[np.argsort(dist, kind="stable")[:n_nulls]].astype(np.int64)


def null_values(acts: np.ndarray, means: np.ndarray, write_norms: np.ndarray, claim_delta: np.ndarray,
                nulls: np.ndarray) -> np.ndarray:
    """Values ``[c, J]`` that move each null neuron at each claim token towards its mean by exactly the claim's
    perturbation norm ``claim_delta`` ``[c]`` (``acts``: ``[c, d]`` at the claim tokens)."""
    a = acts[:, nulls]
    step = np.sign(means[nulls][None, :] - a)
    step[step == 0] = 1.0
    return a + step * claim_delta[:, None] / np.maximum(write_norms[nulls][None, :], TINY)


def match_tokens(deviation: np.ndarray, claim_tokens: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Strata ``[c, k]``: for each claim token, ``k`` candidate tokens whose ``deviation`` (``a_n - mu_n``, over all
    verification tokens) is closest to its own, each candidate used once (claim tokens with the largest |deviation|
    choose first). Unfilled places are -1 (fewer candidates than ``c * k``)."""
    out = np.full((len(claim_tokens), k), -1, dtype=np.int64)
    if not len(candidates) or k < 1:
        return out
    cand = np.asarray(candidates, dtype=np.int64)
    vals = deviation[cand]
    free = np.ones(len(cand), dtype=bool)
    # claim tokens with the largest |deviation| choose first; each takes the k free candidates nearest to its own
    # deviation, equal distances going to the lower token index: the same strata for a neuron and its negation
    for i in np.lexsort((claim_tokens, -np.abs(deviation[claim_tokens]))):
        m = min(k, int(free.sum()))
        if m == 0:
            break
        dist = np.where(free, np.abs(vals - deviation[claim_tokens[i]]), np.inf)
        near = np.flatnonzero(dist <= np.partition(dist, m - 1)[m - 1])
        near = near[np.lexsort((cand[near], dist[near]))][:m]
        free[near] = False
        out[i, :m] = cand[near]
    return out


def rank_p(observed: float, null: np.ndarray) -> float:
    """Empirical one-sided p-value ``(1 + #{null >= observed}) / (n + 1)`` (1.0 without nulls)."""
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or not len(null):
        return 1.0
    return float((1 + np.sum(null >= observed)) / (len(null) + 1))


def stratified_p(claim_effects: np.ndarray, claim_sizes: np.ndarray, strata_effects: np.ndarray,
                 strata_sizes: np.ndarray, n_draws: int, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Stratified permutation test of the effect per unit of perturbation, ``sum(effects) / sum(sizes)``.

    Args:
        claim_effects, claim_sizes: ``[c]`` effect and perturbation norm at each claim token.
        strata_effects, strata_sizes: ``[c, k]`` the same at each token of each claim token's stratum (NaN = an
            empty place).
        n_draws: Monte-Carlo draws; each takes, from every stratum, one of its claim token and its filled places
            uniformly.

    Returns:
        ``(p, draws)``: ``p = (1 + #{draw >= observed}) / (n_draws + 1)`` and the drawn statistics.
    """
    c = len(claim_effects)
    if c == 0:
        return 1.0, np.zeros(0)
    eff = np.concatenate([claim_effects[:, None], strata_effects], 1)  # [c, 1 + k]
    size = np.concatenate([claim_sizes[:, None], strata_sizes], 1)
    filled = np.isfinite(eff) & np.isfinite(size)
    counts = filled.sum(1)
    if np.all(counts <= 1):
        return 1.0, np.zeros(0)
    cols = np.argsort(~filled, axis=1, kind="stable")  # the filled places first (the claim token is place 0)
    pick = np.floor(rng.random((n_draws, c)) * counts[None, :]).astype(np.int64)
    rows = np.arange(c)[None, :]
    chosen = cols[rows, pick]
    total = size[rows, chosen].sum(1)
    draws = np.where(total > TINY, eff[rows, chosen].sum(1) / np.maximum(total, TINY), np.nan)
    observed = float(claim_effects.sum() / max(float(claim_sizes.sum()), TINY))
    return rank_p(observed, draws), draws


def bh_qvalues(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values): ``q_(i) = min_{j >= i} p_(j) * m / j``, capped at 1."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out
