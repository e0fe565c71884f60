"""The verdict policy: one verdict per neuron and direction from the specificity scores, flags kept alongside.

Notation for one direction ``s`` of a neuron (activation ``x = s * a``): ``S`` the layer's activation scale,
``P`` the direction's typical peak (median of its top-k window peaks), ``H`` its high set and the per-category
scores of :mod:`neuronhunter.judge.specificity`; thresholds are the fields of :class:`VerdictThresholds`.

**Specific category.** Category ``c`` (with at least ``min_count`` labelled tokens) is *specific* in direction
``s`` when all hold::

    P >= floor * S                                   (the direction fires above noise at all)
    hits_c >= min_hits,  precision_c >= min_share,  lift_c >= min_lift
    q_c <= alpha                                     (Benjamini-Hochberg over every test of the hunt)
    distinct word types of c among the top-k peaks >= min_types
    for every broad class including c:  lift_in_c >= min_lift  and  q_in_c <= alpha

**Verdict of a direction** (first match wins):

1. ``dead`` (both directions): ``max - min`` over every token, position 0 included, ``<= dead_range * S``.
2. ``positional``: the position-0 value ``f = s * first_mean`` is ``>= floor * S`` and ``>= pos0_ratio * P``
   (the sequence starter carries the highest activations: judged against the top quantiles, not against
   means), or the top-k peaks sit at one window position (share ``>= fixed_position_frac`` of at least
   ``fixed_position_min_examples`` peaks, ``P >= floor * S``).
3. ``token``: ``P >= floor * S``, the two most common word types carry ``>= token_share`` of the top-k peaks,
   and the high set agrees: a type's share of ``H`` is at most the precision of every category it is labelled
   with (or of "unlabelled"), so ``sum over the two types of min over their labels of precision >= token_share``
   (a neuron whose top-k peaks are all " the" but whose high set is 40% other tokens is not a token neuron).
4. ``monosemantic`` / ``polysemantic``: the specific concept categories form one group / two or more groups of
   related categories (``related`` pairs, or label overlap ``|A & B| / min(|A|, |B|) >= related_overlap``), and
   the groups explain the high set: the sum over groups of the best precision in each is ``>= claim_coverage``.
5. ``syntactic``: otherwise, a control class (function words, nouns in general) is specific with precision
   ``>= claim_coverage``: a control class explains the high activations and no concept does beyond it.
6. ``unexplained``: none of the above ("not explained by this lexicon", not "unselective").

**Verdict of the neuron**: the verdict of its direction that comes first in this order; between equal verdicts
the direction with the larger ``P / S``, then ``+``. ``direction`` says which; everything else is computed in the
direction's convention, so relabelling the sign of a gated neuron changes ``direction`` and nothing else.

**Flags** (comma-joined, kept whatever the verdict): ``pos0`` (the position-0 value is among the high
activations, ``f >= max(floor * S, peak_fraction * P)``, without being positional), ``concept:a+b`` (specific
concept categories a positional/token/syntactic/unexplained verdict does not claim), ``control:k`` (a specific
control class not claimed), ``sparse`` (the claim's recall is below ``sparse_recall`` although the high set did not
fill its ``high_quantile`` quota: the neuron fires strongly on few tokens of the category), ``weak`` (``P < floor * S``
in the verdict's direction), ``opposite:verdict[/claim]`` (the other direction's verdict, when it is not
unexplained or dead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .features import DIRECTIONS, LayerFeatures
from .specificity import Specificity, TokenEvidence, specificity, token_evidence
from .thresholds import VERDICTS, VerdictThresholds

EPS = 1e-6
RANK = {v: i for i, v in enumerate(VERDICTS)}


def dead_mask(value_range: np.ndarray, scale: float, dead_range: float | None = None) -> np.ndarray:
    """The one definition of a **dead** neuron: its activation never varies, ``max - min`` over every token
    (position 0 included) ``<= dead_range * S``, ``S`` the layer's activation scale (median neuron standard
    deviation). Sign-free, so both directions of a gated neuron agree."""
    if dead_range is None:
        dead_range = VerdictThresholds().dead_range
    return np.asarray(value_range, dtype=np.float64) <= dead_range * scale


def dead_neurons(neurons, dead_range: float | None = None) -> np.ndarray:
    """:func:`dead_mask` over a ``neurons`` table (columns ``layer, std, min, max`` and, when present,
    ``first_min, first_max``: position 0), each layer with its own scale; a boolean array in row order. Used by
    the scan summary, the browser and the explorer for runs without verdicts."""
    out = np.zeros(len(neurons), dtype=bool)
    if not len(neurons) or not {"layer", "std", "min", "max"} <= set(neurons.columns):
        return out
    hi = neurons["max"].to_numpy(np.float64)
    lo = neurons["min"].to_numpy(np.float64)
    if {"first_min", "first_max"} <= set(neurons.columns):
        hi = np.fmax(hi, np.nan_to_num(neurons["first_max"].to_numpy(np.float64), nan=-np.inf))
        lo = np.fmin(lo, np.nan_to_num(neurons["first_min"].to_numpy(np.float64), nan=np.inf))
    span = hi - lo
    span = np.where(np.isfinite(span), span, 0.0)
    layer = neurons["layer"].to_numpy()
    std = neurons["std"].to_numpy(np.float64)
    for value in np.unique(layer):
        rows = layer == value
        finite = std[rows][np.isfinite(std[rows])]
        out[rows] = dead_mask(span[rows], float(np.median(finite)) if finite.size else 0.0, dead_range)
    return out


def related_matrix(categories: Sequence[str], pairs: Sequence[tuple[str, str]] = (),
                   cooccurrence: np.ndarray | None = None, overlap: float = 0.3) -> np.ndarray:
    """Bool ``[C, C]`` relation (reflexive, symmetric) from explicit ``pairs`` and label co-occurrence
    (``cooccurrence[a, b]`` = tokens labelled both; pairs with ``|A & B| / min(|A|, |B|) >= overlap`` relate)."""
    c = len(categories)
    rel = np.eye(c, dtype=bool)
    index = {name: i for i, name in enumerate(categories)}
    for a, b in pairs:
        if a in index and b in index:
            rel[index[a], index[b]] = rel[index[b], index[a]] = True
    if cooccurrence is not None:
        co = np.asarray(cooccurrence, dtype=np.float64)
        diag = np.diag(co)
        smaller = np.minimum.outer(diag, diag)
        rel |= (smaller > 0) & (co / np.maximum(smaller, 1) >= overlap)
    return rel


def groups_of(members: Sequence[int], related: np.ndarray) -> list[list[int]]:
    """Connected components of ``members`` (category indices) under ``related``, in order of first member."""
    seen: set[int] = set()
    out = []
    for start in members:
        if start in seen:
            continue
        group, stack = [], [start]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            group.append(i)
            stack.extend(j for j in members if related[i, j] and j not in seen)
        out.append(sorted(group))
    return out


def dprime(mean: np.ndarray, std: np.ndarray, base_mean: np.ndarray, base_std: np.ndarray) -> np.ndarray:
    """``d' = (mu_c - mu_u) / sqrt((sd_c^2 + sd_u^2) / 2 + eps^2)`` (broadcasting; eps = 1e-6)."""
    return (mean - base_mean) / np.sqrt((std**2 + base_std**2) / 2 + EPS**2)


def crs_entropy(means: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """``(CRS [d], entropy [d])`` over concept means ``[d, K]`` (``r = max(mean, 0)``); CRS is 0 when the best
    response is below ``floor`` (noise-level means cannot look selective)."""
    r = np.maximum(means, 0.0)
    d, k = r.shape
    if k == 0:
        return np.zeros(d), np.zeros(d)
    top = np.sort(r, axis=1)[:, ::-1]
    r_max = top[:, 0]
    second = top[:, 1] if k > 1 else np.zeros(d)
    crs = np.where((r_max > 0) & (r_max >= floor), (r_max - second) / np.where(r_max > 0, r_max, 1), 0.0)
    total = r.sum(1, keepdims=True)
    p = np.where(total > 0, r / np.where(total > 0, total, 1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0.0).sum(1)
    return crs, ent


@dataclass
class DirectionScores:
    """Everything scored for one layer and one direction (``[d]`` / ``[d, C]``)."""

    direction: str
    spec: Specificity
    tokens: TokenEvidence
    first: np.ndarray
    topk_pos: np.ndarray
    topk_pos_frac: np.ndarray
    crs: np.ndarray
    entropy: np.ndarray
    dprime: np.ndarray
    q: np.ndarray | None = None
    q_in: np.ndarray | None = None


def topk_position_mode(pos: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mode position [d], share of the valid top-k entries there [d])`` of ``pos [k, d]``."""
    k, d = pos.shape
    if k == 0:
        return np.zeros(d, dtype=np.int64), np.zeros(d)
    n_pos = int(pos.max()) + 1 if pos.size else 1
    counts = np.zeros((n_pos, d), dtype=np.int64)
    np.add.at(counts, (np.clip(pos, 0, None), np.broadcast_to(np.arange(d), pos.shape)), valid.astype(np.int64))
    mode = counts.argmax(0)
    share = counts.max(0) / np.maximum(valid.sum(0), 1)
    return mode, share


def score_layer(feat: LayerFeatures, th: VerdictThresholds, concept_idx: np.ndarray,
                broad: dict[int, list[int]]) -> dict[str, DirectionScores]:
    """Scores of both directions of one layer (q-values are filled in later, over the whole hunt)."""
    scale = feat.scale
    out = {}
    for s in DIRECTIONS:
        view = feat.view(s)
        spec = specificity(view, feat.n_tokens, feat.cat_count, scale, floor=th.floor,
                           peak_fraction=th.peak_fraction, quantile=th.high_quantile, broad=broad)
        tokens = token_evidence(view, len(feat.categories))
        mode, share = topk_position_mode(view.top_pos, view.top_type >= 0)
        crs, ent = crs_entropy(view.cat_mean[concept_idx].T, th.crs_floor * scale)
        base_mean, base_std = view.cat_mean[-1][None, :], feat.cat_std[-1][None, :]
        dp = dprime(view.cat_mean[:-1], feat.cat_std[:-1], base_mean, base_std).T  # [d, C]
        out[s] = DirectionScores(direction=s, spec=spec, tokens=tokens, first=view.first, topk_pos=mode,
                                 topk_pos_frac=share, crs=crs, entropy=ent, dprime=dp)
    return out


@dataclass
class Decision:
    """One direction's verdict for each neuron of a layer (lists of length ``d``) and the specific mask."""

    verdict: np.ndarray
    claim: list[str | None]
    claims: list[str | None]
    report: np.ndarray  # [d] index of the category whose scores the row reports (-1: none)
    specific: np.ndarray  # [d, C] bool
    flags: list[list[str]]
    categories: list[str]  # ';'-joined specific concept categories, strongest first
    weak: np.ndarray


def decide(feat: LayerFeatures, ds: DirectionScores, th: VerdictThresholds, *, dead: np.ndarray,
           concept: np.ndarray, control: np.ndarray, broad: dict[int, list[int]], related: np.ndarray) -> Decision:
    """The verdict of one direction (see the module docstring)."""
    sp, tk = ds.spec, ds.tokens
    scale = feat.scale
    d, c = sp.precision.shape
    floor = th.floor * scale
    peak = sp.peak
    strong = np.nan_to_num(peak, nan=-np.inf) >= floor
    scored = feat.cat_count[:-1] >= th.min_count
    q = ds.q if ds.q is not None else np.ones((d, c))
    specific = (scored[None, :] & strong[:, None] & (sp.hits >= th.min_hits) & (sp.precision >= th.min_share)
                & (sp.lift >= th.min_lift) & (q <= th.alpha) & (tk.cat_types >= th.min_types))
    members = sorted({m for ms in broad.values() for m in ms})
    if members:
        q_in = ds.q_in if ds.q_in is not None else np.ones((d, c))
        inside = (np.nan_to_num(sp.lift_in[:, members], nan=0.0) >= th.min_lift) & (
            np.nan_to_num(q_in[:, members], nan=1.0) <= th.alpha)
        specific[:, members] &= inside
    first = np.nan_to_num(ds.first, nan=-np.inf)
    pos0 = (first >= floor) & ((first >= th.pos0_ratio * peak) | ~np.isfinite(peak))
    fixed = (tk.n_valid >= th.fixed_position_min_examples) & (ds.topk_pos_frac >= th.fixed_position_frac) & strong
    prec_all = np.concatenate([sp.precision, sp.unlabelled_precision[:, None]], axis=1)  # [d, C+1]
    bound = np.zeros(d)
    for j in range(2):  # the high-set share a top type can have at most
        bits = tk.top_bits[:, j]
        has = ((bits[:, None] >> np.arange(c + 1)[None, :]) & 1).astype(bool)  # [d, C+1]
        cap = np.where(has, prec_all, np.inf).min(1)
        bound += np.where((tk.top_types[:, j] >= 0) & np.isfinite(cap), cap, 0.0)
    token = (strong & (tk.n_valid >= th.fixed_position_min_examples) & (tk.top2_share >= th.token_share)
             & (bound >= th.token_share))
    high_first = first >= np.fmax(floor, th.peak_fraction * np.nan_to_num(peak, nan=0.0))
    full = sp.n_high >= th.high_quantile * feat.n_tokens  # the high set was cut by its quota, not by the floors

    verdict = np.full(d, "unexplained", dtype=object)
    claim: list[str | None] = [None] * d
    claims: list[str | None] = [None] * d
    report = np.full(d, -1, dtype=np.int64)
    flags: list[list[str]] = [[] for _ in range(d)]
    listed: list[str] = [""] * d
    names = feat.categories
    concept_ids = np.nonzero(concept)[0]
    control_ids = np.nonzero(control)[0]
    for i in range(d):
        spec_i = specific[i]
        prec = sp.precision[i]
        conc = [int(j) for j in concept_ids if spec_i[j]]
        conc.sort(key=lambda j: (-prec[j], j))
        ctrl = [int(j) for j in control_ids if spec_i[j]]
        ctrl.sort(key=lambda j: (-prec[j], j))
        listed[i] = ";".join(names[j] for j in conc)
        groups = groups_of(conc, related) if conc else []
        coverage = sum(max(prec[j] for j in g) for g in groups)
        best_f1 = int(np.argmax(np.where(scored, sp.f1[i], -1.0))) if scored.any() else -1
        if dead[i]:
            v = "dead"
        elif pos0[i] or fixed[i]:
            v = "positional"
        elif token[i]:
            v = "token"
        elif groups and coverage >= th.claim_coverage:
            v = "monosemantic" if len(groups) == 1 else "polysemantic"
        elif ctrl and prec[ctrl[0]] >= th.claim_coverage:
            v = "syntactic"
        else:
            v = "unexplained"
        verdict[i] = v
        f = flags[i]
        if v == "monosemantic":
            top = max(groups[0], key=lambda j: (prec[j], sp.f1[i, j], -j))
            claim[i], report[i] = names[top], top
        elif v == "polysemantic":
            claims[i] = ",".join(names[j] for j in conc)
            report[i] = conc[0]
        elif v == "syntactic":
            claim[i], report[i] = names[ctrl[0]], ctrl[0]
        else:
            report[i] = best_f1
        if v in ("monosemantic", "syntactic") and sp.recall[i, report[i]] < th.sparse_recall and not full[i]:
            f.append("sparse")
        if high_first[i] and v not in ("positional", "dead"):
            f.append("pos0")
        if conc and v not in ("monosemantic", "polysemantic", "dead"):
            f.append("concept:" + "+".join(names[j] for j in conc))
        for j in ctrl:
            if not (v == "syntactic" and j == report[i]) and v != "dead":
                f.append(f"control:{names[j]}")
        if not strong[i] and v == "unexplained":
            f.append("weak")
    return Decision(verdict=verdict, claim=claim, claims=claims, report=report, specific=specific, flags=flags,
                    categories=listed, weak=~strong)


def choose_direction(verdicts: dict[str, np.ndarray], strength: dict[str, np.ndarray]) -> np.ndarray:
    """``[d]`` the direction of each neuron's verdict: the earlier verdict in :data:`VERDICTS`, then the larger
    strength (``P / S``), then ``+``."""
    rank = {s: np.array([RANK[v] for v in verdicts[s]]) for s in DIRECTIONS}
    sp, sn = (np.nan_to_num(strength[s], nan=-np.inf) for s in DIRECTIONS)
    neg = (rank["-"] < rank["+"]) | ((rank["-"] == rank["+"]) & (sn > sp))
    return np.where(neg, "-", "+")


def top_tokens(tk: TokenEvidence, type_names: list[str], i: int) -> str:
    """``"by 0.85; with 0.10"``: the most common word types of a neuron's top-k peaks with their shares."""
    parts = []
    for t, share in zip(tk.top_types[i], tk.top_shares[i], strict=True):
        if t >= 0:
            parts.append(f"{type_names[t]} {share:.2f}")
    return "; ".join(parts)
