"""HTML rendering: the Jinja2 environment (autoescaped), number formats, URLs and the histogram SVG.

Every value from a run (corpus text, tokens, explanations, column names) reaches a page through Jinja2's
autoescaping; the only markup built here is the histogram SVG, from numbers, with its labels escaped too.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from markupsafe import Markup

GROUP_TITLES = {"verdict": "Verdict and flags", "explanation": "Explanations", "detection": "Detection scores",
                "causal": "Causal verification", "statistics": "Statistics"}
TABLE_TITLES = {"explanations": "Explanations", "concepts": "Responses per concept category",
                "logits": "Direct logit attribution", "verification": "Causal verification",
                "claims": "Causal verification (claims)", "top_neurons": "Top neuron of a category"}


def fmt(value: Any) -> str:
    """A compact display of a value: 4 significant digits, thousands separators, '–' for missing."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value == int(value) and abs(value) < 1e6:
            return f"{int(value):,}" if abs(value) >= 1000 else f"{value:.4g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def visible(text: Any) -> str:
    """Token text with its invisible characters shown (newline as ⏎, tab as →)."""
    return str(text if text is not None else "").replace("\n", "⏎").replace("\t", "→").replace("\r", "")


def neuron_url(run: str, layer: int, neuron: int) -> str:
    return f"/neurons/{int(layer)}/{int(neuron)}?run={quote(str(run), safe='')}"


def search_url(params: dict[str, Any], **changes: Any) -> str:
    merged = {k: v for k, v in {**params, **changes}.items() if v not in (None, "")}
    return "/search?" + urlencode(merged)


def group_examples(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exemplars in titled groups, in their order: top, bottom, then each band of each direction."""
    groups: list[dict[str, Any]] = []
    for e in examples:
        key = (e.get("kind"), e.get("direction"), e.get("band"))
        if not groups or groups[-1]["key"] != key:
            groups.append({"key": key, "kind": str(e.get("kind") or "top"), "title": _group_title(e), "rows": []})
        groups[-1]["rows"].append(e)
    return groups


def _group_title(e: dict[str, Any]) -> str:
    kind, direction = e.get("kind") or "top", e.get("direction")
    if kind == "top":
        return "Top activations"
    if kind == "bottom":
        return "Most negative activations"
    if kind == "band":
        lo = e.get("band_lo")
        sign = "negative" if direction == "-" else "positive"
        where = f"from {lo:.0%} of the neuron's {sign} scale" if isinstance(lo, float) else f"lowest {sign} band"
        return f"Quantile band {e.get('band')} ({direction}): {where}"
    return f"{kind} ({direction})" if direction else str(kind)


def plain_context(e: dict[str, Any]) -> str:
    """An exemplar's context as plain text (the peak marker removed)."""
    return f"{e.get('left', '')}{e.get('peak', '')}{e.get('right', '')}".strip()


def histogram_svg(hist: dict[str, Any] | None, *, width: int = 640, height: int = 170) -> Markup:
    """The neuron's histogram as an inline SVG (log-scaled counts; under- and overflow as separate grey bars)."""
    if not hist or not hist.get("counts"):
        return Markup("<p class='muted'>No histogram in this run.</p>")
    counts = hist["counts"]
    edges = hist.get("edges")
    under, over = hist.get("underflow"), hist.get("overflow")
    left, right, top, bottom = 44, 10, 12, 34
    flow_w = 12
    plot_l = left + (flow_w + 6 if under is not None else 0)
    plot_r = width - right - (flow_w + 6 if over is not None else 0)
    plot_h = height - top - bottom
    peak = max([*counts, under or 0, over or 0, 1])
    scale = math.log1p(peak)

    def bar_h(c: int) -> float:
        return plot_h * math.log1p(c) / scale if c > 0 else 0.0

    bw = (plot_r - plot_l) / len(counts)
    parts = [f"<svg class='hist' viewBox='0 0 {width} {height}' width='{width}' height='{height}' role='img' "
             f"aria-label='histogram of activations, {len(counts)} bins'>"]
    base = top + plot_h
    for i, c in enumerate(counts):
        h = bar_h(c)
        label = f"[{edges[i]:.4g}, {edges[i + 1]:.4g}): {c:,}" if edges else f"bin {i}: {c:,}"
        parts.append(f"<rect class='bar' x='{plot_l + i * bw:.2f}' y='{base - h:.2f}' width='{max(bw - 0.6, 0.4):.2f}'"
                     f" height='{h:.2f}'><title>{escape(label)}</title></rect>")
    for value, x, label in ((under, left, "below the range"), (over, width - right - flow_w, "above the range")):
        if value is not None:
            h = bar_h(value)
            parts.append(f"<rect class='flow' x='{x}' y='{base - h:.2f}' width='{flow_w}' height='{h:.2f}'>"
                         f"<title>{escape(label)}: {value:,}</title></rect>")
    parts.append(f"<line class='axis' x1='{left}' y1='{base}' x2='{width - right}' y2='{base}'/>")
    parts.append(f"<text class='tick' x='{left - 4}' y='{top + 8}' text-anchor='end'>{peak:,}</text>")
    parts.append(f"<text class='tick' x='{left - 4}' y='{base}' text-anchor='end'>0</text>")
    if edges:
        lo, hi = edges[0], edges[-1]
        parts.append(f"<text class='tick' x='{plot_l}' y='{base + 14}' text-anchor='start'>{lo:.3g}</text>")
        parts.append(f"<text class='tick' x='{plot_r}' y='{base + 14}' text-anchor='end'>{hi:.3g}</text>")
        if lo < 0 < hi:
            x0 = plot_l + (plot_r - plot_l) * (0 - lo) / (hi - lo)
            parts.append(f"<line class='zero' x1='{x0:.2f}' y1='{top}' x2='{x0:.2f}' y2='{base}'/>")
            parts.append(f"<text class='tick' x='{x0:.2f}' y='{base + 14}' text-anchor='middle'>0</text>")
    parts.append(f"<text class='tick' x='{(plot_l + plot_r) / 2:.1f}' y='{height - 4}' text-anchor='middle'>"
                 "activation (count on a log scale)</text></svg>")
    return Markup("".join(parts))


def environment() -> Any:
    """The Jinja2 environment of the templates (autoescape on, helpers as filters and globals)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("neuronhunter.serve", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["visible"] = visible
    env.globals.update(neuron_url=neuron_url, search_url=search_url, histogram_svg=histogram_svg,
                       group_titles=GROUP_TITLES, table_titles=TABLE_TITLES)
    return env
