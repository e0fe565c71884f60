"""``neuronhunter export RUN --format neuronpedia``: a run in Neuronpedia's export layout, for a self-hosted
Neuronpedia's import (admin panel) or anyone who reads those exports.

Neuronpedia publishes its data as one folder per model and source (its "exports" documentation; the field names
are those of the tables its importer fills: ``Neuron`` for features, ``Activation``, ``Explanation``)::

    OUT/<model id>/<layer>-<source set>/
        model.jsonl  release.jsonl  sourceset.jsonl  source.jsonl      one JSON object each
        features/batch-0.jsonl.gz ...        one line per neuron: max activation, logit attribution (pos_/neg_str,
                                             pos_/neg_values), fraction active, activation histogram
        activations/batch-0.jsonl.gz ...     one line per exemplar: the window's tokens and the neuron's value on
                                             every token (recomputed with the run's model from the scan's stored
                                             token ids: the scan keeps only each exemplar's peak), its maximum and
                                             where it is, and for quantile-band exemplars the band's range
        explanations/batch-0.jsonl.gz ...    one line per explanation (when the run has explanations: the best of
                                             each neuron and direction, its kind in explanationModelName)
        explanation-scores/batch-0.jsonl.gz  their scores, one line per (explanation, score), in the fields of
                                             Neuronpedia's ExplanationScore table (its importer does not read this
                                             folder: load it with the same JSONL import, table ExplanationScore)

A neuron of an MLP is a Neuronpedia "feature" whose index is the neuron number and whose source is
``<layer>-<source set>`` (one source per layer; ``--source-set``, default ``neuronhunter-mlp``). Batches hold
``batch_size`` neurons each, numbered per source. Exemplars: the top ones of the positive direction and the
positive quantile bands (what Neuronpedia shows), at most ``examples`` per neuron and group. The BOS token the scan
prepends is left out of ``tokens``/``values``. Ids are deterministic (a hash of run, source, neuron and row), so
exporting twice gives identical files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import MANIFEST, atomic_path, read_json, require_run, write_text

log = logging.getLogger(__name__)

CREATOR_ID = "neuronhunter"
EXPLANATION_TYPE = "neuronhunter"
TEXT_COLUMNS = ("explanation", "description", "text", "label")
SCORE_SKIP = {"layer", "neuron", "rank", "count", "n_tokens", "tokens"}


def _id(*parts: Any) -> str:
    """A deterministic 25-character id (Neuronpedia uses 25-character cuid2 ids)."""
    return "c" + hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def _num(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def slug(name: str) -> str:
    """A Neuronpedia id from a model name or path: lower case letters, digits, dots and dashes."""
    name = re.split(r"[\\/]", name.rstrip("/\\"))[-1]
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def _jsonl_gz(path: Path, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=5, mtime=0) as f:  # same bytes each time
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode())
            n += 1
    return n


def _jsonl(path: Path, record: dict[str, Any]) -> None:
    write_text(path, json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")


def _explanations(run: Path, layers: list[int]) -> Any | None:
    """The run's explanations as one frame: layer, neuron, text, model, scores (numeric columns), scored_on."""
    import pandas as pd

    frames = []
    path = run / "explanations.parquet"
    if path.exists():
        t = pd.read_parquet(path)
        text = next((c for c in TEXT_COLUMNS if c in t.columns), None)
        if text is not None and {"layer", "neuron"} <= set(t.columns):
            frames.append(t.rename(columns={text: "_text"}))
    if not frames:
        n = pd.read_parquet(run / "neurons.parquet")
        text = next((c for c in TEXT_COLUMNS if c in n.columns), None)
        if text is None:
            return None
        frames.append(n[["layer", "neuron", text]].rename(columns={text: "_text"}))
    t = pd.concat(frames, ignore_index=True)
    t = t[t["layer"].isin(layers) & t["_text"].notna() & (t["_text"].astype(str).str.strip() != "")]
    if "is_best" in t.columns:  # explain's candidates: the best of each neuron and direction
        t = t[t["is_best"].fillna(False).astype(bool)]
    return t


def _score_columns(frame: Any) -> list[str]:
    import pandas as pd

    return [c for c in frame.columns if c not in SCORE_SKIP and not c.startswith(("_", "n_"))
            and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


class WindowValues:
    """The activations of chosen neurons on the scan's stored windows, recomputed with the run's model, a group
    of layers at a time (one forward pass per window, stopped after the group's last layer)."""

    def __init__(self, model: Any, windows: dict[int, Any], bos: int | None) -> None:
        self.model, self.windows, self.bos = model, windows, bos

    def values(self, layers: list[int], wanted: dict[int, dict[int, set[int]]]) -> dict[tuple[int, int, int], Any]:
        """``{(layer, neuron, window): values per token}`` for ``wanted[window][layer] = {neurons}``."""
        import torch

        from ..models.sites import Site

        sites = [Site.mlp_post(layer) for layer in layers]
        out: dict[tuple[int, int, int], Any] = {}
        for wid, by_layer in wanted.items():
            win = self.windows.get(wid)
            if win is None:
                continue
            ids = torch.tensor([list(win.ids)])
            with torch.no_grad():
                _, cache = self.model.run_with_cache(ids, sites=sites, stop_at_layer=max(layers) + 1)
            for layer, neurons in by_layer.items():
                acts = cache[Site.mlp_post(layer)][0].float()
                for n in neurons:
                    out[(layer, n, wid)] = acts[:, n].numpy()
        return out


def export_neuronpedia(
    run: str | Path,
    out: str | Path | None = None,
    *,
    model_id: str | None = None,
    source_set: str = "neuronhunter-mlp",
    layers: Iterable[int] | None = None,
    examples: int = 20,
    batch_size: int = 1024,
    layers_per_pass: int = 6,
    model: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``run`` in Neuronpedia's export layout; return the model folder (``OUT/<model id>``).

    Args:
        out: the export folder (default ``RUN/export/neuronpedia``).
        model_id: the model's Neuronpedia id (default: from the run's model name, e.g. ``smollm2-135m``).
        source_set: the source set's name; each layer is the source ``<layer>-<source_set>``.
        layers: only these layers (default: all of the run's).
        examples: at most this many exemplars per neuron and group (top; each positive quantile band).
        batch_size: neurons per ``batch-N.jsonl.gz`` file.
        layers_per_pass: layers whose exemplar values one forward pass per window computes (memory vs passes).
        model: the run's model, already loaded (default: loaded from the run's config).
        progress: called with ``(layers done, layers total)``.
    """
    import pandas as pd

    run = require_run(run, "neurons.parquet", "examples.parquet", "stats.pt")
    if examples < 1 or batch_size < 1 or layers_per_pass < 1:
        raise ConfigError("examples, batch_size and layers_per_pass must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", source_set):
        raise ConfigError(f"--source-set must be letters, digits, '.', '_' or '-', got {source_set!r}")
    manifest = read_json(run / MANIFEST)
    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    model_name = str(config.get("model") or manifest.get("model", {}).get("name") or "smollm2-135m")
    mid = model_id or slug(str(manifest.get("model", {}).get("name") or model_name))
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", mid):
        raise ConfigError(f"--model-id must be lower-case letters, digits, '.' or '-', got {mid!r}")
    neurons = pd.read_parquet(run / "neurons.parquet")
    present = sorted(int(v) for v in neurons["layer"].unique())
    chosen = present if layers is None else sorted(set(layers))
    missing = [layer for layer in chosen if layer not in present]
    if missing:
        raise ConfigError(f"layer {missing[0]} is not in this run (its layers: {present[0]}..{present[-1]})")
    ex = pd.read_parquet(run / "examples.parquet", filters=[("layer", "in", chosen)])
    if "kind" in ex.columns:
        ex = ex[ex["kind"].isin(["top", "band"]) & (ex["direction"] == "+")]
    ex = ex[ex["rank"] < examples]
    if model is None:
        from ..models.loading import load_model

        model = load_model(model_name)
    from ..stats.state import load_state

    windows = load_state(run / "stats.pt")[0].windows
    bos = manifest.get("bos_token_id") if manifest.get("prepend_bos", True) else None
    logits = pd.read_parquet(run / "logits.parquet", filters=[("layer", "in", chosen)]) \
        if (run / "logits.parquet").exists() else None
    expl = _explanations(run, chosen)
    created = datetime.fromtimestamp((run / MANIFEST).stat().st_mtime, tz=timezone.utc).isoformat()
    out = Path(out) if out is not None else run / "export" / "neuronpedia"
    root = out / mid
    corpus = manifest.get("corpus", {}) if isinstance(manifest.get("corpus"), dict) else {}
    recompute = WindowValues(model, windows, bos)
    hist_spec = manifest.get("histogram") if isinstance(manifest.get("histogram"), dict) else {}
    for g in range(0, len(chosen), layers_per_pass):
        group = chosen[g: g + layers_per_pass]
        part = ex[ex["layer"].isin(group)]
        wanted: dict[int, dict[int, set[int]]] = {}
        for layer, neuron, wid in zip(part["layer"], part["neuron"], part["window"], strict=True):
            wanted.setdefault(int(wid), {}).setdefault(int(layer), set()).add(int(neuron))
        values = recompute.values(group, wanted)
        for layer in group:
            source = f"{layer}-{source_set}"
            folder = root / source
            _write_metadata(folder, mid, source, source_set, layer, model, manifest, corpus, created)
            frame = neurons[neurons["layer"] == layer].sort_values("neuron")
            lex = part[part["layer"] == layer]
            llog = logits[logits["layer"] == layer] if logits is not None else None
            lexp = expl[expl["layer"] == layer] if expl is not None else None
            ids = frame["neuron"].astype(int).tolist()
            for b in range(0, len(ids), batch_size):
                chunk = ids[b: b + batch_size]
                name = f"batch-{b // batch_size}.jsonl.gz"
                sel = frame[frame["neuron"].isin(chunk)]
                _jsonl_gz(folder / "features" / name,
                          _features(sel, llog, mid, source, layer, created, hist_spec))
                _jsonl_gz(folder / "activations" / name,
                          _activations(lex[lex["neuron"].isin(chunk)], values, windows, model, bos, mid, source,
                                       layer, created, frame))
                if lexp is not None and len(lexp[lexp["neuron"].isin(chunk)]):
                    rows = lexp[lexp["neuron"].isin(chunk)]
                    exps = list(_explanation_records(rows, mid, source, created))
                    _jsonl_gz(folder / "explanations" / name, (e for e, _ in exps))
                    if any(scores for _, scores in exps):
                        _jsonl_gz(folder / "explanation-scores" / name, (s for _, sc in exps for s in sc))
            if progress is not None:
                progress(chosen.index(layer) + 1, len(chosen))
    return root


def _write_metadata(folder: Path, mid: str, source: str, source_set: str, layer: int, model: Any,
                    manifest: dict[str, Any], corpus: dict[str, Any], created: str) -> None:
    info = manifest.get("model", {})
    _jsonl(folder / "model.jsonl", {
        "id": mid, "instruct": "instruct" in str(info.get("name", "")).lower() or mid.endswith("-it"),
        "creatorId": CREATOR_ID, "displayNameShort": mid, "displayName": str(info.get("name") or mid),
        "tlensId": None, "dimension": int(model.d_model), "visibility": "PUBLIC", "defaultSourceSetName": None,
        "defaultSourceId": None, "inferenceEnabled": False, "layers": int(model.n_layers),
        "neuronsPerLayer": int(model.d_mlp), "createdAt": created, "owner": "", "updatedAt": created,
        "website": None})
    _jsonl(folder / "release.jsonl", {
        "name": source_set, "description": "MLP neurons, scanned and judged by neuronhunter",
        "creatorName": "neuronhunter", "creatorId": CREATOR_ID, "visibility": "PUBLIC", "isNewUi": False,
        "featured": False, "descriptionShort": "neuronhunter MLP neurons", "urls": [], "creatorEmail": None,
        "creatorNameShort": "neuronhunter", "defaultSourceSetName": source_set, "defaultSourceId": None,
        "defaultUmapSourceIds": [], "createdAt": created})
    _jsonl(folder / "sourceset.jsonl", {
        "modelId": mid, "name": source_set, "creatorId": CREATOR_ID, "hasDashboards": True, "visibility": "PUBLIC",
        "description": f"MLP neurons ({info.get('neuron_site') or 'blocks.{layer}.mlp.hook_post'})",
        "type": "neurons", "creatorName": "neuronhunter", "urls": [], "creatorEmail": None,
        "releaseName": source_set, "defaultOfModelId": None, "defaultRange": 1, "defaultShowBreaks": True,
        "showDfa": False, "showCorrelated": False, "showHeadAttribution": False, "showUmap": False,
        "createdAt": created})
    _jsonl(folder / "source.jsonl", {
        "id": source, "modelId": mid, "setName": source_set, "creatorId": CREATOR_ID, "hasDashboards": True,
        "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
        "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
        "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
        "num_prompts": manifest.get("windows"), "num_tokens_in_prompt": manifest.get("context_length"),
        "dataset": corpus.get("spec"), "notes": f"neuronhunter {manifest.get('kind', 'scan')} run, layer {layer}",
        "createdAt": created})


def _features(frame: Any, logits: Any | None, mid: str, source: str, layer: int, created: str,
              hist_spec: dict[str, Any]) -> Iterable[dict[str, Any]]:
    by_neuron: dict[int, Any] = {}
    if logits is not None and len(logits):
        for n, part in logits.groupby("neuron"):
            by_neuron[int(n)] = part
    for rec in frame.to_dict("records"):
        n = int(rec["neuron"])
        lg = by_neuron.get(n)
        pos = lg[lg["direction"] == "top"].sort_values("rank") if lg is not None else None
        neg = lg[lg["direction"] == "bottom"].sort_values("rank") if lg is not None else None
        heights, centres = [], []
        hist = rec.get("hist")
        if hist is not None and rec.get("hist_lo") is not None and _num(rec.get("hist_hi")) is not None:
            counts = [int(c) for c in hist][1:-1]  # under- and overflow are not bins
            lo, hi = float(rec["hist_lo"]), float(rec["hist_hi"])
            width = (hi - lo) / len(counts)
            heights = counts
            centres = [lo + width * (k + 0.5) for k in range(len(counts))]
        yield {
            "modelId": mid, "layer": source, "index": str(n), "creatorId": CREATOR_ID, "createdAt": created,
            "maxActApprox": _num(rec.get("max")) or 0.0, "hasVector": False, "vector": [], "vectorLabel": None,
            "vectorDefaultSteerStrength": _num(rec.get("max")), "hookName": f"blocks.{layer}.mlp.hook_post",
            "topkCosSimIndices": [], "topkCosSimValues": [], "neuron_alignment_indices": [],
            "neuron_alignment_values": [], "neuron_alignment_l1": [], "correlated_neurons_indices": [],
            "correlated_neurons_pearson": [], "correlated_neurons_l1": [], "correlated_features_indices": [],
            "correlated_features_pearson": [], "correlated_features_l1": [],
            "neg_str": neg["token"].astype(str).tolist() if neg is not None else [],
            "neg_values": [_num(v) for v in neg["value"]] if neg is not None else [],
            "pos_str": pos["token"].astype(str).tolist() if pos is not None else [],
            "pos_values": [_num(v) for v in pos["value"]] if pos is not None else [],
            "frac_nonzero": _num(rec.get("frac_active")) or 0.0,
            "freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": centres,
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
        }


def _activations(ex: Any, values: dict[tuple[int, int, int], Any], windows: dict[int, Any], model: Any,
                 bos: int | None, mid: str, source: str, layer: int, created: str, frame: Any
                 ) -> Iterable[dict[str, Any]]:
    top = dict(zip(frame["neuron"].astype(int), frame["max"].astype(float), strict=True)) \
        if "max" in frame.columns else {}
    band_los = sorted({float(v) for v in ex["band_lo"].dropna()}) if "band_lo" in ex.columns else []
    ex = ex.sort_values(["neuron", "kind", "band", "rank"], kind="stable") if "kind" in ex.columns else ex
    for rec in ex.to_dict("records"):
        n, wid = int(rec["neuron"]), int(rec["window"])
        acts = values.get((layer, n, wid))
        win = windows.get(wid)
        if acts is None or win is None:
            log.warning("L%d.N%d: window %d of an exemplar is not in stats.pt; skipped", layer, n, wid)
            continue
        ids = list(win.ids)
        skip = 1 if bos is not None and ids and ids[0] == bos else 0
        tokens = model.to_str_tokens(ids[skip:])
        vals = [round(float(v), 6) for v in acts[skip:]]
        peak = max(range(len(vals)), key=lambda k: vals[k])
        bin_min = bin_max = None
        if rec.get("kind") == "band" and _num(rec.get("band_lo")) is not None and n in top:
            lo = float(rec["band_lo"])
            above = [b for b in band_los if b > lo]
            bin_min, bin_max = lo * top[n], (above[0] if above else 1.0) * top[n]
        yield {
            "id": _id(mid, source, n, rec.get("kind", "top"), rec.get("band", -1), rec["rank"], wid),
            "tokens": tokens, "index": str(n), "layer": source, "modelId": mid,
            "maxValue": vals[peak], "maxValueTokenIndex": peak, "minValue": min(vals), "values": vals,
            "creatorId": CREATOR_ID, "dataSource": str(rec.get("source") or "") or None,
            "dataIndex": str(rec.get("doc")) if rec.get("doc") is not None else None,
            "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": created, "lossValues": [],
            "logitContributions": None, "binMin": bin_min, "binMax": bin_max, "binContains": None,
            "qualifyingTokenIndex": int(rec["window_pos"]) - skip if rec.get("window_pos") is not None else peak,
        }


def _explanation_records(rows: Any, mid: str, source: str, created: str
                         ) -> Iterable[tuple[dict[str, Any], list[dict[str, Any]]]]:
    scores = _score_columns(rows)
    for i, rec in enumerate(rows.to_dict("records")):
        n = int(rec["neuron"])
        eid = _id(mid, source, n, "explanation", i, rec["_text"])
        direction = rec.get("direction")
        where = rec.get("scored_on") or rec.get("verified_on")
        shown = {c: _num(rec.get(c)) for c in scores if _num(rec.get(c)) is not None}
        notes = "; ".join(f"{c} {v:.4g}" for c, v in shown.items())
        if direction:
            notes = f"direction {direction}" + ("; " + notes if notes else "")
        if where:
            notes += f" (scored on {where})"
        record = {
            "id": eid, "modelId": mid, "layer": source, "index": str(n), "description": str(rec["_text"]),
            "authorId": CREATOR_ID, "embedding": None, "triggeredById": None, "typeName": EXPLANATION_TYPE,
            "explanationModelName": "neuronhunter" + (f"-{rec['kind']}" if rec.get("kind") else ""),
            "notes": notes or None, "createdAt": created,
        }
        yield record, [{
            "id": _id(eid, c), "initiatedByUserId": CREATOR_ID, "value": v, "explanationId": eid,
            "explanationScoreTypeName": c, "explanationScoreModelName": "neuronhunter",
            "jsonDetails": json.dumps({"direction": direction, "scored_on": where}), "createdAt": created,
        } for c, v in shown.items()]
