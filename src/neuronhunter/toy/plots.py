"""Matplotlib figures of the toy experiments (PNG files, written atomically).

matplotlib is imported inside the functions and only the object-oriented ``Figure`` API is used (no pyplot), so
no global backend state is touched and importing this module is cheap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_path
from .lines import COLORS, ORIENTATIONS, LinesData

_VERDICT_COLOR = {"mono": "tab:green", "poly": "tab:red", "dead": "tab:gray"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


# --------------------------------------------------------------------------------------------------- monopoly


def plot_line_samples(data: LinesData, task: str, path: str | Path, n: int = 24, cols: int = 8) -> Path:
    """A grid of the first ``n`` images titled with their features and their class label under ``task``."""
    n = min(n, len(data))
    rows = math.ceil(n / cols)
    fig = _figure(cols * 1.35, rows * 1.55)
    labels = data.labels(task)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(data.images[i].detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        o, c = ORIENTATIONS[int(data.orientation[i])][0].upper(), COLORS[int(data.color[i])]
        ax.set_title(f"{o} {c} → {int(labels[i]) + 1}", fontsize=7)
        ax.set_axis_off()
    what = (
        "orientation (1 = vertical, 2 = horizontal)"
        if task == "orientation"
        else ("XOR (1 = V+red or H+blue, 2 = V+blue or H+red)")
    )
    fig.suptitle(f"Test samples, labels for {what}", fontsize=9)
    return _save(fig, path)


def weight_image(w: Tensor) -> Tensor:
    """One neuron's 3072 incoming weights as an ``[32, 32, 3]`` image: 0.5 + 0.5·w/max|w| per neuron (grey = 0)."""
    w = w.detach().float().cpu().reshape(3, 32, 32)
    scale = w.abs().max().clamp(min=1e-12)
    return (0.5 + 0.5 * w / scale).permute(1, 2, 0)


def plot_neuron_weights(
    weights: list[tuple[int, Tensor, list[str]]], path: str | Path, title: str = "Incoming weights"
) -> Path:
    """One row per seed, one panel per hidden neuron: its 32×32×3 incoming weights, titled with its verdict.

    Args:
        weights: ``(seed, fc1.weight [hidden, 3072], verdicts)`` per seed.
        path: output PNG.
        title: figure title.
    """
    rows = len(weights)
    cols = max(w.shape[0] for _, w, _ in weights)
    fig = _figure(cols * 1.1 + 0.6, rows * 1.25 + 0.5)
    for r, (seed, w, verdicts) in enumerate(weights):
        for c in range(w.shape[0]):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            ax.imshow(weight_image(w[c]).numpy(), interpolation="nearest")
            ax.set_title(f"n{c} {verdicts[c]}", fontsize=7, color=_VERDICT_COLOR.get(verdicts[c], "black"))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"seed {seed}", fontsize=8)
    fig.suptitle(f"{title} (R, G, B channels; grey = 0, bright = positive, dark = negative)", fontsize=9)
    return _save(fig, path)


def _global_x(df: Any) -> Any:
    e1 = int(df.loc[df.phase == 1, "epoch"].max())
    return df.epoch + (df.phase - 1) * e1


def _band(ax: Any, df: Any, col: str, label: str, color: str | None = None) -> None:
    g = df.assign(x=_global_x(df)).groupby(["phase", "x"])[col]
    stats = g.agg(["mean", "std"]).reset_index()
    for phase, part in stats.groupby("phase"):
        kw = {"label": label if phase == 1 else None, "color": color}
        line = ax.plot(part.x, part["mean"], **kw)[0]
        color = line.get_color()
        ax.fill_between(
            part.x,
            part["mean"] - part["std"].fillna(0),
            part["mean"] + part["std"].fillna(0),
            alpha=0.2,
            color=color,
        )


def _phase_line(ax: Any, df: Any) -> None:
    ax.axvline(int(df.loc[df.phase == 1, "epoch"].max()), color="black", ls=":", lw=1)


def plot_monopoly_metrics(
    history: Any,
    neurons: Any,
    hypotheses: dict[str, Any],
    folder: str | Path,
    poly_threshold: float | None = None,
) -> list[Path]:
    """The ``metrics_*.png`` figures of the mono-to-poly run.

    * ``metrics_training.png``: train/test loss and accuracy (mean ± std over seeds; dotted line = phase switch).
    * ``metrics_selectivity.png``: neuron counts by verdict and each neuron's CRS over epochs (first seed).
    * ``metrics_weights.png``: mean weight entropy, mean L2 norm and mean pairwise angle over epochs.
    * ``metrics_hypotheses.png``: the per-seed values behind H1–H3.
    """
    folder = Path(folder)
    paths = []

    fig = _figure(10, 3.4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
        _band(ax1, history, f"{split}_loss", split, color)
        _band(ax2, history, f"{split}_acc", split, color)
    for ax, name in ((ax1, "cross-entropy loss"), (ax2, "accuracy")):
        _phase_line(ax, history)
        ax.set_xlabel("epoch (phase 1 | phase 2 XOR)")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    fig.suptitle("Training (mean ± std over seeds)", fontsize=10)
    paths.append(_save(fig, folder / "metrics_training.png"))

    fig = _figure(10, 3.4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for col, color in (("n_mono", "tab:green"), ("n_poly", "tab:red"), ("n_dead", "tab:gray")):
        _band(ax1, history, col, col[2:], color)
    _phase_line(ax1, history)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("neurons")
    ax1.set_title("Neurons by verdict (mean ± std over seeds)", fontsize=9)
    ax1.legend(fontsize=8)
    first = neurons[neurons.seed == neurons.seed.min()]
    first = first.assign(x=_global_x(first))
    for neuron, part in first.groupby("neuron"):
        for _, ph in part.groupby("phase"):
            ax2.plot(
                ph.x,
                ph.crs,
                lw=1,
                color=f"C{int(neuron) % 10}",
                label=f"n{neuron}" if ph.phase.iloc[0] == 1 else None,
            )
    if poly_threshold is not None:
        ax2.axhline(poly_threshold, color="black", ls="--", lw=1)
    _phase_line(ax2, first)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("CRS over (V, H, red, blue)")
    ax2.set_title(f"Per-neuron CRS, seed {int(first.seed.iloc[0])} (dashed: poly threshold)", fontsize=9)
    ax2.legend(fontsize=6, ncol=2)
    paths.append(_save(fig, folder / "metrics_selectivity.png"))

    fig = _figure(13, 3.4)
    for i, (col, name) in enumerate(
        (
            ("mean_weight_entropy", "mean weight entropy (nats)"),
            ("mean_l2_norm", "mean L2 norm"),
            ("mean_pairwise_angle", "mean pairwise angle (°)"),
        )
    ):
        ax = fig.add_subplot(1, 3, i + 1)
        _band(ax, history, col, name)
        _phase_line(ax, history)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
    fig.suptitle("Incoming-weight metrics of the hidden neurons (mean ± std over seeds)", fontsize=10)
    paths.append(_save(fig, folder / "metrics_weights.png"))

    fig = _figure(13, 3.6)
    for i, key in enumerate(("H1", "H2")):
        h = hypotheses[key]
        ax = fig.add_subplot(1, 3, i + 1)
        columns = [(h["states"], [p["diff"] for p in h["per_seed"]])]
        columns += [(name, alt["per_seed_diff"]) for name, alt in h.get("alternatives", {}).items()]
        for x, (_, diffs) in enumerate(columns):
            ys = [float("nan") if d is None else d for d in diffs]
            ax.plot([x] * len(ys), ys, "o", color="tab:blue" if x == 0 else "0.5", alpha=0.8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(columns)), [c[0].replace("_", " ") for c in columns], fontsize=7)
        ax.set_ylabel(f"{h['metric']}: mean(poly) − mean(mono)")
        ax.set_title(f"{key}: {h['verdict']} (p = {_fmt(h['p'])}; blue = judged)", fontsize=9)
    h = hypotheses["H3"]
    ax = fig.add_subplot(1, 3, 3)
    for s in h["per_seed"]:
        ax.plot([1, 2], [s["angle_phase1"], s["angle_phase2"]], marker="o", label=f"seed {s['seed']}")
    ax.set_xticks([1, 2], ["end phase 1", "end phase 2"])
    ax.set_xlim(0.6, 2.4)
    ax.set_ylabel("mean pairwise angle (°)")
    ax.set_title(f"H3: {h['verdict']} (p = {_fmt(h['p'])})", fontsize=9)
    ax.legend(fontsize=6)
    fig.suptitle("Hypotheses: per-seed values (a point per seed)", fontsize=10)
    paths.append(_save(fig, folder / "metrics_hypotheses.png"))
    return paths


def _fmt(p: Any) -> str:
    return "n/a" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.3g}"


# -------------------------------------------------------------------------------------------------------- TMS


def plot_feature_directions(
    W: Tensor,
    sparsities: list[float],
    replicates: list[int],
    importance: Tensor,
    path: str | Path,
    cols: int = 0,
) -> Path:
    """The columns ``W_i`` of 2-D instances as arrows from the origin, one panel per instance.

    Args:
        W: ``[instances, 2, n]``.
        sparsities: sparsity of each instance.
        replicates: replicate index of each instance.
        importance: ``[n]`` feature importances (arrow colour).
        path: output PNG.
        cols: panels per row (default: the number of replicates).
    """
    from matplotlib import cm

    W = W.detach().cpu()
    n_inst, m, n = W.shape
    cols = cols or max(replicates) + 1
    rows = math.ceil(n_inst / cols)
    fig = _figure(cols * 2.2, rows * 2.3)
    imp = importance.cpu()
    colors = cm.viridis((imp - imp.min()) / (imp.max() - imp.min() + 1e-12))
    for k in range(n_inst):
        ax = fig.add_subplot(rows, cols, k + 1)
        for i in range(n):
            x, y = float(W[k, 0, i]), float(W[k, 1, i])
            ax.plot([0, x], [0, y], color=colors[i], lw=2)
            ax.plot([x], [y], "o", color=colors[i], ms=4)
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", lw=0.5)
        ax.axvline(0, color="0.85", lw=0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"S = {sparsities[k]:g}, rep {replicates[k]}", fontsize=8)
    fig.suptitle("Feature directions W_i (colour: importance, yellow = most important)", fontsize=10)
    return _save(fig, path)


def plot_norm_interference(features: Any, path: str | Path, replicate: int = 0) -> Path:
    """Per sparsity, horizontal bars of ‖W_i‖ coloured by interference Σ_j≠i (Ŵ_i·W_j)² (0 = orthogonal)."""
    from matplotlib import cm
    from matplotlib.colors import Normalize

    df = features[features.replicate == replicate]
    sparsities = sorted(df.sparsity.unique())
    n = int(df.feature.max()) + 1
    fig = _figure(1.7 * len(sparsities) + 1.2, max(2.5, 0.22 * n + 1.2))
    norm = Normalize(0, max(1.0, float(df.interference.max())))
    axes = []
    for k, s in enumerate(sparsities):
        ax = fig.add_subplot(1, len(sparsities), k + 1)
        part = df[df.sparsity == s].sort_values("feature")
        ax.barh(part.feature, part.norm, color=cm.plasma(norm(part.interference.to_numpy())))
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_yticks(range(0, n, 1 if n <= 10 else 2))
        ax.set_xlim(0, max(1.2, float(df.norm.max()) * 1.05))
        ax.set_title(f"S = {s:g}", fontsize=8)
        ax.set_xlabel("‖W_i‖", fontsize=8)
        ax.tick_params(labelsize=6)
        if k:
            ax.set_yticklabels([])
        else:
            ax.set_ylabel("feature (importance decreasing)")
        axes.append(ax)
    sm = cm.ScalarMappable(norm=norm, cmap="plasma")
    fig.colorbar(sm, ax=axes, label="interference Σ_j≠i (Ŵ_i·W_j)²", shrink=0.8)
    fig.suptitle(f"Feature norms and superposition per sparsity (replicate {replicate})", fontsize=10)
    return _save(fig, path)


def plot_dimensionality(features: Any, instances: Any, fractions: dict[str, float], path: str | Path) -> Path:
    """Dimensions per feature ``m / ‖W‖_F²`` vs ``1/(1-S)`` with each feature's dimensionality ``D_i`` scattered.

    Horizontal lines mark the fractions the paper reports (1, 3/4, 2/3, 1/2, 2/5, 3/8).
    """
    fig = _figure(11, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = 1.0 / (1.0 - instances.sparsity.clip(upper=0.99999))
    ax1.plot(x, instances.dims_per_feature, "o", ms=4, alpha=0.7)
    agg = instances.assign(x=x).groupby("x").dims_per_feature.mean()
    ax1.plot(agg.index, agg.values, "-", color="tab:blue", lw=1)
    ax1.set_xscale("log")
    ax1.set_xlabel("1 / (1 − S)")
    ax1.set_ylabel("dimensions per feature  m / ‖W‖_F²")
    for name, f in fractions.items():
        ax1.axhline(f, color="0.8", lw=0.7, ls="--")
        ax1.text(float(x.min()), f, name, fontsize=6, va="bottom", color="0.4")
    ax1.set_title("Dimensions per feature vs sparsity", fontsize=9)
    xf = 1.0 / (1.0 - features.sparsity.clip(upper=0.99999))
    jitter = torch.linspace(0.9, 1.1, 7)[torch.arange(len(features)) % 7].numpy()
    ax2.scatter(
        xf * jitter, features.dimensionality, s=8, c=features.norm.clip(0, 1.2), cmap="viridis", alpha=0.7
    )
    for name, f in fractions.items():
        ax2.axhline(f, color="0.8", lw=0.7, ls="--")
        ax2.text(float(xf.min()), f, name, fontsize=6, va="bottom", color="0.4")
    ax2.set_xscale("log")
    ax2.set_xlabel("1 / (1 − S)")
    ax2.set_ylabel("feature dimensionality D_i")
    ax2.set_title("Per-feature D_i (colour: ‖W_i‖; dashed: paper's fractions)", fontsize=9)
    return _save(fig, path)


def plot_dimensionality_hist(
    features: Any, fractions: dict[str, float], path: str | Path, min_norm: float = 0.5
) -> Path:
    """Histogram of ``D_i`` for represented features (‖W_i‖ ≥ ``min_norm``) with the paper's fractions marked."""
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    d = features.loc[features.norm >= min_norm, "dimensionality"]
    ax.hist(d, bins=60, range=(0, 1.05), color="tab:blue")
    for name, f in fractions.items():
        ax.axvline(f, color="tab:red", lw=0.8, ls="--")
        ax.text(
            f, ax.get_ylim()[1] * 0.95, name, fontsize=7, rotation=90, va="top", ha="right", color="tab:red"
        )
    ax.set_xlabel("feature dimensionality D_i")
    ax.set_ylabel(f"features with ‖W_i‖ ≥ {min_norm}")
    ax.set_title("Do dimensionalities stick to the paper's fractions?", fontsize=9)
    return _save(fig, path)
