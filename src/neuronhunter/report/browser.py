"""A static HTML neuron browser for a scan or hunt run folder.

``build_browser(run)`` writes ``RUN/browser/index.html`` (the run at a glance: model, corpus, one row per layer,
the strongest neurons of the run) and one page per layer (``layer_05.html``: every neuron of the layer in a
sortable, filterable table; click a neuron for its statistics, histogram and top activating examples with the
token highlighted in context). A hunt run adds the verdicts and concept selectivity columns.

Every page is self-contained: the data is inlined as JSON and rendered by a little vanilla JavaScript
(``report/assets``), nothing is fetched, so the folder works from disk, zipped, or on any static web host. Token
text is inserted with ``textContent`` and the JSON is escaped for ``<script>``, so corpus text cannot inject markup.
Pages are written atomically, the index last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import MANIFEST, read_json, read_table, require_run, write_text

# neurons-table columns shown when present (scan columns, then the hunt's)
NEURON_COLUMNS = ("neuron", "max", "mean", "std", "min", "frac_active", "kurtosis", "first_mean", "first_max",
                  "pos_mean_max", "verdict", "top_category", "crs", "dprime", "categories")
STRONGEST = 50  # neurons listed on the index page


def _asset(name: str) -> str:
    return resources.files("neuronhunter.report").joinpath("assets", name).read_text(encoding="utf-8")


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf become None, numpy scalars plain Python, floats rounded for size."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 5) if math.isfinite(value) else None
    return value


def _script_json(data: Any) -> str:
    """JSON that is safe inside ``<script>`` (no ``</script>``, ``<!--`` or HTML entities can form)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(title: str, kind: str, data: dict[str, Any]) -> str:
    from html import escape

    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{escape(title)}</title>"
        f"<style>{_asset('browser.css')}</style></head>\n<body><div id='app' data-kind='{kind}'></div>\n"
        f"<script id='data' type='application/json'>{_script_json(data)}</script>\n"
        f"<script>{_asset('browser.js')}</script>\n</body></html>\n"
    )


def _split_context(context: str, token: str) -> tuple[str, str, str]:
    """``left[[token]]right`` (as written by the scan) back into its three parts."""
    marker = "[[" + token + "]]"
    at = context.find(marker)
    if at < 0:
        return context, "", ""
    return context[:at], token, context[at + len(marker) :]


def _layer_rows(frame: Any, examples: Any | None, per_neuron: int | None) -> list[dict[str, Any]]:
    cols = [c for c in NEURON_COLUMNS if c in frame.columns]
    by_neuron: dict[int, list[dict[str, Any]]] = {}
    if examples is not None:
        ex = examples[examples["kind"] == "top"] if "kind" in examples.columns else examples
        ex = ex.sort_values(["neuron", "rank"])
        if per_neuron is not None:
            ex = ex[ex["rank"] < per_neuron]
        for row in ex.itertuples(index=False):
            left, tok, right = _split_context(str(row.context), str(row.token))
            by_neuron.setdefault(int(row.neuron), []).append(
                {"a": _clean(row.activation), "doc": int(row.doc), "pos": int(row.pos), "src": str(row.source),
                 "l": left, "t": tok, "r": right})
    rows = []
    for rec in frame.sort_values("neuron").to_dict("records"):
        row = {c: _clean(rec[c]) if c != "categories" else str(rec[c] or "") for c in cols}
        row["hist"] = [int(v) for v in rec["hist"]] if "hist" in rec else []
        if "hist_lo" in rec and row["hist"]:  # each neuron's own bins (calibrated ranges)
            n_bins = len(row["hist"]) - 2
            row["edges"] = [_clean(rec["hist_lo"] + (rec["hist_hi"] - rec["hist_lo"]) * i / n_bins)
                            for i in range(n_bins + 1)]
        row["ex"] = by_neuron.get(int(rec["neuron"]), [])
        row["top"] = row["ex"][0]["t"] if row["ex"] else ""
        rows.append(row)
    return rows


def _layer_summary(layer: int, frame: Any, threshold: float) -> dict[str, Any]:
    out = {"layer": layer, "neurons": len(frame), "dead": int((frame["max"] <= threshold).sum()),
           "max": _clean(frame["max"].max()), "frac_active": _clean(frame["frac_active"].mean())}
    if "verdict" in frame.columns:
        out["verdicts"] = {str(k): int(v) for k, v in frame["verdict"].value_counts().items()}
    return out


def build_browser(
    run: str | Path,
    out: str | Path | None = None,
    *,
    layers: Iterable[int] | None = None,
    examples_per_neuron: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the browser for ``run`` into ``out`` (default ``RUN/browser``); return the index page's path.

    Args:
        layers: only these layers get pages (default: every layer of the run).
        examples_per_neuron: show at most this many top examples per neuron (default: all the scan kept).
        progress: called with ``(pages done, pages total)``.
    """
    run = require_run(run, "neurons.parquet")
    manifest = read_json(run / MANIFEST)
    neurons = read_table(run / "neurons.parquet")
    examples = read_table(run / "examples.parquet") if (run / "examples.parquet").exists() else None
    present = sorted(int(v) for v in neurons["layer"].unique())
    chosen = present if layers is None else sorted(set(layers))
    missing = [layer for layer in chosen if layer not in present]
    if missing:
        raise ConfigError(f"layer {missing[0]} is not in this run (its layers: {present[0]}..{present[-1]})")
    if examples_per_neuron is not None and examples_per_neuron < 0:
        raise ConfigError("examples_per_neuron must be >= 0")
    out = Path(out) if out is not None else run / "browser"
    out.mkdir(parents=True, exist_ok=True)
    threshold = float(read_json(run / "config.json").get("threshold", 0.0)) if (run / "config.json").exists() else 0.0
    model = manifest.get("model", {})
    info = {"run": run.name, "model": model.get("name", ""), "family": model.get("family", ""),
            "tokens": manifest.get("tokens"), "corpus": manifest.get("corpus", {}).get("spec", ""),
            "context_length": manifest.get("context_length"), "kind": manifest.get("kind", "scan"),
            "hist_edges": manifest.get("hist_edges", []), "threshold": threshold,
            "layers": chosen}
    summaries = []
    for i, layer in enumerate(chosen):
        frame = neurons[neurons["layer"] == layer]
        ex = examples[examples["layer"] == layer] if examples is not None else None
        rows = _layer_rows(frame, ex, examples_per_neuron)
        summaries.append(_layer_summary(layer, frame, threshold))
        write_text(out / f"layer_{layer:02d}.html",
                   _page(f"Layer {layer} · {info['model']}", "layer", {"info": info, "layer": layer, "rows": rows}))
        if progress is not None:
            progress(i + 1, len(chosen) + 1)
    sub = neurons[neurons["layer"].isin(chosen)]
    if "verdict" in sub.columns:  # the sequence-starter trap: positional and dead neurons do not lead the list
        sub = sub[~sub["verdict"].isin(["positional", "dead"])]
    strongest = []
    for rec in sub.nlargest(STRONGEST, "max").to_dict("records"):
        row = {c: _clean(rec[c]) for c in ("neuron", "max", "mean", "frac_active", "verdict", "top_category")
               if c in rec}
        row["layer"] = int(rec["layer"])
        strongest.append(row)
    index = _page(f"neuronhunter · {info['model']} · {run.name}", "index",
                  {"info": info, "layers": summaries, "strongest": strongest})
    path = write_text(out / "index.html", index)
    if progress is not None:
        progress(len(chosen) + 1, len(chosen) + 1)
    return path
