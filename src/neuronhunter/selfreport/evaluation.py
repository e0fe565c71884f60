"""Held-out evaluation of a self-report predictor against baselines, and drift of the target neuron.

Every predictor and baseline yields a continuous *score* (activation units) and a *bin* (the quantile classes of
the training targets), so all are scored the same way on the test split:

* regression view: Pearson and Spearman correlation, R^2 (``1 - SSE / SST`` on the test targets; a constant
  prediction of the test mean scores 0, anything worse is negative), MAE;
* classification view: accuracy and macro-F1 over the bins.

Baselines, fitted on the same training tokens as the predictor:

* ``mean``: the mean training target (and the majority bin);
* ``token``: a bag of current tokens: the mean training target of the current token id (the global mean for ids
  never seen in training), and its majority bin;
* ``probe``: a linear probe on the *frozen* model's residual stream at the read layer (features computed before
  fine-tuning): ridge regression for the regression head, multinomial logistic regression otherwise, its
  regularisation chosen on the validation split.

*Drift.* Unfreezing the blocks that compute the target neuron can change the very activation being reported.
:func:`activation_drift` recomputes the neuron on the test windows with the fine-tuned weights and compares it
with the recorded (pre-training) values; the report also scores the predictor against the *current* neuron.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from ..models import HookedModel, Site
from .dataset import SplitTensors, trailing_max
from .predictor import Predictions, TargetCodec

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- metrics
def regression_metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman, R^2, MAE and RMSE of scores ``s`` against targets ``y`` (NaN where undefined)."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    out = {"pearson": float("nan"), "spearman": float("nan"), "r2": float("nan"), "mae": float("nan"),
           "rmse": float("nan")}
    if y.size == 0:
        return out
    out["mae"] = float(np.abs(y - s).mean())
    out["rmse"] = float(np.sqrt(((y - s) ** 2).mean()))
    sst = float(((y - y.mean()) ** 2).sum())
    if sst > 0:
        out["r2"] = 1.0 - float(((y - s) ** 2).sum()) / sst
    if y.size > 1 and np.ptp(s) > 0 and np.ptp(y) > 0:
        out["pearson"] = float(np.corrcoef(y, s)[0, 1])
        from scipy.stats import spearmanr

        out["spearman"] = float(spearmanr(y, s).statistic)
    return out


def classification_metrics(true: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (averaged over the bins present in the truth or the predictions)."""
    from sklearn.metrics import f1_score

    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if true.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    labels = sorted(set(true.tolist()) | set(pred.tolist()))
    return {
        "accuracy": float((true == pred).mean()),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
    }


def score(y: np.ndarray, s: np.ndarray, cls: np.ndarray, codec: TargetCodec) -> dict[str, float]:
    """Both metric families for one predictor or baseline."""
    return {**regression_metrics(y, s), **classification_metrics(codec.classes_np(y), cls, codec.n_classes)}


# --------------------------------------------------------------------------------------------------- baselines
def mean_baseline(train_y: np.ndarray, n: int, codec: TargetCodec) -> Predictions:
    cls = codec.classes_np(train_y)
    majority = int(np.bincount(cls, minlength=codec.n_classes).argmax())
    return Predictions(np.full(n, float(np.mean(train_y))), np.full(n, majority, dtype=np.int64))


def token_baseline(train_tokens: np.ndarray, train_y: np.ndarray, test_tokens: np.ndarray,
                   codec: TargetCodec) -> Predictions:
    """Per current-token mean target (and majority bin) from the training tokens; unseen ids get the global ones."""
    import pandas as pd

    df = pd.DataFrame({"tok": train_tokens, "y": train_y, "c": codec.classes_np(train_y)})
    means = df.groupby("tok")["y"].mean()
    majority = df.groupby("tok")["c"].agg(lambda c: np.bincount(c).argmax())
    glob_mean = float(np.mean(train_y))
    glob_cls = int(np.bincount(df["c"].to_numpy(), minlength=codec.n_classes).argmax())
    test = pd.Series(test_tokens)
    s = test.map(means).fillna(glob_mean).to_numpy(dtype=np.float64)
    c = test.map(majority).fillna(glob_cls).to_numpy().astype(np.int64)
    return Predictions(s, c)


def probe_baseline(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   test_x: np.ndarray, codec: TargetCodec, *, kind: str, alphas: list[float],
                   seed: int = 0) -> tuple[Predictions, dict[str, Any]]:
    """A linear probe on frozen features; ``kind`` ``regression`` (ridge) or anything else (logistic)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    xtr, xva, xte = (scaler.transform(x) for x in (train_x, val_x, test_x))
    if kind == "regression":
        best = None
        for alpha in alphas:
            model = Ridge(alpha=alpha).fit(xtr, train_y)
            err = float(((model.predict(xva) - val_y) ** 2).mean())
            if best is None or err < best[0]:
                best = (err, alpha, model)
        assert best is not None
        s = best[2].predict(xte)
        return Predictions(s, codec.classes_np(s)), {"type": "ridge", "alpha": best[1], "val_mse": best[0]}
    ytr, yva = codec.classes_np(train_y), codec.classes_np(val_y)
    values = np.asarray(codec.class_values)
    if len(np.unique(ytr)) < 2:
        p = mean_baseline(train_y, len(test_x), codec)
        return p, {"type": "constant", "reason": "one class in training"}
    best = None
    for alpha in alphas:
        model = LogisticRegression(C=1.0 / alpha, max_iter=500, random_state=seed).fit(xtr, ytr)
        acc = float((model.predict(xva) == yva).mean())
        if best is None or acc > best[0]:
            best = (acc, alpha, model)
    assert best is not None
    model = best[2]
    probs = np.zeros((len(xte), codec.n_classes))
    probs[:, model.classes_] = model.predict_proba(xte)
    return (Predictions(probs @ values, probs.argmax(1), probs),
            {"type": "logistic", "alpha": best[1], "val_accuracy": best[0]})


# --------------------------------------------------------------------------------------------------- drift
@torch.no_grad()
def neuron_activations(hooked: HookedModel, split: SplitTensors, layer: int, neuron: int,
                       *, batch_size: int = 16) -> torch.Tensor:
    """The neuron's activation at every position of ``split`` with the model's current weights ``[windows, pos]``."""
    site = Site.mlp_post(layer)
    out = []
    for i in range(0, len(split), batch_size):
        _, cache = hooked.run_with_cache(split.input_ids[i : i + batch_size], split.attention_mask[i : i + batch_size],
                                         sites=[site], stop_at_layer=layer + 1)
        out.append(cache[site][..., neuron].float().cpu())
    return torch.cat(out)


def activation_drift(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """How much the neuron moved: correlation, mean absolute change (absolute and relative to the std), moments."""
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    diff = np.abs(after - before)
    std = float(before.std())
    pearson = float(np.corrcoef(before, after)[0, 1]) if before.size > 1 and std > 0 and after.std() > 0 else float("nan")
    return {
        "pearson_before_after": pearson,
        "mean_abs_change": float(diff.mean()) if diff.size else float("nan"),
        "max_abs_change": float(diff.max()) if diff.size else float("nan"),
        "relative_change": float(diff.mean() / std) if std > 0 and diff.size else float("nan"),
        "mean_before": float(before.mean()) if before.size else float("nan"),
        "mean_after": float(after.mean()) if after.size else float("nan"),
        "std_before": std,
        "std_after": float(after.std()) if after.size else float("nan"),
    }


def current_targets(after: torch.Tensor, split: SplitTensors, target: str, window: int) -> np.ndarray:
    """Targets recomputed from the current activations ``after`` ``[windows, pos]`` at the selected positions."""
    vals = after.numpy().astype(np.float64)
    if target == "window_max":
        masked = np.where(split.attention_mask.numpy() > 0, vals, -np.inf)
        masked[:, 0] = -np.inf
        vals = trailing_max(masked, window)
    return vals[split.selected.numpy()]


def summarize(metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Differences predictor - baseline for the headline numbers (NaN-safe)."""
    out: dict[str, Any] = {}
    pred = metrics.get("predictor", {})
    for name, base in metrics.items():
        if name == "predictor":
            continue
        out[name] = {}
        for key in ("pearson", "r2", "mae", "accuracy", "macro_f1"):
            a, b = pred.get(key), base.get(key)
            ok = isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b)
            out[name][key] = a - b if ok else float("nan")
    return out
