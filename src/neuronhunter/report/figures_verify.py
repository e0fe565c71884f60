"""Plotly figures for verification and circuits: patching, attention, head scores, induction, probes, ablations.

Each function takes analysis results and returns a :class:`plotly.graph_objects.Figure` (no I/O here); the CLI
writes them as self-contained offline HTML.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def _tok_labels(tokens: list[str]) -> list[str]:
    """Unique, readable axis labels for tokens (plotly merges equal category labels)."""
    return [f"{i}:{t!r}"[:24] for i, t in enumerate(tokens)]


def patching_figure(result: Any) -> Any:
    """Heatmaps of a :class:`~neuronhunter.causal.patching.PatchingResult`: layer × position and layer × head."""
    from plotly.subplots import make_subplots

    go = _go()
    has_heads = result.heads is not None
    fig = make_subplots(rows=1, cols=2 if has_heads else 1, column_widths=[0.65, 0.35] if has_heads else None,
                        subplot_titles=["residual stream (resid_pre) per layer × position",
                                        "attention head outputs (all positions)"][: 2 if has_heads else 1],
                        horizontal_spacing=0.12)
    lim = float(np.nanmax(np.abs(result.resid.numpy()))) if result.resid.numel() else 1.0
    if has_heads:
        lim = max(lim, float(np.nanmax(np.abs(result.heads.numpy()))))
    lim = lim if np.isfinite(lim) and lim > 0 else 1.0
    common = {"colorscale": "RdBu", "zmid": 0.0, "zmin": -lim, "zmax": lim}
    fig.add_trace(go.Heatmap(z=result.resid.numpy(), x=_tok_labels(result.clean_tokens),
                             y=[str(L) for L in result.layers], colorbar={"title": "restored", "x": 1.02},
                             hovertemplate="layer %{y}<br>%{x}<br>restored %{z:.3f}<extra></extra>", **common), 1, 1)
    if has_heads:
        fig.add_trace(go.Heatmap(z=result.heads.numpy(), x=[f"H{h}" for h in range(result.heads.shape[1])],
                                 y=[str(L) for L in result.layers], showscale=False,
                                 hovertemplate="layer %{y} %{x}<br>restored %{z:.3f}<extra></extra>", **common), 1, 2)
    fig.update_yaxes(title_text="layer", autorange="reversed")
    fig.update_layout(title=f"Activation patching: clean → corrupted, metric logit({result.answer!r}) − "
                            f"logit({result.wrong!r}); clean {result.clean_metric:.2f}, corrupted "
                            f"{result.corrupted_metric:.2f} (1 = fully restored)",
                      height=max(400, 22 * len(result.layers) + 150))
    return fig


def attention_figure(patterns: Any, *, title: str | None = None) -> Any:
    """Interactive attention heatmaps of an :class:`~neuronhunter.analysis.heads.AttentionPatterns`: one head at a
    time, chosen from a dropdown (``layer.head``)."""
    go = _go()
    labels = _tok_labels(patterns.tokens)
    n_layers, n_heads = patterns.pattern.shape[:2]
    fig = go.Figure()
    buttons = []
    n = n_layers * n_heads
    for i, L in enumerate(patterns.layers):
        for h in range(n_heads):
            k = i * n_heads + h
            fig.add_trace(go.Heatmap(z=patterns.pattern[i, h], x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                                     visible=k == 0, name=f"{L}.{h}",
                                     hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"))
            vis = [False] * n
            vis[k] = True
            buttons.append({"label": f"L{L} H{h}", "method": "update",
                            "args": [{"visible": vis}, {"title": f"Attention pattern, layer {L} head {h}"}]})
    fig.update_layout(
        title=title or f"Attention pattern, layer {patterns.layers[0]} head 0",
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15,
                      "showactive": True}],
        xaxis={"title": "key (attended to)", "tickangle": -60}, yaxis={"title": "query", "autorange": "reversed"},
        height=max(500, 18 * len(labels) + 250), width=max(600, 18 * len(labels) + 300),
    )
    return fig


def head_scores_figure(scores: Any, *, score_names: tuple[str, ...] = ("induction", "prev_token", "duplicate_token",
                                                                       "bos_sink", "entropy")) -> Any:
    """Layer × head heatmap of head scores (a DataFrame from :func:`~neuronhunter.analysis.heads.head_scores`),
    one score at a time (buttons)."""
    go = _go()
    layers = sorted(scores.layer.unique())
    heads = sorted(scores["head"].unique())
    names = [s for s in score_names if s in scores.columns and scores[s].notna().any()]
    fig = go.Figure()
    buttons = []
    for i, s in enumerate(names):
        grid = scores.pivot(index="layer", columns="head", values=s).reindex(index=layers, columns=heads).to_numpy()
        fig.add_trace(go.Heatmap(z=grid, x=[f"H{h}" for h in heads], y=[str(L) for L in layers], visible=i == 0,
                                 colorscale="Viridis", colorbar={"title": s}, name=s,
                                 hovertemplate=f"layer %{{y}} %{{x}}<br>{s} %{{z:.3f}}<extra></extra>"))
        buttons.append({"label": s, "method": "update",
                        "args": [{"visible": [j == i for j in range(len(names))]}, {"title": f"Head scores: {s}"}]})
    fig.update_layout(title=f"Head scores: {names[0] if names else ''}", yaxis={"title": "layer", "autorange": "reversed"},
                      xaxis={"title": "head"}, height=max(400, 20 * len(layers) + 150),
                      updatemenus=[{"buttons": buttons, "type": "buttons", "direction": "right", "x": 0, "y": 1.12,
                                    "xanchor": "left"}])
    return fig


def induction_curve_figure(result: Any) -> Any:
    """Per-position loss on repeated random tokens (an :class:`~neuronhunter.analysis.heads.InductionResult`)."""
    go = _go()
    c = result.loss_curve
    fig = go.Figure()
    for half, color in (("first", "#888"), ("second", "#d62728")):
        part = c[c.half == half]
        fig.add_trace(go.Scatter(x=part.position, y=part.loss, mode="lines+markers", name=f"{half} copy",
                                 line={"color": color}, marker={"size": 4}))
    fig.update_layout(title=f"Induction loss curve: random tokens repeated twice; mean loss first copy "
                            f"{result.first_half_loss:.2f}, second copy {result.second_half_loss:.2f} nats",
                      xaxis={"title": "position of the predicted token"}, yaxis={"title": "loss (nats)"})
    return fig


def probe_curve_figure(df: Any) -> Any:
    """Probe accuracy and macro-F1 per layer vs the majority baseline and the shuffled-label control."""
    go = _go()
    fig = go.Figure()
    x = df.layer
    fig.add_trace(go.Scatter(x=x, y=df.accuracy, mode="lines+markers", name="probe accuracy",
                             error_y={"array": df.accuracy_std, "visible": True}))
    fig.add_trace(go.Scatter(x=x, y=df.macro_f1, mode="lines+markers", name="probe macro-F1"))
    fig.add_trace(go.Scatter(x=x, y=df.majority_accuracy, mode="lines", name="majority accuracy",
                             line={"dash": "dash", "color": "#888"}))
    if "control_accuracy" in df.columns:
        fig.add_trace(go.Scatter(x=x, y=df.control_accuracy, mode="lines+markers", name="control (shuffled) accuracy",
                                 line={"dash": "dot"}))
        fig.add_trace(go.Scatter(x=x, y=df.control_macro_f1, mode="lines", name="control macro-F1",
                                 line={"dash": "dot"}))
    site = df.site.iloc[0] if len(df) else ""
    fig.update_layout(title=f"Linear probes per layer ({site}), cross-validated by document",
                      xaxis={"title": "layer"}, yaxis={"title": "score", "range": [0, 1.02]})
    return fig


def sparse_probe_figure(curve: Any) -> Any:
    """F1 vs k (log2 axis) per category for sparse probing."""
    go = _go()
    fig = go.Figure()
    for cat, g in curve.groupby("category"):
        fig.add_trace(go.Scatter(x=g.k, y=g.f1, mode="lines+markers", name=str(cat),
                                 customdata=np.stack([g.mcc], -1),
                                 hovertemplate="k=%{x}<br>F1 %{y:.3f}<br>MCC %{customdata[0]:.3f}<extra>%{fullData.name}</extra>"))
    fig.update_layout(title="Sparse probing: F1 vs number of neurons k (held-out documents)",
                      xaxis={"title": "k (neurons)", "type": "log", "dtick": np.log10(2)},
                      yaxis={"title": "F1", "range": [0, 1.02]})
    return fig


def ablation_figure(by_category: Any, summary: dict[str, Any], label: str = "") -> Any:
    """Loss increase per concept category from an ablation, vs the increase on the other tokens."""
    go = _go()
    df = by_category[by_category.n_tokens > 0]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=df.category, y=df.delta_loss, name="category tokens",
                         customdata=np.stack([df.n_tokens], -1),
                         hovertemplate="%{x}<br>Δloss %{y:.4f}<br>%{customdata[0]} tokens<extra></extra>"))
    fig.add_trace(go.Bar(x=df.category, y=df.delta_other, name="other tokens"))
    fig.add_hline(y=summary.get("delta_loss", 0.0), line_dash="dash", annotation_text="all tokens")
    fig.update_layout(title=f"Ablation {label}: next-token loss increase (nats) by category", barmode="group",
                      yaxis={"title": "Δ loss (nats)"})
    return fig


def verification_figure(results: Any) -> Any:
    """Causal verification of many claims (a ``verification.parquet`` table): each claim's mean effect against the
    mean effect of its matched null neurons (confirmed claims in green), and the distribution of p-values (flat
    where claims are null, piled up near 0 where they hold)."""
    from plotly.subplots import make_subplots

    go = _go()
    df = results[results.p_value.notna()].reset_index(drop=True)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=["claim vs matched null neurons (mean Δloss, nats)", "p-values"])
    labels = [f"{r.layer}.{r.neuron}{r.direction} {r.claim}"[:60] for r in df.itertuples()]
    for confirmed, color, name in ((True, "#2ca02c", "confirmed"), (False, "#d62728", "not confirmed")):
        part = df.causally_confirmed.to_numpy() == confirmed
        fig.add_trace(go.Scatter(
            x=df.null_neuron_mean[part], y=df.causal_effect[part], mode="markers", name=name,
            marker={"color": color, "size": 6, "opacity": 0.7},
            text=[labels[i] for i in np.flatnonzero(part)],
            customdata=np.stack([df.p_value[part], df.q_value[part], df.n_tokens[part]], -1),
            hovertemplate="%{text}<br>effect %{y:.4f}, nulls %{x:.4f}<br>p %{customdata[0]:.3g} q %{customdata[1]:.3g}"
                          "<br>%{customdata[2]} tokens<extra></extra>"), 1, 1)
    if len(df):
        lo = float(min(df.null_neuron_mean.min(), df.causal_effect.min()))
        hi = float(max(df.null_neuron_mean.max(), df.causal_effect.max()))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dash", "color": "#888"},
                                 name="effect = null", showlegend=False), 1, 1)
    fig.add_trace(go.Histogram(x=df.p_value, xbins={"start": 0.0, "end": 1.0, "size": 0.05}, name="p-values",
                               marker_color="#1f77b4", showlegend=False), 1, 2)
    fig.update_xaxes(title_text="matched null neurons", row=1, col=1)
    fig.update_yaxes(title_text="claimed neuron", row=1, col=1)
    fig.update_xaxes(title_text="p = max(p_neuron, p_token)", row=1, col=2)
    n_conf = int(df.causally_confirmed.sum())
    fig.update_layout(title=f"Causal verification: {n_conf} of {len(df)} tested claims confirmed (BH q ≤ alpha)",
                      height=520)
    return fig
