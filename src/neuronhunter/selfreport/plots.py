"""Figures of a self-report run (Plotly, written as self-contained offline HTML).

* :func:`scatter_figure`: predicted vs true activation on the test split (predictor and linear probe), with the
  identity line.
* :func:`trace_figure`: per-token traces for a few test windows (those where the neuron fires most): the true
  activation, the prediction and the baselines along the text, token strings on hover and as tick labels.
* :func:`training_figure`: training and validation loss against the optimizer step.

Figures are built from data frames (no I/O); :func:`write_html` writes one atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_path

COLORS = {"truth": "#222222", "predictor": "#d62728", "probe": "#1f77b4", "token": "#2ca02c", "mean": "#999999"}


def scatter_figure(pred: Any, *, title: str, max_points: int = 20000, seed: int = 0) -> Any:
    """Prediction vs truth on the test tokens (``pred``: the predictions frame)."""
    import plotly.graph_objects as go

    df = pred
    if len(df) > max_points:
        df = df.sample(max_points, random_state=seed)
    fig = go.Figure()
    hover = "token %{customdata[0]!r}<br>truth %{x:.3f}<br>prediction %{y:.3f}<extra></extra>"
    custom = np.stack([df["token"].astype(str).to_numpy()], axis=1)
    fig.add_trace(go.Scattergl(x=df["target"], y=df["pred"], mode="markers", name="predictor",
                               marker={"size": 4, "opacity": 0.5, "color": COLORS["predictor"]},
                               customdata=custom, hovertemplate=hover))
    if "probe" in df.columns:
        fig.add_trace(go.Scattergl(x=df["target"], y=df["probe"], mode="markers", name="linear probe (frozen)",
                                   marker={"size": 4, "opacity": 0.4, "color": COLORS["probe"]},
                                   customdata=custom, hovertemplate=hover, visible="legendonly"))
    lo = float(np.nanmin([df["target"].min(), df["pred"].min()])) if len(df) else 0.0
    hi = float(np.nanmax([df["target"].max(), df["pred"].max()])) if len(df) else 1.0
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line={"color": "#888", "dash": "dash"}, hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title="true target (held-out test tokens)", yaxis_title="predicted",
                      template="plotly_white", height=600)
    return fig


def trace_figure(pred: Any, *, title: str, n_windows: int = 4) -> Any:
    """Per-token traces of the test windows with the largest true target."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = pred
    if n_windows <= 0 or df.empty:
        return go.Figure(layout={"title": title})
    top = df.groupby("window_id")["target"].max().sort_values(ascending=False).index[:n_windows].tolist()
    fig = make_subplots(rows=len(top), cols=1, shared_xaxes=False, vertical_spacing=0.12 / max(1, len(top)),
                        subplot_titles=[f"test window {w}" for w in top])
    series = [("target", "truth", COLORS["truth"], None), ("pred", "predictor", COLORS["predictor"], None),
              ("probe", "linear probe", COLORS["probe"], "dot"), ("token_bag", "token baseline", COLORS["token"], "dot"),
              ("mean", "mean baseline", COLORS["mean"], "dash")]
    for row, wid in enumerate(top, start=1):
        w = df[df["window_id"] == wid].sort_values("position")
        tokens = w["token"].astype(str).to_numpy()
        for col, name, color, dash in series:
            if col not in w.columns:
                continue
            fig.add_trace(go.Scatter(x=w["position"], y=w[col], mode="lines+markers" if col == "target" else "lines",
                                     name=name, legendgroup=name, showlegend=row == 1,
                                     line={"color": color, "dash": dash}, customdata=tokens,
                                     hovertemplate=f"{name}: %{{y:.3f}}<br>token %{{customdata!r}}<extra></extra>"),
                          row=row, col=1)
        ticks = w["position"].to_numpy()
        fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=[t.replace("\n", "⏎")[:12] for t in tokens],
                         tickangle=-60, tickfont={"size": 9}, row=row, col=1)
    fig.update_layout(title=title, template="plotly_white", height=320 * len(top) + 120,
                      hovermode="x unified")
    return fig


def training_figure(history: list[dict[str, Any]], *, title: str) -> Any:
    """Training (per step) and validation (per evaluation) loss."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for split, color in (("train", "#ff7f0e"), ("val", "#1f77b4")):
        rows = [r for r in history if r.get("split") == split]
        fig.add_trace(go.Scatter(x=[r["step"] for r in rows], y=[r["loss"] for r in rows], name=f"{split} loss",
                                 mode="lines+markers" if split == "val" else "lines", line={"color": color}))
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="loss", template="plotly_white",
                      height=450)
    return fig


def write_html(fig: Any, path: str | Path) -> Path:
    """Write a self-contained (offline) HTML file atomically."""
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return Path(path)
