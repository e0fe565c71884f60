"""Per-neuron concept selectivity, verdicts and champions: the scoring half of the hunt.

The scan accumulates, for every neuron, mergeable per-category statistics (sum, sum of squares, max, count for each
concept category and for the "unlabelled" tokens), per-position means, position-0 maxima and the top-k windows. This
module turns them into scores and one verdict per neuron. Nothing here runs the model.

Notation for one neuron: ``mu_c``, ``sd_c``, ``n_c`` are the mean, standard deviation and token count of its
activation on the tokens of category ``c``; ``u`` is the unlabelled baseline; "concept" categories are all
categories that are not controls (the ``function`` word / punctuation class is a control).

Scores
------
* **CRS**, concept response selectivity, over the concept categories' means (the metric of the toy mono-to-poly
  experiment, :func:`neuronhunter.analysis.metrics.crs`)::

      CRS = (r_max - r_second) / r_max,      r_c = max(mu_c, 0)

  1 = one concept only, 0 = two concepts drive it equally (or nothing does).
* **d'** (standardised mean difference) of each category against the unlabelled baseline::

      d'_c = (mu_c - mu_u) / sqrt((sd_c^2 + sd_u^2) / 2 + eps^2),      eps = 1e-6

* **Entropy** (bits) of the positive mean-response mass over concept categories,
  ``H = -sum_c p_c log2 p_c`` with ``p_c = r_c / sum_c r_c`` (:func:`~neuronhunter.analysis.metrics.response_entropy`):
  0 = one category, ``log2(C)`` = all alike.
* **n_categories**: how many concept categories the neuron *responds to* (below).
* **sd**: the neuron's standard deviation over all counted tokens (position 0 excluded by the scan).
* **pos0_share** ``= f+ / (f+ + p+)`` with ``f`` the mean activation at position 0 and ``p`` the neuron's peak mean
  response on ordinary tokens (max over all categories and the unlabelled baseline); ``x+ = max(x, 0)``.
  **pos0_max_share** ``= F+ / (F+ + M+)`` with ``F`` the maximum at position 0 and ``M`` the maximum elsewhere.
* **topk_pos_frac**: the share of the neuron's top-k windows whose maximum sits at the most common window
  position ``topk_pos``.

"Responds to" (thresholds in :class:`VerdictThresholds`)
--------------------------------------------------------
Category ``c`` (with ``n_c >= min_count``) is *responsive* when all hold::

    d'_c >= dprime_min
    mu_c - mu_u >= min_effect * sd        (guards d' against near-zero spreads)
    mu_c >= co_response * max_k mu_k       (concept categories only: close to the neuron's best concept)

Verdict rule (first match wins)
-------------------------------
1. ``dead``: the neuron's maximum anywhere, position 0 included, is ``<= dead_max`` (never active).
2. ``positional`` (the sequence-starter trap): either it fires mostly at position 0 —
   ``first_max > dead_max`` and ``pos0_share >= pos0_share_min`` and ``pos0_max_share >= pos0_max_share_min`` — or
   its top activations sit at one fixed window position: ``topk_pos_frac >= fixed_position_frac`` over at least
   ``fixed_position_min_examples`` top-k windows.
3. ``syntactic``: a control category (function words / punctuation) is responsive and its mean is
   ``>= syntactic_ratio`` times the best concept mean.
4. ``monosemantic``: the responsive concept categories form **one** group of related categories;
   ``polysemantic``: they form two or more unrelated groups. Categories are related when listed in ``related``
   (default: date~numeric, whose tokens overlap by design) or when their labelled tokens overlap
   (``|A & B| / min(|A|, |B|) >= related_overlap``, when the hunt measured label co-occurrence).
5. ``unselective``: active, but no category is responsive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field, field_validator

from ..config import StrictModel
from .metrics import crs, response_entropy

if TYPE_CHECKING:
    import pandas as pd

    from ..scan import ScanState

log = logging.getLogger(__name__)

VERDICTS = ("monosemantic", "polysemantic", "positional", "syntactic", "dead", "unselective")
EPS = 1e-6


class VerdictThresholds(StrictModel):
    """Configurable thresholds of the verdict rule (see the module docstring for the rule itself)."""

    dead_max: float = Field(0.0, description="dead when the max activation anywhere is <= this")
    min_count: int = Field(5, ge=1, description="categories with fewer labelled tokens are not scored")
    dprime_min: float = Field(1.0, description="responsive: d' against the unlabelled baseline >= this")
    min_effect: float = Field(0.25, ge=0, description="responsive: mu_c - mu_u >= min_effect * sd over all tokens")
    co_response: float = Field(0.5, ge=0, le=1, description="responsive: mu_c >= co_response * best concept mean")
    syntactic_ratio: float = Field(1.0, ge=0, description="syntactic: control mean >= ratio * best concept mean")
    pos0_share_min: float = Field(0.75, ge=0, le=1, description="positional: f+/(f+ + peak+) at position 0 >= this")
    pos0_max_share_min: float = Field(1 / 3, ge=0, le=1, description="positional: F+/(F+ + max elsewhere+) >= this")
    fixed_position_frac: float = Field(0.8, gt=0, le=1, description="positional: share of top-k at one position")
    fixed_position_min_examples: int = Field(5, ge=1, description="top-k windows needed for the fixed-position test")
    related: list[tuple[str, str]] = Field([("date", "numeric")], description="category pairs counted as related")
    related_overlap: float = Field(0.3, gt=0, le=1, description="related when |A&B|/min(|A|,|B|) of tokens >= this")

    @field_validator("related")
    @classmethod
    def _pairs(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for a, b in value:
            if a == b:
                raise ValueError(f"related pair ({a}, {b}) names one category twice")
        return value


@dataclass
class NeuronFeatures:
    """What the scores are computed from, for ``N`` neurons (all layers stacked) and ``C`` categories.

    Attributes:
        layer, neuron: ``[N]`` ids.
        cat_mean, cat_std, cat_max: ``[N, C]`` per-category statistics (NaN where a category has no tokens).
        cat_count: ``[C]`` labelled tokens per category.
        base_mean, base_std: ``[N]`` statistics on unlabelled tokens; ``base_count``: their number.
        max, min, std: ``[N]`` over the counted tokens (position 0 excluded unless the scan included it).
        first_mean, first_max: ``[N]`` at position 0.
        topk_pos, topk_pos_frac, topk_n: ``[N]`` most common window position of the top-k maxima, its share, and the
            number of valid top-k windows.
    """

    layer: np.ndarray
    neuron: np.ndarray
    categories: list[str]
    cat_mean: np.ndarray
    cat_std: np.ndarray
    cat_max: np.ndarray
    cat_count: np.ndarray
    base_mean: np.ndarray
    base_std: np.ndarray
    base_count: int
    max: np.ndarray
    min: np.ndarray
    std: np.ndarray
    first_mean: np.ndarray
    first_max: np.ndarray
    topk_pos: np.ndarray
    topk_pos_frac: np.ndarray
    topk_n: np.ndarray

    def __len__(self) -> int:
        return len(self.layer)


def topk_position_mode(pos: torch.Tensor, window: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Most common window position among each neuron's valid top-k entries.

    Args:
        pos, window: ``[k, d]`` top-k positions and window ids (``window < 0`` = empty slot).

    Returns:
        ``(mode_position [d], share_at_mode [d], n_valid [d])`` (share 0 where nothing is valid).
    """
    k, d = pos.shape
    valid = window >= 0
    n_pos = int(pos.max()) + 1 if pos.numel() else 1
    counts = torch.zeros((n_pos, d), dtype=torch.long)
    counts.scatter_add_(0, pos.long().clamp(min=0), valid.long())
    best, mode = counts.max(0)
    n_valid = valid.sum(0)
    share = best.double() / n_valid.clamp(min=1).double()
    return mode.numpy(), share.numpy(), n_valid.numpy()


def features_from_state(state: ScanState, categories: Sequence[str]) -> NeuronFeatures:
    """Collect :class:`NeuronFeatures` from a scan's accumulated state (all layers, in layer order)."""
    parts: dict[str, list[np.ndarray]] = {}
    base_count = 0
    cat_count = None

    def add(name: str, value: Any) -> None:
        parts.setdefault(name, []).append(np.asarray(value))

    for layer, ls in sorted(state.layers.items()):
        cs = ls.concepts
        if cs is None:
            raise ValueError(f"layer {layer} has no concept statistics (scan without a lexicon)")
        if list(cs.categories) != list(categories):
            raise ValueError("the scan's categories differ from the requested ones")
        means, stds = cs.means().numpy(), cs.stds().numpy()  # [C+1, d]
        d = ls.d
        add("layer", np.full(d, layer, dtype=np.int32))
        add("neuron", np.arange(d, dtype=np.int32))
        add("cat_mean", means[:-1].T)
        add("cat_std", stds[:-1].T)
        add("cat_max", cs.max.double().numpy()[:-1].T)
        add("base_mean", means[-1])
        add("base_std", stds[-1])
        cat_count, base_count = cs.count.numpy()[:-1], int(cs.count[-1])
        add("max", ls.moments.max.double().numpy())
        add("min", ls.moments.min.double().numpy())
        add("std", ls.moments.summary()["std"].numpy())
        add("first_mean", ls.positions.means()[0].numpy())
        add("first_max", ls.positions.first_max.double().numpy())
        mode, share, n_valid = topk_position_mode(ls.topk.pos, ls.topk.window)
        add("topk_pos", mode.astype(np.int32))
        add("topk_pos_frac", share)
        add("topk_n", n_valid.astype(np.int32))
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return NeuronFeatures(categories=list(categories), cat_count=np.asarray(cat_count), base_count=base_count,
                          **joined)


def related_matrix(
    categories: Sequence[str],
    pairs: Sequence[tuple[str, str]] = (),
    cooccurrence: np.ndarray | None = None,
    overlap: float = 0.3,
) -> np.ndarray:
    """Bool ``[C, C]`` relation (reflexive, symmetric) from explicit ``pairs`` and label co-occurrence.

    Args:
        cooccurrence: ``[C, C]`` token counts, entry ``(a, b)`` = tokens labelled with both ``a`` and ``b``
            (diagonal = tokens labelled ``a``). Pairs with ``|A & B| / min(|A|, |B|) >= overlap`` are related.
    """
    c = len(categories)
    rel = np.eye(c, dtype=bool)
    index = {name: i for i, name in enumerate(categories)}
    for a, b in pairs:
        if a not in index or b not in index:
            log.debug("related pair (%s, %s) names a category that is not in the lexicon; ignored", a, b)
            continue
        rel[index[a], index[b]] = rel[index[b], index[a]] = True
    if cooccurrence is not None:
        co = np.asarray(cooccurrence, dtype=np.float64)
        diag = np.diag(co)
        smaller = np.minimum.outer(diag, diag)
        rel |= (smaller > 0) & (co / np.maximum(smaller, 1) >= overlap)
    return rel


def count_groups(members: np.ndarray, related: np.ndarray) -> int:
    """Number of connected components of the categories in ``members`` (bool ``[C]``) under ``related``."""
    idx = [int(i) for i in np.nonzero(members)[0]]
    seen: set[int] = set()
    groups = 0
    for start in idx:
        if start in seen:
            continue
        groups += 1
        stack = [start]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(j for j in idx if related[i, j] and j not in seen)
    return groups


def dprime(mean: np.ndarray, std: np.ndarray, base_mean: np.ndarray, base_std: np.ndarray) -> np.ndarray:
    """``d' = (mu_c - mu_u) / sqrt((sd_c^2 + sd_u^2) / 2 + eps^2)`` (broadcasting; eps = 1e-6)."""
    return (mean - base_mean) / np.sqrt((std**2 + base_std**2) / 2 + EPS**2)


def _share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ap, bp = np.maximum(a, 0), np.maximum(b, 0)
    total = ap + bp
    return np.where(total > 0, ap / np.where(total > 0, total, 1), 0.0)


@dataclass
class Scores:
    """Per-neuron scores (``frame``, one row per neuron) and per-(neuron, category) d' and responsiveness."""

    frame: pd.DataFrame
    mean: np.ndarray  # [N, C] category means (0 where a category is not scored)
    dprime: np.ndarray  # [N, C]
    responsive: np.ndarray  # [N, C] bool
    categories: list[str]
    control: list[str]


def score_neurons(
    features: NeuronFeatures,
    control: Sequence[str] = (),
    thresholds: VerdictThresholds | None = None,
    cooccurrence: np.ndarray | None = None,
) -> Scores:
    """Score every neuron and give it one verdict (see the module docstring for formulas and rule).

    Args:
        features: what the scan accumulated (:func:`features_from_state`).
        control: names of control categories (function words / punctuation).
        thresholds: the verdict thresholds (defaults when None).
        cooccurrence: optional ``[C, C]`` label co-occurrence counts (relates overlapping categories).

    Returns:
        :class:`Scores`; ``frame`` has columns layer, neuron, top_category, top_mean, second_category, second_mean,
        crs, dprime, entropy, n_categories, categories, control_dprime, pos0_share, pos0_max_share,
        topk_pos, topk_pos_frac, verdict.
    """
    import pandas as pd

    th = thresholds or VerdictThresholds()
    f = features
    cats = list(f.categories)
    unknown = [c for c in control if c not in cats]
    if unknown:
        raise ValueError(f"control categories not in the lexicon: {unknown}")
    is_control = np.array([c in control for c in cats], dtype=bool)
    concept_idx = np.nonzero(~is_control)[0]
    control_idx = np.nonzero(is_control)[0]
    n = len(f)

    scored = f.cat_count >= th.min_count  # [C]
    mean = np.where(scored[None, :], np.nan_to_num(f.cat_mean, nan=0.0), 0.0)  # [N, C]
    std = np.nan_to_num(f.cat_std, nan=0.0)
    base_mean = np.nan_to_num(f.base_mean, nan=0.0)[:, None]
    base_std = np.nan_to_num(f.base_std, nan=0.0)[:, None]
    dp = np.where(scored[None, :], dprime(mean, std, base_mean, base_std), 0.0)
    if f.base_count == 0:
        dp = np.zeros_like(dp)
    sd = np.nan_to_num(f.std, nan=0.0)
    effect_ok = (mean - base_mean) >= th.min_effect * sd[:, None]
    basic = scored[None, :] & (dp >= th.dprime_min) & effect_ok & (f.base_count > 0)

    # concept responses: CRS and entropy over the concept categories' means
    concept_mean = mean[:, concept_idx]  # [N, K]
    resp = torch.from_numpy(np.maximum(concept_mean, 0.0))
    if resp.shape[1] >= 2:
        crs_v = crs(resp).numpy()
    elif resp.shape[1] == 1:
        crs_v = (resp[:, 0] > 0).double().numpy()
    else:
        crs_v = np.zeros(n)
    ent = response_entropy(resp).numpy() if resp.shape[1] else np.zeros(n)
    best_concept = concept_mean.max(1) if len(concept_idx) else np.zeros(n)
    responsive = basic.copy()
    responsive[:, concept_idx] &= concept_mean >= th.co_response * np.maximum(best_concept, 0.0)[:, None]
    concept_resp = responsive[:, concept_idx]
    n_cat = concept_resp.sum(1)

    # groups of related responsive concept categories (few distinct patterns: loop over unique rows)
    rel = related_matrix([cats[i] for i in concept_idx], th.related, None if cooccurrence is None
                         else np.asarray(cooccurrence)[np.ix_(concept_idx, concept_idx)], th.related_overlap)
    groups = np.zeros(n, dtype=np.int64)
    if len(concept_idx):
        patterns, inverse = np.unique(concept_resp, axis=0, return_inverse=True)
        per_pattern = np.array([count_groups(p, rel) for p in patterns])
        groups = per_pattern[np.asarray(inverse).reshape(-1)]

    # top and second concept category by mean
    if len(concept_idx):
        order = np.argsort(-concept_mean, axis=1, kind="stable")
        top_i = concept_idx[order[:, 0]]
        sec_i = concept_idx[order[:, 1]] if len(concept_idx) > 1 else top_i
    else:
        top_i = sec_i = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    top_mean = mean[rows, top_i] if len(concept_idx) else np.zeros(n)
    sec_mean = mean[rows, sec_i] if len(concept_idx) > 1 else np.full(n, np.nan)

    # control (syntactic) response
    if len(control_idx):
        ctrl_mean = mean[:, control_idx].max(1)
        ctrl_dp = dp[:, control_idx].max(1)
        ctrl_resp = responsive[:, control_idx].any(1)
    else:
        ctrl_mean, ctrl_dp, ctrl_resp = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)

    # position-0 and fixed-position tests
    peak = np.maximum(np.where(scored[None, :], mean, -np.inf).max(1, initial=-np.inf), base_mean[:, 0])
    pos0_share = _share(np.nan_to_num(f.first_mean, nan=0.0), peak)
    first_max = np.nan_to_num(f.first_max, nan=-np.inf, neginf=-np.inf)
    pos0_max_share = _share(np.nan_to_num(first_max, neginf=0.0), np.nan_to_num(f.max, neginf=0.0))
    overall_max = np.fmax(np.nan_to_num(f.max, nan=-np.inf), first_max)

    dead = ~(overall_max > th.dead_max)
    at_first = (first_max > th.dead_max) & (pos0_share >= th.pos0_share_min) & (
        pos0_max_share >= th.pos0_max_share_min)
    fixed = (f.topk_n >= th.fixed_position_min_examples) & (f.topk_pos_frac >= th.fixed_position_frac)
    positional = ~dead & (at_first | fixed)
    syntactic = ~dead & ~positional & ctrl_resp & (ctrl_mean >= th.syntactic_ratio * np.maximum(best_concept, 0.0))
    rest = ~dead & ~positional & ~syntactic
    verdict = np.full(n, "unselective", dtype=object)
    verdict[rest & (groups == 1)] = "monosemantic"
    verdict[rest & (groups >= 2)] = "polysemantic"
    verdict[syntactic] = "syntactic"
    verdict[positional] = "positional"
    verdict[dead] = "dead"

    concept_names = np.array([cats[i] for i in concept_idx], dtype=object)
    listed = []
    for i in range(n):
        sel = np.nonzero(concept_resp[i])[0]
        if len(sel) == 0:
            listed.append("")
            continue
        sel = sel[np.argsort(-concept_mean[i, sel], kind="stable")]
        listed.append(";".join(concept_names[sel]))
    names = np.array(cats, dtype=object)
    frame = pd.DataFrame({
        "layer": f.layer.astype(np.int32),
        "neuron": f.neuron.astype(np.int32),
        "top_category": names[top_i] if len(concept_idx) else "",
        "top_mean": top_mean,
        "second_category": names[sec_i] if len(concept_idx) > 1 else "",
        "second_mean": sec_mean,
        "crs": crs_v.astype(np.float64),
        "dprime": dp[rows, top_i] if len(concept_idx) else np.zeros(n),
        "entropy": ent.astype(np.float64),
        "n_categories": n_cat.astype(np.int32),
        "categories": listed,
        "control_dprime": ctrl_dp,
        "pos0_share": pos0_share,
        "pos0_max_share": pos0_max_share,
        "topk_pos": f.topk_pos.astype(np.int32),
        "topk_pos_frac": f.topk_pos_frac.astype(np.float64),
        "verdict": verdict,
    })
    return Scores(frame=frame, mean=mean, dprime=dp, responsive=responsive, categories=cats, control=list(control))


def champion(scores: pd.DataFrame, neurons: pd.DataFrame) -> pd.Series | None:
    """The neuron with the strongest activation (``max``, position 0 excluded) that is neither positional nor dead.

    Args:
        scores: :attr:`Scores.frame` (needs layer, neuron, verdict).
        neurons: the scan's neurons table (needs layer, neuron, max).

    Returns:
        The champion's merged row, or None when every neuron is positional or dead.
    """
    merged = scores.merge(neurons[["layer", "neuron", "max"]], on=["layer", "neuron"], how="left")
    eligible = merged[~merged["verdict"].isin(["positional", "dead"])]
    if eligible.empty:
        return None
    return eligible.loc[eligible["max"].idxmax()]


def top_neurons_per_category(scores: Scores, n: int = 3) -> pd.DataFrame:
    """The top ``n`` monosemantic and polysemantic neurons of every concept category, ranked by that category's d'.

    A monosemantic neuron belongs to its responsive category group (ranked in every category it responds to); a
    polysemantic neuron is listed under each category it responds to.

    Returns:
        Columns category, kind (monosemantic/polysemantic), rank, layer, neuron, mean, dprime, crs, categories.
    """
    import pandas as pd

    frame = scores.frame
    out = []
    for ci, cat in enumerate(scores.categories):
        if cat in scores.control:
            continue
        for kind in ("monosemantic", "polysemantic"):
            mask = (frame["verdict"].to_numpy() == kind) & scores.responsive[:, ci]
            idx = np.nonzero(mask)[0]
            if len(idx) == 0:
                continue
            dps = scores.dprime[idx, ci]
            idx = idx[np.argsort(-dps, kind="stable")][:n]
            for rank, i in enumerate(idx):
                row = frame.iloc[i]
                out.append({"category": cat, "kind": kind, "rank": rank, "layer": int(row["layer"]),
                            "neuron": int(row["neuron"]), "mean": float(scores.mean[i, ci]),
                            "dprime": float(scores.dprime[i, ci]),
                            "crs": float(row["crs"]), "categories": row["categories"]})
    cols = ["category", "kind", "rank", "layer", "neuron", "mean", "dprime", "crs", "categories"]
    return pd.DataFrame(out, columns=cols)


def verdict_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts of each verdict per layer (rows: layers plus a ``total`` row; columns: :data:`VERDICTS`)."""
    table = frame.pivot_table(index="layer", columns="verdict", values="neuron", aggfunc="count", fill_value=0)
    table = table.reindex(columns=list(VERDICTS), fill_value=0).astype(int)
    table.loc["total"] = table.sum(0)
    return table
