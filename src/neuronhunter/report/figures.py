"""Plotly figures of the hunt (data in, ``plotly.graph_objects.Figure`` out; no I/O, plotly imported lazily).

* :func:`neuron_activation_figure`: a neuron's activation on every token of a text (the "activation history" used to
  check a hunt's claim by eye): one bar per token, tokens on the x axis, bars coloured by the token's concept
  category (several labels: the first category colours the bar, the hover lists all).
* :func:`layer_category_heatmap`: a layer x category heatmap (e.g. selective neurons per layer and category).

Write them with :func:`neuronhunter.report.export.write_figure` (offline HTML, PNG when kaleido is installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

UNLABELLED_COLOR = "#b0b0b0"
FIRST_COLOR = "#404040"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896")


def category_colors(categories: Sequence[str]) -> dict[str, str]:
    """A stable colour per category (by position in the lexicon), plus ``unlabelled`` and ``position 0``."""
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(categories)}
    colors["unlabelled"] = UNLABELLED_COLOR
    colors["position 0"] = FIRST_COLOR
    return colors


def show_token(token: str) -> str:
    """A token as an axis label: whitespace made visible (leading space as ``·``, newline as ``⏎``)."""
    out = token.replace("\n", "⏎").replace("\t", "⇥")
    if out.startswith(" "):
        out = "·" + out[1:]
    return out or "∅"


def neuron_activation_figure(
    tokens: Sequence[str],
    activations: Sequence[float],
    labels: np.ndarray,
    categories: Sequence[str],
    *,
    title: str = "",
    first_is_special: bool = False,
) -> Any:
    """Bar chart of one neuron's activation over the tokens of a text.

    Args:
        tokens: the token strings, in order.
        activations: the neuron's activation on each token.
        labels: bool ``[tokens, categories]`` concept labels.
        categories: the category names (columns of ``labels``).
        title: figure title.
        first_is_special: the first token is the BOS/sequence starter (coloured "position 0").

    Returns:
        A plotly Figure with one bar trace per category present (for the legend).
    """
    import plotly.graph_objects as go

    acts = np.asarray(activations, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    n = len(tokens)
    if acts.shape != (n,) or labels.shape != (n, len(categories)):
        raise ValueError(f"shapes differ: {n} tokens, activations {acts.shape}, labels {labels.shape}")
    colors = category_colors(categories)
    group = []
    for i in range(n):
        if i == 0 and first_is_special:
            group.append("position 0")
            continue
        hit = [categories[j] for j in np.nonzero(labels[i])[0]]
        group.append(hit[0] if hit else "unlabelled")
    all_labels = [", ".join(categories[j] for j in np.nonzero(labels[i])[0]) or "-" for i in range(n)]
    shown = [show_token(t) for t in tokens]
    fig = go.Figure()
    order = [*categories, "unlabelled", "position 0"]
    for name in order:
        idx = [i for i in range(n) if group[i] == name]
        if not idx:
            continue
        fig.add_trace(go.Bar(
            x=idx, y=acts[idx], name=name, marker_color=colors[name],
            customdata=[[shown[i], all_labels[i]] for i in idx],
            hovertemplate="pos %{x}: <b>%{customdata[0]}</b><br>activation %{y:.3f}<br>labels: %{customdata[1]}"
                          "<extra></extra>",
        ))
    step = max(1, n // 120)  # keep the axis readable on long texts (hover always shows the token)
    fig.update_layout(
        title=title, bargap=0.1, barmode="overlay", template="plotly_white", legend_title_text="category",
        xaxis={"title": "token", "tickmode": "array", "tickvals": list(range(0, n, step)),
               "ticktext": shown[::step], "tickangle": -60, "range": [-0.5, n - 0.5]},
        yaxis={"title": "activation", "zeroline": True},
        width=max(900, min(12 * n, 4000)), height=480,
    )
    return fig


def layer_category_heatmap(
    table: Any,
    *,
    title: str = "Selective neurons per layer and category",
    value_label: str = "neurons",
) -> Any:
    """Heatmap of a category x layer table (a DataFrame: index = categories, columns = layers).

    Cells show their value; the colour scale starts at 0.
    """
    import plotly.graph_objects as go

    z = np.asarray(table.to_numpy(), dtype=float)
    layers = [str(c) for c in table.columns]
    cats = [str(i) for i in table.index]
    fig = go.Figure(go.Heatmap(
        z=z, x=layers, y=cats, colorscale="Viridis", zmin=0, colorbar={"title": value_label},
        text=[[f"{v:g}" for v in row] for row in z], texttemplate="%{text}",
        hovertemplate="layer %{x}<br>%{y}: %{z}<extra></extra>",
    ))
    fig.update_layout(title=title, template="plotly_white", xaxis={"title": "layer", "type": "category"},
                      yaxis={"title": "category", "autorange": "reversed"},
                      width=max(600, 40 * len(layers) + 250), height=max(350, 40 * len(cats) + 150))
    return fig
