"""Judge every neuron of a scan: scores per direction, q-values over the whole hunt, verdicts, tables.

:func:`judge_state` reads a :class:`~neuronhunter.stats.state.ScanState` (a live hunt's or a run's ``stats.pt``)
layer by layer (memory bounded by one layer's per-category histograms), computes both directions' scores
(:mod:`.specificity`), corrects every p-value of the hunt together (Benjamini-Hochberg: all neurons, both
directions, every scored category, and the within-broad-class tests), then applies the verdict policy
(:mod:`.verdicts`) and returns a :class:`Judgement` with

* ``neurons``: one row per neuron, the verdict's direction (columns :data:`NEURON_COLUMNS`);
* ``directions``: one row per neuron and direction (the same columns; ``verdict`` is that direction's);
* ``per_category``: ``[N, 2, C]`` arrays (precision, recall, f1, auprc, lift, p_value, q_value, specific) for the
  concepts table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .features import DIRECTIONS, LayerFeatures, layer_features
from .specificity import bh_qvalues
from .thresholds import VERDICTS, VerdictThresholds
from .verdicts import (
    DirectionScores,
    choose_direction,
    dead_mask,
    decide,
    related_matrix,
    score_layer,
    top_tokens,
)

if TYPE_CHECKING:
    import pandas as pd

    from ..stats.state import ScanState

SCORE_COLUMNS = (
    "verdict", "direction", "claim_category", "claim_categories", "claim_token", "flags", "opposite_verdict",
    "top_category", "precision", "recall", "f1", "auprc", "lift", "p_value", "q_value", "hits", "n_high",
    "threshold", "peak", "layer_scale", "distinct_types", "top_tokens", "topk_share", "category_types", "crs",
    "dprime", "entropy", "n_categories", "categories", "pos0_value", "pos0_ratio", "topk_pos", "topk_pos_frac",
)
PER_CATEGORY = ("precision", "recall", "f1", "auprc", "lift", "p_value", "q_value", "specific")


@dataclass
class Judgement:
    """The hunt's judgement of every neuron (see the module docstring)."""

    neurons: pd.DataFrame
    directions: pd.DataFrame
    per_category: dict[str, np.ndarray]
    categories: list[str]
    control: list[str]
    layer_scale: dict[int, float] = field(default_factory=dict)

    def verdict_counts(self) -> pd.DataFrame:
        return verdict_counts(self.neurons)


def broad_classes(categories: Sequence[str], includes: dict[str, Sequence[str]] | None) -> dict[int, list[int]]:
    """``{class index: [member indices]}`` from ``{class: [member names]}`` (names not in the lexicon ignored)."""
    index = {c: i for i, c in enumerate(categories)}
    out: dict[int, list[int]] = {}
    for cls, members in (includes or {}).items():
        if cls in index:
            ids = [index[m] for m in members if m in index and m != cls]
            if ids:
                out[index[cls]] = ids
    return out


def judge_state(
    state: ScanState,
    categories: Sequence[str],
    control: Sequence[str] = (),
    thresholds: VerdictThresholds | None = None,
    *,
    decode: Callable[[int], str],
    includes: dict[str, Sequence[str]] | None = None,
    cooccurrence: np.ndarray | None = None,
) -> Judgement:
    """Judge every neuron of ``state`` (see the module docstring).

    Args:
        state: the scan state (with concept statistics).
        categories: the lexicon's categories, in the scan's order.
        control: control classes (function words, nouns in general): scored, never a concept claim.
        thresholds: the verdict thresholds (defaults when None).
        decode: token id -> token string (word types of the top-k peaks).
        includes: broad classes, ``{class: [member categories]}`` (the lexicon's ``includes``).
        cooccurrence: ``[C, C]`` label co-occurrence counts (relates overlapping categories).
    """
    th = thresholds or VerdictThresholds()
    cats = list(categories)
    unknown = [c for c in control if c not in cats]
    if unknown:
        raise ValueError(f"control categories not in the lexicon: {unknown}")
    is_control = np.array([c in control for c in cats], dtype=bool)
    concept_idx = np.nonzero(~is_control)[0]
    broad = broad_classes(cats, includes)
    related = related_matrix(cats, th.related, cooccurrence, th.related_overlap)
    for cls, members in broad.items():  # a class is related to nothing by containing its members
        related[cls, members] = related[members, cls] = False
    types: dict[str, int] = {}
    type_names: list[str] = []
    layers: list[tuple[LayerFeatures, dict[str, DirectionScores]]] = []
    for layer in sorted(state.layers):
        feat = layer_features(state, layer, cats, decode, types, type_names)
        scores = score_layer(feat, th, concept_idx, broad)
        # keep what the verdicts need; the histograms of this layer can go
        feat.hist = feat.cat_hist = np.zeros((0,))
        layers.append((feat, scores))

    # multiplicity: one Benjamini-Hochberg family over every test of the hunt
    flat: list[np.ndarray] = []
    for feat, scores in layers:
        scored = feat.cat_count[:-1] >= th.min_count
        for s in DIRECTIONS:
            flat.append(np.where(scored[None, :], scores[s].spec.p_value, np.nan).reshape(-1))
            flat.append(scores[s].spec.p_in.reshape(-1))
    q_all = bh_qvalues(np.concatenate(flat)) if flat else np.zeros(0)
    at = 0
    for _, scores in layers:
        for s in DIRECTIONS:
            shape = scores[s].spec.p_value.shape
            n = int(np.prod(shape))
            scores[s].q = q_all[at:at + n].reshape(shape)
            at += n
            scores[s].q_in = q_all[at:at + n].reshape(shape)
            at += n

    neuron_parts, direction_parts = [], []
    per_cat: dict[str, list[np.ndarray]] = {k: [] for k in PER_CATEGORY}
    scales = {}
    for feat, scores in layers:
        scale = feat.scale
        scales[feat.layer] = scale
        dead = dead_mask(feat.range, scale, th.dead_range)
        rows = {}
        decisions = {}
        for s in DIRECTIONS:
            dec = decide(feat, scores[s], th, dead=dead, concept=~is_control, control=is_control, broad=broad,
                         related=related)
            decisions[s] = dec
            rows[s] = _direction_rows(feat, scores[s], dec, type_names, scale)
        chosen = choose_direction({s: decisions[s].verdict for s in DIRECTIONS},
                                  {s: scores[s].spec.peak / max(scale, 1e-30) for s in DIRECTIONS})
        for s in DIRECTIONS:
            other = "-" if s == "+" else "+"
            opp = rows[other]
            rows[s]["opposite_verdict"] = opp["verdict"]
            rows[s]["flags"] = [",".join(f + _opposite_flag(v, c, cs)) for f, v, c, cs in zip(
                rows[s]["flags"], opp["verdict"], opp["claim_category"], opp["claim_categories"], strict=True)]
        direction_parts.append(_frame(feat, rows))
        neuron_parts.append(_neuron_frame(feat, rows, chosen))
        for k in PER_CATEGORY:
            per_cat[k].append(np.stack([_per_category(scores[s], decisions[s], k) for s in DIRECTIONS], axis=1))
    import pandas as pd

    return Judgement(
        neurons=pd.concat(neuron_parts, ignore_index=True),
        directions=pd.concat(direction_parts, ignore_index=True),
        per_category={k: np.concatenate(v) for k, v in per_cat.items()},
        categories=cats, control=list(control), layer_scale=scales,
    )


def _opposite_flag(verdict: str, claim: str | None, claims: str | None) -> list[str]:
    if verdict in ("unexplained", "dead"):
        return []
    what = claim or (claims.replace(",", "+") if claims else None)
    return [f"opposite:{verdict}" + (f"/{what}" if what else "")]


def _per_category(ds: DirectionScores, dec: Any, key: str) -> np.ndarray:
    if key == "q_value":
        return ds.q
    if key == "specific":
        return dec.specific
    return getattr(ds.spec, key)


def _direction_rows(feat: LayerFeatures, ds: DirectionScores, dec: Any, type_names: list[str],
                    scale: float) -> dict[str, Any]:
    """The columns of one direction's rows (a dict of ``[d]`` sequences)."""
    sp, tk = ds.spec, ds.tokens
    d = feat.d
    idx = np.arange(d)
    rep = dec.report
    has = rep >= 0
    r = np.where(has, rep, 0)

    def pick(a: np.ndarray) -> np.ndarray:
        return np.where(has, a[idx, r], np.nan)

    names = np.array(feat.categories, dtype=object)
    token = [type_names[tk.top_types[i, 0]] if v == "token" and tk.top_types[i, 0] >= 0 else None
             for i, v in enumerate(dec.verdict)]
    peak = sp.peak
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isfinite(ds.first) & (peak > 0), ds.first / peak, np.nan)
    return {
        "verdict": dec.verdict, "claim_category": dec.claim, "claim_categories": dec.claims, "claim_token": token,
        "flags": dec.flags, "top_category": np.where(has, names[r], None),
        "precision": pick(sp.precision), "recall": pick(sp.recall), "f1": pick(sp.f1), "auprc": pick(sp.auprc),
        "lift": pick(sp.lift), "p_value": pick(sp.p_value), "q_value": pick(ds.q),
        "hits": np.where(has, sp.hits[idx, r], 0).astype(np.int64), "n_high": sp.n_high.astype(np.int64),
        "threshold": sp.threshold, "peak": peak, "layer_scale": np.full(d, scale),
        "distinct_types": tk.n_types.astype(np.int32), "top_tokens": [top_tokens(tk, type_names, i) for i in idx],
        "topk_share": pick(tk.cat_share), "category_types": np.where(has, tk.cat_types[idx, r], 0).astype(np.int32),
        "crs": ds.crs, "dprime": pick(ds.dprime), "entropy": ds.entropy,
        "n_categories": np.array([len(c.split(";")) if c else 0 for c in dec.categories], dtype=np.int32),
        "categories": dec.categories, "pos0_value": ds.first, "pos0_ratio": ratio,
        "topk_pos": ds.topk_pos.astype(np.int32), "topk_pos_frac": ds.topk_pos_frac,
    }


def _frame(feat: LayerFeatures, rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    parts = []
    for s in DIRECTIONS:
        cols = {k: list(v) if isinstance(v, list) else v for k, v in rows[s].items()}
        df = pd.DataFrame({"layer": np.full(feat.d, feat.layer, dtype=np.int32),
                           "neuron": np.arange(feat.d, dtype=np.int32), "direction": s, **cols})
        parts.append(df)
    out = pd.concat(parts, ignore_index=True).sort_values(["neuron", "direction"], kind="stable")
    return out[["layer", "neuron", *SCORE_COLUMNS]].reset_index(drop=True)


def _neuron_frame(feat: LayerFeatures, rows: dict[str, dict[str, Any]], chosen: np.ndarray) -> pd.DataFrame:
    import pandas as pd

    out: dict[str, Any] = {"layer": np.full(feat.d, feat.layer, dtype=np.int32),
                           "neuron": np.arange(feat.d, dtype=np.int32), "direction": chosen}
    neg = chosen == "-"
    for key in rows["+"]:
        a, b = rows["+"][key], rows["-"][key]
        if isinstance(a, list) or np.asarray(a).dtype == object:
            out[key] = [y if n else x for x, y, n in zip(a, b, neg, strict=True)]
        else:
            out[key] = np.where(neg, b, a)
    return pd.DataFrame(out)[["layer", "neuron", *SCORE_COLUMNS]]


def verdict_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts of each verdict per layer (rows: layers plus a ``total`` row; columns: :data:`VERDICTS`)."""
    table = frame.pivot_table(index="layer", columns="verdict", values="neuron", aggfunc="count", fill_value=0)
    table = table.reindex(columns=list(VERDICTS), fill_value=0).astype(int)
    table.loc["total"] = table.sum(0)
    return table


def direction_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Verdicts by the direction they are about (rows: verdicts; columns ``+``, ``-``, ``share_-``)."""
    table = frame.pivot_table(index="verdict", columns="direction", values="neuron", aggfunc="count", fill_value=0)
    table = table.reindex(index=list(VERDICTS), columns=list(DIRECTIONS), fill_value=0).astype(int)
    total = table.sum(1)
    table["share_-"] = np.where(total > 0, table["-"] / np.maximum(total, 1), np.nan)
    return table


def champion(neurons: pd.DataFrame) -> pd.Series | None:
    """The neuron with the largest ``|activation|`` (position 0 excluded) that is neither positional nor dead
    (needs the scan's ``max``/``min`` columns and the verdicts)."""
    eligible = neurons[~neurons["verdict"].isin(["positional", "dead"])]
    if eligible.empty:
        return None
    magnitude = np.fmax(eligible["max"].to_numpy(), -eligible["min"].to_numpy())
    return eligible.iloc[int(np.nanargmax(magnitude))]


def top_neurons_per_category(judgement: Judgement, n: int = 3) -> pd.DataFrame:
    """The top ``n`` monosemantic and polysemantic neurons of every concept category, ranked by the category's F1
    in the verdict's direction (a polysemantic neuron is listed under each category it claims).

    Returns:
        Columns category, kind, rank, layer, neuron, direction, precision, recall, f1, auprc, q_value, categories.
    """
    import pandas as pd

    frame = judgement.neurons
    cats = judgement.categories
    d_index = np.where(frame["direction"].to_numpy() == "-", 1, 0)
    rows_all = np.arange(len(frame))
    claims = [(c if isinstance(c, str) else "").split(",") if v == "polysemantic" else [c] for v, c in
              zip(frame["verdict"], np.where(frame["verdict"] == "polysemantic", frame["claim_categories"],
                                             frame["claim_category"]), strict=True)]
    out = []
    for ci, cat in enumerate(cats):
        if cat in judgement.control:
            continue
        for kind in ("monosemantic", "polysemantic"):
            mask = (frame["verdict"].to_numpy() == kind) & np.array([cat in cl for cl in claims])
            idx = rows_all[mask]
            if len(idx) == 0:
                continue
            f1 = judgement.per_category["f1"][idx, d_index[idx], ci]
            idx = idx[np.argsort(-f1, kind="stable")][:n]
            for rank, i in enumerate(idx):
                di = d_index[i]
                pc = judgement.per_category
                row = frame.iloc[i]
                out.append({"category": cat, "kind": kind, "rank": rank, "layer": int(row["layer"]),
                            "neuron": int(row["neuron"]), "direction": row["direction"],
                            "precision": float(pc["precision"][i, di, ci]), "recall": float(pc["recall"][i, di, ci]),
                            "f1": float(pc["f1"][i, di, ci]), "auprc": float(pc["auprc"][i, di, ci]),
                            "q_value": float(pc["q_value"][i, di, ci]),
                            "categories": row["claim_categories"] if kind == "polysemantic" else cat})
    cols = ["category", "kind", "rank", "layer", "neuron", "direction", "precision", "recall", "f1", "auprc",
            "q_value", "categories"]
    return pd.DataFrame(out, columns=cols)
