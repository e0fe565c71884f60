"""Linear probes and sparse probing: is a concept linearly readable from a layer, and from how few neurons?

**Linear probes.** For each layer, a logistic regression (scikit-learn, standardised features) predicts each
token's concept category from the residual stream (``hook_resid_post``) or the MLP neurons (``mlp.hook_post``).
Tokens with exactly one category label are used (``include_none=True`` adds unlabelled tokens as a ``none``
class; tokens with several labels are dropped as ambiguous). Evaluation is cross-validated with folds **split by
document** (``GroupKFold``), so a probe is never tested on text it was trained on. Reported per layer: accuracy and
macro-F1, the majority-class baseline, and a **control task** with shuffled labels (the same probe trained on
labels permuted across tokens: it should stay at chance); *selectivity* = accuracy - control accuracy (Hewitt &
Liang, 2019).

**Sparse probing** (Gurnee et al., 2023). For each category (one-vs-rest) and ``k`` in 1, 2, 4, 8, 16, ...: rank
all neurons of the chosen layers by the difference of their mean activation on the category's tokens and on the
other tokens, divided by the neuron's standard deviation (computed on the training fold only; without the division,
the large-scale neurons of the last layers win every ranking across layers), keep the top ``k`` and fit a
class-balanced logistic regression on them, with the decision threshold set to maximise F1 on the training fold
(categories are rare: the default threshold of a balanced classifier trades far too much precision for recall).
Reported: F1 and Matthews correlation (MCC) on the held-out documents vs ``k``. ``k = 1`` gives the best single
neuron for the category, which :func:`compare_with_hunt` checks against the hunt's monosemantic neurons.

Labels come from a :class:`~neuronhunter.data.batches.TokenLabeller` (the concept categories) or from a user file
of token labels (:func:`read_token_labels`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..models.hooked import HookedModel
from ..models.sites import Site
from ..stats.tokens import counted_tokens

log = logging.getLogger(__name__)

SITES = {"resid": "hook_resid_post", "mlp": "mlp.hook_post"}
NONE_LABELS = {"", "o", "_", "-", "none"}


# ------------------------------------------------------------------------------------------------ user labels
class SpanLabeller:
    """A :class:`~neuronhunter.data.batches.TokenLabeller` from character spans known per document text."""

    def __init__(self, categories: list[str], spans: dict[str, list[tuple[int, int, int]]]):
        self.categories = categories
        self.spans = spans  # text -> [(start, end, category index)]

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        out = np.zeros((len(offsets), len(self.categories)), dtype=bool)
        spans = self.spans.get(text, [])
        if not spans or not offsets:
            return out
        starts = np.array([o[0] for o in offsets])
        ends = np.array([o[1] for o in offsets])
        for s, e, c in spans:
            out[(starts < e) & (ends > s), c] = True
        return out


def read_token_labels(path: str | Path) -> tuple[list[Any], SpanLabeller]:
    """Read a file of token labels: ``(documents, labeller)``.

    Formats:
        * ``.jsonl``: one document per line, ``{"text": ..., "spans": [[start, end, label], ...]}`` (character
          offsets, end exclusive).
        * anything else (``.tsv``, ``.conll``, ``.txt``): one ``word<TAB>label`` per line, documents separated by
          blank lines; the label ``O`` (or ``_``, ``-``, empty) means no label. Words are joined with spaces.
    """
    from ..data.corpus import Document

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"token label file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    docs: list[tuple[str, list[tuple[int, int, str]]]] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                spans = [(int(s), int(e), str(lab)) for s, e, lab in row.get("spans", [])]
                docs.append((str(row["text"]), spans))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ConfigError(f"{path}:{lineno}: expected {{\"text\": ..., \"spans\": [[start, end, label]]}}") from None
    else:
        words: list[tuple[str, str]] = []
        for lineno, line in enumerate([*raw.splitlines(), ""], 1):
            if not line.strip():
                if words:
                    text, spans, pos = "", [], 0
                    for w, lab in words:
                        if text:
                            text += " "
                            pos += 1
                        text += w
                        if lab.lower() not in NONE_LABELS:
                            spans.append((pos, pos + len(w), lab))
                        pos += len(w)
                    docs.append((text, spans))
                    words = []
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or not parts[0]:
                raise ConfigError(f"{path}:{lineno}: expected 'word<TAB>label'")
            words.append((parts[0], parts[-1].strip()))
    if not docs:
        raise ConfigError(f"{path} holds no labelled documents")
    categories = sorted({lab for _, spans in docs for *_, lab in spans})
    if not categories:
        raise ConfigError(f"{path} has no token labels (only 'O')")
    index = {c: i for i, c in enumerate(categories)}
    spans_by_text: dict[str, list[tuple[int, int, int]]] = {}
    for text, spans in docs:
        spans_by_text.setdefault(text, []).extend((s, e, index[lab]) for s, e, lab in spans)
    documents = [Document(i, text, f"{path.name}#{i}") for i, (text, _) in enumerate(docs)]
    return documents, SpanLabeller(categories, spans_by_text)


# ------------------------------------------------------------------------------------------------ features
@dataclass
class ProbeData:
    """Activations of real tokens (BOS and padding excluded) at one site kind for several layers."""

    features: dict[int, np.ndarray]  # layer -> [N, d] float32
    labels: np.ndarray  # [N, C] bool
    doc_ids: np.ndarray  # [N]
    token_ids: np.ndarray  # [N]
    categories: list[str]
    site: str  # resid | mlp


def collect_features(model: HookedModel, batches: Sequence[Any], categories: Sequence[str], *,
                     layers: Sequence[int] | None = None, site: str = "resid",
                     progress: Callable[[], None] | None = None) -> ProbeData:
    """Capture ``site`` (``resid`` or ``mlp``) at ``layers`` for labelled ``batches``."""
    if site not in SITES:
        raise ConfigError(f"probe site must be one of {', '.join(SITES)}, got {site!r}")
    layers = model.check_layers(range(model.n_layers) if layers is None else layers)
    sites = [Site(L, SITES[site]) for L in layers]
    feats: dict[int, list[np.ndarray]] = {L: [] for L in layers}
    labels, docs, toks = [], [], []
    with model.capture(sites) as cache:
        for bt in batches:
            if bt.labels is None:
                raise ConfigError("probing needs labelled batches (give a labeller)")
            keep = counted_tokens(bt.attention_mask)
            model.forward(bt.input_ids, bt.attention_mask, stop_at_layer=max(layers) + 1)
            for L, s in zip(layers, sites, strict=True):
                feats[L].append(cache[s][keep.to(cache[s].device)].float().cpu().numpy())
            labels.append(bt.labels[keep].numpy())
            rows = torch.nonzero(keep)[:, 0]
            docs.append(bt.doc_ids[rows].numpy())
            toks.append(bt.input_ids[keep].numpy())
            if progress is not None:
                progress()
    return ProbeData({L: np.concatenate(v) for L, v in feats.items()}, np.concatenate(labels), np.concatenate(docs),
                     np.concatenate(toks), list(categories), site)


def single_labels(labels: np.ndarray, categories: Sequence[str], *, include_none: bool = False) -> tuple[np.ndarray, list[str]]:
    """Class index per token from multi-hot labels: ``-1`` where the token is dropped (several labels; no label
    unless ``include_none``). Returns ``(y [N], class names)``."""
    n_lab = labels.sum(1)
    y = np.where(n_lab == 1, labels.argmax(1), -1)
    names = list(categories)
    if include_none:
        y = np.where(n_lab == 0, len(names), y)
        names = [*names, "none"]
    return y, names


def _folds(groups: np.ndarray, n_splits: int) -> Any:
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ConfigError("probes are split by document: the corpus needs at least two documents")
    return GroupKFold(n_splits=min(n_splits, n_groups))


def _classifier(seed: int, C: float, max_iter: int, balanced: bool = False) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed,
                                                              class_weight="balanced" if balanced else None))


def cross_validate_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, n_splits: int = 3, seed: int = 0,
                         C: float = 1.0, max_iter: int = 300) -> dict[str, float]:
    """Cross-validated (grouped) accuracy and macro-F1 of a logistic-regression probe, and the majority baseline."""
    from sklearn.metrics import accuracy_score, f1_score

    classes = np.unique(y)
    if len(classes) < 2:
        raise ConfigError("a probe needs at least two classes among the labelled tokens")
    accs, f1s, maj_accs, maj_f1s = [], [], [], []
    for train, test in _folds(groups, n_splits).split(X, y, groups):
        if len(np.unique(y[train])) < 2:
            continue
        clf = _classifier(seed, C, max_iter).fit(X[train], y[train])
        pred = clf.predict(X[test])
        accs.append(accuracy_score(y[test], pred))
        f1s.append(f1_score(y[test], pred, average="macro", labels=classes, zero_division=0))
        vals, counts = np.unique(y[train], return_counts=True)
        maj = np.full_like(y[test], vals[counts.argmax()])
        maj_accs.append(accuracy_score(y[test], maj))
        maj_f1s.append(f1_score(y[test], maj, average="macro", labels=classes, zero_division=0))
    if not accs:
        raise ConfigError("no fold had two classes in its training documents")
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "macro_f1": float(np.mean(f1s)),
            "macro_f1_std": float(np.std(f1s)), "majority_accuracy": float(np.mean(maj_accs)),
            "majority_f1": float(np.mean(maj_f1s))}


def _select_categories(data: ProbeData, categories: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    if not categories:
        return data.labels, list(data.categories)
    unknown = [c for c in categories if c not in data.categories]
    if unknown:
        raise ConfigError(f"unknown categories {unknown}; known: {', '.join(data.categories)}")
    idx = [data.categories.index(c) for c in categories]
    return data.labels[:, idx], list(categories)


def linear_probes(data: ProbeData, *, include_none: bool = False, n_splits: int = 3, seed: int = 0, C: float = 1.0,
                  max_iter: int = 300, control: bool = True, categories: Sequence[str] | None = None,
                  progress: Callable[[], None] | None = None) -> Any:
    """A probe per layer (see the module docstring); returns a DataFrame, one row per layer.

    Args:
        categories: the classes (a subset of ``data.categories``; tokens of other categories are then treated as
            unlabelled). None = all.
    """
    import pandas as pd

    labels, cats = _select_categories(data, categories)
    y_all, names = single_labels(labels, cats, include_none=include_none)
    keep = y_all >= 0
    y, groups = y_all[keep], data.doc_ids[keep]
    rng = np.random.default_rng(seed)
    y_control = rng.permutation(y)
    present = [names[c] for c in np.unique(y)]
    rows = []
    for L, X in data.features.items():
        res = cross_validate_probe(X[keep], y, groups, n_splits=n_splits, seed=seed, C=C, max_iter=max_iter)
        row: dict[str, Any] = {"layer": L, "site": data.site, **res}
        if control:
            ctl = cross_validate_probe(X[keep], y_control, groups, n_splits=n_splits, seed=seed, C=C, max_iter=max_iter)
            row.update(control_accuracy=ctl["accuracy"], control_macro_f1=ctl["macro_f1"],
                       selectivity=res["accuracy"] - ctl["accuracy"], selectivity_f1=res["macro_f1"] - ctl["macro_f1"])
        row.update(n_tokens=int(keep.sum()), n_docs=int(len(np.unique(groups))), n_classes=len(present),
                   classes=present)
        rows.append(row)
        if progress is not None:
            progress()
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ sparse probing
def column_stats(X: np.ndarray, rows: np.ndarray | None = None, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column of ``X`` over ``rows`` (None = all), without copying ``X``."""
    w = np.zeros(X.shape[0], dtype=np.float64)
    w[slice(None) if rows is None else rows] = 1.0
    n = w.sum()
    mu = (w @ X) / n
    sq = np.empty(X.shape[1])
    for a in range(0, X.shape[1], chunk):
        part = X[:, a : a + chunk].astype(np.float64)
        sq[a : a + chunk] = w @ (part * part)
    var = np.maximum(sq / n - mu * mu, 0.0)
    return mu, np.sqrt(var)


def mean_difference(X: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None,
                    stats: tuple[np.ndarray, np.ndarray] | None = None, *, standardize: bool = True) -> np.ndarray:
    """Per column: ``mean(X[y]) - mean(X[~y])`` over ``rows``, divided by the column's standard deviation over
    ``rows`` when ``standardize`` (so neurons of layers with different activation scales compete fairly).

    Args:
        stats: precomputed :func:`column_stats` over the same rows.
    """
    rows = np.arange(X.shape[0]) if rows is None else np.asarray(rows)
    yr = y[rows].astype(bool)
    mu_all, sd_all = stats if stats is not None else column_stats(X, rows)
    n, n_pos = len(rows), int(yr.sum())
    if n_pos == 0 or n_pos == n:
        return np.zeros(X.shape[1])
    mu_pos = X[rows[yr]].astype(np.float64).mean(0)
    mu_neg = (n * mu_all - n_pos * mu_pos) / (n - n_pos)
    diff = mu_pos - mu_neg
    return diff / (sd_all + 1e-6) if standardize else diff


def default_ks(n_features: int, max_k: int = 64) -> list[int]:
    ks, k = [], 1
    while k <= min(max_k, n_features):
        ks.append(k)
        k *= 2
    return ks


def _binary_scores(y_true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score, matthews_corrcoef

    return float(f1_score(y_true, pred, zero_division=0)), float(matthews_corrcoef(y_true, pred))


def _f1_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """The decision threshold that maximises F1 on ``(scores, y)`` (predict positive when ``score >= t``)."""
    order = np.argsort(-scores, kind="stable")
    ys = y[order].astype(np.float64)
    tp = np.cumsum(ys)
    fp = np.cumsum(1.0 - ys)
    f1 = 2 * tp / (tp + fp + ys.sum())
    return float(scores[order][int(np.argmax(f1))])


def fit_sparse(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, *, seed: int = 0, max_iter: int = 300) -> np.ndarray:
    """Fit a class-balanced logistic regression on few features, choose the F1-optimal threshold on the training
    data, and predict ``Xte`` (bool)."""
    clf = _classifier(seed, 1.0, max_iter, balanced=True).fit(Xtr, ytr)
    thr = _f1_threshold(clf.decision_function(Xtr), ytr)
    return clf.decision_function(Xte) >= thr


@dataclass
class SparseProbeResult:
    curve: Any  # DataFrame: category, k, f1, mcc, f1_std, n_pos, neurons (top-k on all data, "L.N")
    best: Any  # DataFrame: category, layer, neuron, mean_diff, f1, mcc (the k = 1 neuron)
    units: list[tuple[int, int]]  # feature index -> (layer, neuron)


def stack_units(data: ProbeData) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """All layers' features side by side ``[N, layers * d]`` and the ``(layer, unit)`` of each column."""
    layers = sorted(data.features)
    X = np.concatenate([data.features[L] for L in layers], axis=1)
    units = [(L, j) for L in layers for j in range(data.features[L].shape[1])]
    return X, units


def sparse_probe(data: ProbeData, *, ks: Sequence[int] | None = None, n_splits: int = 3, seed: int = 0,
                 min_positive: int = 10, max_iter: int = 300, categories: Sequence[str] | None = None,
                 progress: Callable[[], None] | None = None) -> SparseProbeResult:
    """Sparse probing over the neurons of all collected layers (module docstring); ``categories`` limits the
    categories probed (None = all)."""
    import pandas as pd

    _select_categories(data, categories)  # checks the names

    X, units = stack_units(data)
    ks = sorted(set(ks or default_ks(X.shape[1])))
    if not ks or ks[0] < 1:
        raise ConfigError("k values must be positive integers")
    ks = [k for k in ks if k <= X.shape[1]]
    groups = data.doc_ids
    folds = list(_folds(groups, n_splits).split(X, groups=groups))
    fold_stats = [column_stats(X, train) for train, _ in folds]
    full_stats = column_stats(X)
    curve_rows, best_rows = [], []
    for c, name in enumerate(data.categories):
        if categories and name not in categories:
            continue
        y = data.labels[:, c].astype(int)
        if y.sum() < min_positive or len(np.unique(groups[y == 1])) < 2:
            log.info("sparse probe: skipping %s (%d tokens)", name, int(y.sum()))
            continue
        per_k: dict[int, list[tuple[float, float]]] = {k: [] for k in ks}
        for (train, test), stats in zip(folds, fold_stats, strict=True):
            if y[train].sum() == 0 or y[train].sum() == len(train):
                continue
            order = np.argsort(-mean_difference(X, y, train, stats), kind="stable")
            for k in ks:
                cols = order[:k]
                pred = fit_sparse(X[np.ix_(train, cols)], y[train], X[np.ix_(test, cols)], seed=seed,
                                  max_iter=max_iter)
                per_k[k].append(_binary_scores(y[test], pred))
        full_diff = mean_difference(X, y, None, full_stats)
        full_order = np.argsort(-full_diff, kind="stable")
        for k in ks:
            if not per_k[k]:
                continue
            f1s, mccs = zip(*per_k[k], strict=True)
            curve_rows.append({"category": name, "k": k, "f1": float(np.mean(f1s)), "f1_std": float(np.std(f1s)),
                               "mcc": float(np.mean(mccs)), "n_pos": int(y.sum()),
                               "neurons": [f"{units[j][0]}.{units[j][1]}" for j in full_order[:k]]})
        if per_k[ks[0]] and ks[0] == 1:
            j = int(full_order[0])
            f1s, mccs = zip(*per_k[1], strict=True)
            best_rows.append({"category": name, "layer": units[j][0], "neuron": units[j][1],
                              "mean_diff": float(full_diff[j]), "f1": float(np.mean(f1s)), "mcc": float(np.mean(mccs))})
        if progress is not None:
            progress()
    curve = pd.DataFrame(curve_rows, columns=["category", "k", "f1", "f1_std", "mcc", "n_pos", "neurons"])
    best = pd.DataFrame(best_rows, columns=["category", "layer", "neuron", "mean_diff", "f1", "mcc"])
    return SparseProbeResult(curve, best, units)


def single_neuron_scores(data: ProbeData, category: str, neurons: Sequence[tuple[int, int]], *, n_splits: int = 3,
                         seed: int = 0) -> list[tuple[float, float]]:
    """Cross-validated ``(f1, mcc)`` of a one-neuron probe for ``category``, for each given neuron."""
    c = data.categories.index(category)
    y = data.labels[:, c].astype(int)
    folds = list(_folds(data.doc_ids, n_splits).split(y, groups=data.doc_ids))
    out = []
    for layer, neuron in neurons:
        x = data.features[layer][:, [neuron]]
        scores = [_binary_scores(y[te], fit_sparse(x[tr], y[tr], x[te], seed=seed))
                  for tr, te in folds if 0 < y[tr].sum() < len(tr)]
        out.append((float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores])))
                   if scores else (float("nan"), float("nan")))
    return out


def compare_with_hunt(data: ProbeData, result: SparseProbeResult, neurons: Any, *, n_splits: int = 3,
                      seed: int = 0) -> Any:
    """Compare each category's best single neuron (k = 1) with the hunt's monosemantic neurons for it.

    Args:
        neurons: the hunt's ``neurons.parquet`` (needs ``layer, neuron, verdict, top_category``).

    Returns:
        a DataFrame: category, probe_best (``L.N``), probe_f1, n_hunt (monosemantic neurons claimed for the
        category among the probed layers), probe_best_is_hunt, hunt_best (the hunt neuron ranked highest by mean
        difference), hunt_best_rank (its rank among all probed neurons, 1 = best), hunt_best_f1.
    """
    import pandas as pd

    need = {"layer", "neuron", "verdict", "top_category"}
    if not need <= set(neurons.columns):
        raise ConfigError(f"neurons.parquet lacks hunt columns {sorted(need - set(neurons.columns))}; run the hunt")
    X, units = stack_units(data)
    col = {u: i for i, u in enumerate(units)}
    stats = column_stats(X)
    rows = []
    for _, b in result.best.iterrows():
        cat = b["category"]
        hunt = neurons[(neurons.verdict == "monosemantic") & (neurons.top_category == cat)]
        claimed = [(int(r.layer), int(r.neuron)) for r in hunt.itertuples() if (int(r.layer), int(r.neuron)) in col]
        row: dict[str, Any] = {"category": cat, "probe_best": f"{b['layer']}.{b['neuron']}", "probe_f1": b["f1"],
                               "n_hunt": len(claimed),
                               "probe_best_is_hunt": (int(b["layer"]), int(b["neuron"])) in set(claimed),
                               "hunt_best": None, "hunt_best_rank": np.nan, "hunt_best_f1": np.nan}
        if claimed:
            y = data.labels[:, data.categories.index(cat)].astype(int)
            diff = mean_difference(X, y, None, stats)
            rank = (-diff).argsort(kind="stable").argsort(kind="stable")
            best = min(claimed, key=lambda u: rank[col[u]])
            row.update(hunt_best=f"{best[0]}.{best[1]}", hunt_best_rank=int(rank[col[best]]) + 1,
                       hunt_best_f1=single_neuron_scores(data, cat, [best], n_splits=n_splits, seed=seed)[0][0])
        rows.append(row)
    return pd.DataFrame(rows)
