"""Circuit runs on disk and their offline HTML page (one file, inline SVG, no scripts or network).

A circuit run folder holds ``circuit.json`` (task, metric, the chosen circuit, the faithfulness curve, exact checks),
``edges.parquet`` (every edge's score), ``circuit.html``, ``config.json`` and ``manifest.json`` (last).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

CIRCUIT = "circuit.json"
EDGES = "edges"
PAGE = "circuit.html"


def _layer_of(name: str, n_layers: int) -> float:
    """Vertical place of a node: embeddings at the bottom, ``attn L`` / heads at ``L``, ``mlp L`` / units at
    ``L + 0.5``, logits on top."""
    if name == "input":
        return -1.0
    if name == "logits":
        return float(n_layers)
    if name.startswith("attn"):
        return float(name[4:])
    if name.startswith("mlp"):
        return float(name[3:]) + 0.5
    layer = int(name[1:].split(".")[0])
    return layer + (0.0 if name.startswith("a") else 0.5)


def graph_svg(summary: dict[str, Any], n_layers: int, width: int = 900) -> str:
    """The chosen circuit as an SVG: writers (heads ``aL.hH``, units ``mL.nN``/``mL.fF``) and readers
    (``attn L``, ``mlp L``, ``logits``) placed by layer; edges drawn blue (helps the answer) or red (hurts it),
    wider for larger ``|score|``."""
    edges = summary["circuit"]["edges"]
    nodes = sorted({e["upstream"] for e in edges} | {e["downstream"] for e in edges},
                   key=lambda n: (_layer_of(n, n_layers), n))
    rows: dict[float, list[str]] = {}
    for n in nodes:
        rows.setdefault(_layer_of(n, n_layers), []).append(n)
    levels = sorted(rows)
    height = 60 + 70 * max(len(levels), 1)
    pos = {}
    for i, level in enumerate(levels):
        y = height - 40 - i * 70
        names = rows[level]
        for j, n in enumerate(names):
            pos[n] = ((j + 1) * width / (len(names) + 1), y)
    top = max((abs(e["score"]) for e in edges), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
    for e in edges:
        (x1, y1), (x2, y2) = pos[e["upstream"]], pos[e["downstream"]]
        colour = "#2b6cb0" if e["score"] >= 0 else "#c53030"
        w = 0.8 + 5.0 * abs(e["score"]) / top
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
                     f'stroke-width="{w:.2f}" stroke-opacity="0.7"><title>{html.escape(e["upstream"])} -&gt; '
                     f'{html.escape(e["downstream"])}: {e["score"]:.4g}</title></line>')
    for n, (x, y) in pos.items():
        reader = n in ("logits", "input") or n.startswith(("attn", "mlp"))
        fill = "#edf2f7" if reader else ("#fefcbf" if n.startswith("a") else "#c6f6d5")
        shape = (f'<rect x="{x - 28:.1f}" y="{y - 10:.1f}" width="56" height="20" rx="4" fill="{fill}" '
                 f'stroke="#4a5568"/>' if reader else
                 f'<circle cx="{x:.1f}" cy="{y:.1f}" r="12" fill="{fill}" stroke="#4a5568"/>')
        parts.append(f'<g>{shape}<text x="{x:.1f}" y="{y + 24:.1f}" text-anchor="middle">{html.escape(n)}</text>'
                     "</g>")
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(curve: list[dict[str, Any]], width: int = 600, height: int = 260) -> str:
    """Faithfulness against the number of edges (log scale), with the 0 and 1 lines."""
    import math

    pts = [(c["edges"], c["faithfulness"]) for c in curve if c["edges"] > 0]
    if not pts:
        return ""
    lx = [math.log10(n) for n, _ in pts]
    lo_x, hi_x = min(lx), max(max(lx), min(lx) + 1e-9)
    ys = [f for _, f in pts] + [0.0, 1.0]
    lo_y, hi_y = min(ys) - 0.05, max(ys) + 0.05
    m = 40

    def px(v: float) -> float:
        return m + (v - lo_x) / (hi_x - lo_x) * (width - 2 * m)

    def py(v: float) -> float:
        return height - m - (v - lo_y) / (hi_y - lo_y) * (height - 2 * m)

    line = " ".join(f"{px(x):.1f},{py(f):.1f}" for x, (_, f) in zip(lx, pts, strict=True))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11">']
    for level in (0.0, 1.0):
        parts.append(f'<line x1="{m}" x2="{width - m}" y1="{py(level):.1f}" y2="{py(level):.1f}" stroke="#a0aec0" '
                     f'stroke-dasharray="4 3"/><text x="{m - 6}" y="{py(level) + 4:.1f}" text-anchor="end">'
                     f"{level:g}</text>")
    parts.append(f'<polyline points="{line}" fill="none" stroke="#2b6cb0" stroke-width="2"/>')
    for x, (n, f) in zip(lx, pts, strict=True):
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(f):.1f}" r="3" fill="#2b6cb0"><title>{n} edges: '
                     f"{f:.3f}</title></circle>")
        parts.append(f'<text x="{px(x):.1f}" y="{height - m + 14}" text-anchor="middle">{n}</text>')
    parts.append(f'<text x="{width / 2:.0f}" y="{height - 6}" text-anchor="middle">edges in the circuit '
                 "(largest |score| first)</text></svg>")
    return "".join(parts)


def circuit_page(summary: dict[str, Any], n_layers: int) -> str:
    """A self-contained HTML page: the circuit graph, the faithfulness curve, the edges and the exact checks."""
    esc = html.escape
    c = summary["circuit"]
    rows = "".join(f"<tr><td>{esc(e['upstream'])}</td><td>{esc(e['downstream'])}</td><td>{e['score']:.4g}</td>"
                   f"<td>{esc(str(e.get('site') or ''))}</td></tr>" for e in c["edges"][:200])
    checks = "".join(f"<tr><td>{esc(k['upstream'])} -&gt; {esc(k['downstream'])}</td><td>{k['score']:.4g}</td>"
                     f"<td>{k['exact']:.4g}</td><td>{k['exact_normalised']:.3f}</td></tr>"
                     for k in summary.get("exact_checks", []))
    faith = c.get("faithfulness")
    faith_text = "n/a" if faith is None else f"{faith:.3f}"
    rho = summary.get("exact_vs_eap_spearman")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>circuit: {esc(summary['task'])}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#1a202c}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #cbd5e0;padding:3px 8px;text-align:left}}h2{{margin-top:1.5em}}</style></head><body>
<h1>Circuit for task <code>{esc(summary['task'])}</code></h1>
<p>{esc(str(summary.get('model', '')))}: {summary['pairs']} contrast pairs, method {esc(summary['method'])}.
Metric: {esc(summary['metric'])}. Clean {summary['clean_metric']:.3f}, corrupted {summary['corrupted_metric']:.3f}.</p>
<p>Chosen circuit: <b>{c['n_edges']}</b> of {summary['edges_total']:,} edges, faithfulness <b>{faith_text}</b>
(target {summary['target_faithfulness']}; reached: {summary.get('reached_target')}).</p>
<h2>Graph</h2>{graph_svg(summary, n_layers)}
<h2>Faithfulness against circuit size</h2>{curve_svg(summary['curve'])}
<h2>Exact checks of the top edges</h2>
<p>Each edge patched alone from the corrupted run; Spearman correlation of EAP score and exact effect:
{'n/a' if rho is None else f'{rho:.2f}'}.</p>
<table><tr><th>edge</th><th>EAP score</th><th>exact effect</th><th>exact / (clean - corrupted)</th></tr>{checks}</table>
<h2>Edges of the circuit</h2>
<table><tr><th>writer</th><th>reader</th><th>score</th><th>site</th></tr>{rows}</table>
</body></html>
"""


def write_circuit_run(result: Any, out: str | Path, n_layers: int, config: dict[str, Any], *,
                      overwrite: bool = False) -> Path:
    """Write a circuit run folder (see the module docstring) through the run-folder lifecycle."""
    from ..io import write_json, write_table, write_text
    from ..runfolder import RunFolder

    folder = RunFolder(out, kind="circuit")
    work = folder.begin(overwrite=overwrite)
    summary = result.summary()
    write_json(work / CIRCUIT, summary)
    write_table(result.edges.drop(columns=["abs_score"]), work / EDGES)
    write_text(work / PAGE, circuit_page(summary, n_layers))
    write_json(work / "config.json", config)
    return folder.commit({"kind": "circuit", "task": summary["task"], "model": summary.get("model"),
                          "pairs": summary["pairs"], "method": summary["method"],
                          "edges_total": summary["edges_total"], "circuit_edges": summary["circuit"]["n_edges"],
                          "faithfulness": summary["circuit"]["faithfulness"], "timings": summary["timings"]})
