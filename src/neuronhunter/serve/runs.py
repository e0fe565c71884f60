"""The run folders a server shows, and every query over their Parquet tables (read in place, with DuckDB).

Nothing is copied into another store and nothing is written: the server reads the run's Parquet files and keeps
what it has read in memory, keyed on each file's modification time and size, so a table rewritten by ``verify`` or
a re-scored hunt shows up without a restart. Columns are read generically: a column the scan or hunt adds later appears on the pages and in the API
without code changes (grouped by name: verdict and flags, explanations, detection scores, causal results, the rest
as statistics), and so does any other ``*.parquet`` table of the run with ``layer`` and ``neuron`` columns.

Per-neuron reads go through :mod:`.tables` (a row index and row groups read on first use), searches through DuckDB
over the neurons table held in memory as Arrow (~40 MB for 46,080 neurons), so a neuron page or an API call takes
milliseconds rather than the 50-250 ms of a Parquet scan per table and query.

A run is addressed by its name (the folder's name, made unique), never by a path from a request.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..io import MANIFEST, read_json, require_run
from .tables import NeuronRows, TokenIndex, neuron_key

NEURONS, EXAMPLES = "neurons", "examples"
# the neuron page shows these tables first (in this order), then any other table with layer and neuron columns
KNOWN_TABLES = ("explanations", "concepts", "logits", "verification", "claims", "top_neurons")
EXAMPLE_KINDS = ("top", "bottom", "band")
MAX_PER_PAGE = 200
# columns of explain's candidate explanations shown on a neuron page (the API's neuron answer has the same)
EXPLANATION_SHOWN = ("direction", "kind", "explanation", "is_best", "simulation_r", "detection_f1",
                     "detection_auprc", "hard_negative_accuracy", "n_heldout_tokens", "scored_on")
MAX_TABLE_ROWS = 200  # rows of one extra table shown for one neuron

# columns of the neurons table, grouped on the neuron page by name (first match wins; the rest are statistics)
GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("verdict", re.compile(r"^(verdict|direction|flags?|top_category|second_category|categories|n_categories"
                           r"|claim_category|claim_categories)$|^flag_|^is_")),
    ("explanation", re.compile(r"explanation|^label$|description|^interpretation|^scored_on$")),
    ("detection", re.compile(r"precision|recall|(^|_)f1($|_)|auprc|auroc|(^|_)ap($|_)|p_?value|q_?value")),
    ("causal", re.compile(r"^causal|^verified|^ablation|^claim_(effect|z|q|p|confirmed)")),
)
HIDDEN = {"layer", "neuron", "hist", "hist_lo", "hist_hi"}
RESULT_COLUMNS = ("layer", "neuron", "verdict", "direction", "claim_category", "claim_categories", "flags",
                  "top_category", "categories", "max", "min", "mean", "frac_active", "dprime", "crs", "kurtosis")
# columns that name a neuron's concept categories (a category search matches any of them)
CATEGORY_COLUMNS = ("claim_category", "claim_categories", "categories", "top_category")
LIST_SPLIT = "[;+,| ]+"  # separators of the comma-joined (or older ';'/'+'-joined) category and flag columns


class HTTPError(Exception):
    """An error a request caused: shown as ``{"error": message}`` (API) or an error page, never a traceback."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def clean(value: Any) -> Any:
    """A JSON-safe value: NaN/inf become None, numpy scalars and arrays plain Python."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    return value


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def is_scalar(dtype: str) -> bool:
    return not (dtype.endswith("]") or dtype.startswith(("STRUCT", "MAP", "UNION")))


def is_numeric(dtype: str) -> bool:
    return dtype.split("(")[0] in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                                   "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL", "REAL"}


def column_group(name: str) -> str:
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return "statistics"


def split_list(value: Any) -> list[str]:
    """A comma-joined (or list) column value as a list of its non-empty items."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v).strip()]
    return [v for v in re.split(LIST_SPLIT, str(value)) if v]


def split_context(context: str, token: str) -> tuple[str, str, str]:
    """``left[[token]]right`` (as the scan writes an exemplar) back into its three parts."""
    marker = "[[" + token + "]]"
    at = context.find(marker)
    if at < 0:
        at = context.find("[[")
        end = context.find("]]", at + 2) if at >= 0 else -1
        if at < 0 or end < 0:
            return context, "", ""
        return context[:at], context[at + 2:end], context[end + 2:]
    return context[:at], token, context[at + len(marker):]


@dataclass
class SearchQuery:
    """A search over a run's neurons (every filter optional; see :meth:`Run.search`)."""

    layers: list[int] | None = None
    verdicts: list[str] | None = None
    category: str | None = None
    token: str | None = None
    text: str | None = None
    direction: str | None = None
    flag: str | None = None
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    sort: str | None = None
    order: str = "desc"
    page: int = 1
    per_page: int = 50


class Database:
    """One in-memory DuckDB database; each thread queries through its own cursor."""

    def __init__(self) -> None:
        import duckdb

        self._root = duckdb.connect(":memory:")
        for setting in ("SET parquet_metadata_cache = true", "SET enable_object_cache = true"):
            try:
                self._root.execute(setting)
                break
            except duckdb.Error:
                continue
        self._local = threading.local()
        self._lock = threading.Lock()

    def cursor(self) -> Any:
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            with self._lock:
                cur = self._root.cursor()
            self._local.cursor = cur
        return cur

    def rows(self, sql: str, params: Sequence[Any] = (), arrow: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run ``sql``; ``arrow`` names in-memory Arrow tables the query reads (registered on this thread's
        cursor, zero-copy)."""
        cur = self.cursor()
        if arrow:
            seen = self._local.__dict__.setdefault("registered", {})
            for name, table in arrow.items():
                if seen.get(name) is not table:
                    cur.register(name, table)
                    seen[name] = table
        res = cur.execute(sql, list(params))
        names = [d[0] for d in res.description]
        return [dict(zip(names, row, strict=True)) for row in res.fetchall()]


class Run:
    """One run folder: its manifest and config, its tables, and the queries the pages and the API make."""

    def __init__(self, name: str, path: Path, db: Database) -> None:
        self.name = name
        self.path = path
        self.db = db
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------- files
    def _cached(self, key: str, signature: Any, build: Any) -> Any:
        """``build()``, kept until ``signature`` (the files' modification times and sizes) changes; built once
        even when several threads ask at the same time."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == signature:
                return hit[1]
            value = build()
            self._cache[key] = (signature, value)
            return value

    def neuron_rows(self, table: str) -> NeuronRows | None:
        """Per-neuron row access to a table (see :mod:`.tables`), or None when the run has no such table."""
        path = self.file(table)
        if path is None:
            return None
        return self._cached(f"rows:{table}", _signature(path), lambda: NeuronRows(path))

    def arrow(self, table: str) -> Any:
        """A whole (small) table in memory as Arrow, for DuckDB queries over all neurons (the neurons table)."""
        path = self.file(table)
        if path is None:
            raise HTTPError(404, f"run {self.name!r} has no {table} table")

        def build() -> Any:
            import pyarrow.parquet as pq

            from .tables import _string_columns

            return pq.read_table(path, read_dictionary=_string_columns(pq.read_schema(path)))
        return self._cached(f"arrow:{table}", _signature(path), build)

    def view(self, table: str) -> tuple[str, dict[str, Any]]:
        """The SQL name of an in-memory table and the mapping :meth:`Database.rows` registers it from."""
        data = self.arrow(table)
        name = f"t{id(data)}"
        return name, {name: data}

    def token_index(self) -> TokenIndex:
        path = self.file(EXAMPLES)
        if path is None:
            raise HTTPError(400, f"run {self.name!r} has no examples table to search tokens in")
        return self._cached("tokens", _signature(path), lambda: TokenIndex(path))

    def warm(self, everything: bool = True) -> None:
        """Read what every page needs before the first request asks for it: the neurons table, the run summary,
        the exemplars' row index and the token index; with ``everything`` also every row group of every table a
        neuron page shows (so no page view waits for a first read of its layer)."""
        self.summary()
        self.neuron_rows(NEURONS)
        if self.file(EXAMPLES) is not None:
            self.neuron_rows(EXAMPLES)
            self.token_index()
        if everything:
            for table in (EXAMPLES, *self.tables()):
                rows = self.neuron_rows(table)
                if rows is not None:
                    rows.read_all()

    def file(self, table: str) -> Path | None:
        path = self.path / f"{table}.parquet"
        return path if path.is_file() else None

    def src(self, table: str) -> str:
        path = self.file(table)
        if path is None:
            raise HTTPError(404, f"run {self.name!r} has no {table} table")
        return f"read_parquet({_literal(path)})"

    def columns(self, table: str) -> dict[str, str]:
        """``{column: DuckDB type}`` of a table ({} when the run has no such table)."""
        path = self.file(table)
        if path is None:
            return {}
        return self._cached(f"columns:{table}", _signature(path), lambda: {
            r["column_name"]: r["column_type"]
            for r in self.db.rows(f"DESCRIBE SELECT * FROM read_parquet({_literal(path)})")})

    def tables(self) -> list[str]:
        """The run's tables with ``layer`` and ``neuron`` columns besides neurons and examples (known ones first)."""
        def build() -> list[str]:
            names = sorted(p.name[: -len(".parquet")] for p in os.scandir(self.path)
                           if p.name.endswith(".parquet") and not p.name.startswith(".") and p.is_file())
            names = [n for n in names if n not in (NEURONS, EXAMPLES)
                     and {"layer", "neuron"} <= set(self.columns(n))]
            return sorted(names, key=lambda n: (KNOWN_TABLES.index(n) if n in KNOWN_TABLES else len(KNOWN_TABLES), n))
        return self._cached("tables", _signature(self.path), build)

    @property
    def manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        return self._cached("manifest", _signature(path), lambda: read_json(path) if path.exists() else {})

    @property
    def config(self) -> dict[str, Any]:
        path = self.path / "config.json"
        return self._cached("config", _signature(path), lambda: read_json(path) if path.exists() else {})

    @property
    def hunt_info(self) -> dict[str, Any]:
        path = self.path / "hunt.json"
        return self._cached("hunt", _signature(path), lambda: read_json(path) if path.exists() else {})

    @property
    def model_name(self) -> str:
        return str(self.config.get("model") or self.manifest.get("model", {}).get("name") or "smollm2-135m")

    @property
    def context_length(self) -> int:
        return int(self.config.get("context_length") or self.manifest.get("context_length") or 128)

    @property
    def prepend_bos(self) -> bool:
        return bool(self.config.get("prepend_bos", self.manifest.get("prepend_bos", True)))

    # ---------------------------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        """The run at a glance: model, corpus, per-layer counts and verdicts, totals, champion (cached)."""
        path = self.file(NEURONS)
        return self._cached("summary", (_signature(path) if path else None, _signature(self.path / MANIFEST)),
                            self._build_summary)

    def _build_summary(self) -> dict[str, Any]:
        cols = self.columns(NEURONS)
        src, arrow = self.view(NEURONS)
        parts = ["layer", "count(*) AS neurons"]
        if "max" in cols:
            parts.append('max("max") AS max')
        if "frac_active" in cols:
            parts.append("avg(frac_active) AS frac_active")
        layers = self.db.rows(f"SELECT {', '.join(parts)} FROM {src} GROUP BY layer ORDER BY layer", arrow=arrow)
        dead = self._dead_by_layer(cols, src, arrow)
        for row in layers:
            if dead is not None:
                row["dead"] = dead.get(int(row["layer"]), 0)
        verdicts: dict[str, int] = {}
        if "verdict" in cols:
            by_layer: dict[int, dict[str, int]] = {}
            for r in self.db.rows(f"SELECT layer, verdict, count(*) AS n FROM {src} GROUP BY ALL ORDER BY ALL",
                                  arrow=arrow):
                v = str(r["verdict"])
                by_layer.setdefault(int(r["layer"]), {})[v] = int(r["n"])
                verdicts[v] = verdicts.get(v, 0) + int(r["n"])
            for row in layers:
                row["verdicts"] = by_layer.get(int(row["layer"]), {})
        manifest, model = self.manifest, self.manifest.get("model", {})
        corpus = manifest.get("corpus", {}) if isinstance(manifest.get("corpus"), dict) else {}
        order = sorted(verdicts, key=lambda v: -verdicts[v])
        return clean({
            "name": self.name, "kind": manifest.get("kind", "scan"), "model": model.get("name") or self.model_name,
            "family": model.get("family"), "corpus": corpus.get("spec"), "tokens": manifest.get("tokens"),
            "context_length": self.context_length, "prepend_bos": self.prepend_bos,
            "layers": layers, "layer_ids": [int(r["layer"]) for r in layers],
            "neurons": sum(int(r["neurons"]) for r in layers),
            "neurons_per_layer": max((int(r["neurons"]) for r in layers), default=0),
            "verdicts": {v: verdicts[v] for v in order}, "verdict_names": order,
            "champion": self._champion(cols), "tables": [NEURONS, *(["examples"] if self.file(EXAMPLES) else []),
                                                         *self.tables()],
        })

    def _dead_by_layer(self, cols: dict[str, str], src: str, arrow: Any) -> dict[int, int] | None:
        """Dead neurons per layer: the hunt's verdict where there is one, else the judge's one definition
        (:func:`neuronhunter.judge.verdicts.dead_neurons`) over the scan's statistics."""
        if "verdict" in cols:
            rows = self.db.rows(f"SELECT layer, count(*) FILTER (WHERE verdict = 'dead') AS n FROM {src} "
                                "GROUP BY layer", arrow=arrow)
            return {int(r["layer"]): int(r["n"]) for r in rows}
        need = [c for c in ("layer", "std", "min", "max", "first_min", "first_max") if c in cols]
        if not {"layer", "std", "min", "max"} <= set(need):
            return None
        import pandas as pd

        from ..judge.verdicts import dead_neurons

        frame = pd.DataFrame(self.db.rows(f"SELECT {', '.join(need)} FROM {src}", arrow=arrow))
        mask = dead_neurons(frame)
        return {int(k): int(v) for k, v in pd.Series(mask).groupby(frame["layer"].to_numpy()).sum().items()}

    def _champion(self, cols: dict[str, str]) -> dict[str, Any] | None:
        champ = self.hunt_info.get("champion")
        if isinstance(champ, dict) and "layer" in champ and "neuron" in champ:
            return champ
        if "max" not in cols:
            return None
        where = "WHERE verdict NOT IN ('positional', 'dead')" if "verdict" in cols else ""
        src, arrow = self.view(NEURONS)
        rows = self.db.rows(f"SELECT layer, neuron, \"max\" FROM {src} {where} "
                            "ORDER BY \"max\" DESC NULLS LAST LIMIT 1", arrow=arrow)
        return rows[0] if rows else None

    # ---------------------------------------------------------------------------------------------- one neuron
    def check(self, layer: int, neuron: int) -> None:
        """404 with a message when the run has no such layer or neuron."""
        s = self.summary()
        layers = s["layer_ids"]
        if layer not in layers:
            shown = f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
                ", ".join(map(str, layers)) if layers else "none"
            raise HTTPError(404, f"layer {layer} is not in run {self.name!r} (its layers: {shown})")
        n = next(int(r["neurons"]) for r in s["layers"] if int(r["layer"]) == layer)
        if not 0 <= neuron < n:
            raise HTTPError(404, f"neuron {neuron} is not in layer {layer} of run {self.name!r} "
                                 f"(its neurons: 0..{n - 1})")

    def neuron_row(self, layer: int, neuron: int) -> dict[str, Any]:
        self.check(layer, neuron)
        table = self.neuron_rows(NEURONS)
        rows = table.rows(layer, neuron) if table is not None else []
        if not rows:
            raise HTTPError(404, f"neuron {neuron} of layer {layer} is not in run {self.name!r}")
        return clean(rows[0])

    def histogram(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """Counts and bin edges: each neuron's own ``hist_lo``..``hist_hi``, else the manifest's ``hist_edges``."""
        counts = row.get("hist")
        if not counts:
            return None
        counts = [int(c) for c in counts]
        spec = self.manifest.get("histogram") if isinstance(self.manifest.get("histogram"), dict) else {}
        lo, hi = row.get("hist_lo"), row.get("hist_hi")
        edges = None
        if lo is not None and hi is not None and hi > lo:
            bins = int(spec.get("bins") or (len(counts) - 2))
            bins = bins if 0 < bins <= len(counts) else len(counts) - 2
            edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
        elif self.manifest.get("hist_edges"):
            edges = [float(e) for e in self.manifest["hist_edges"]]
        if not edges or len(edges) < 2:
            return {"counts": counts, "edges": None, "underflow": None, "overflow": None}
        bins = len(edges) - 1
        flows = len(counts) - bins
        if flows == 2:
            return {"counts": counts[1:-1], "edges": edges, "underflow": counts[0], "overflow": counts[-1]}
        if flows == 0:
            return {"counts": counts, "edges": edges, "underflow": None, "overflow": None}
        return {"counts": counts, "edges": None, "underflow": None, "overflow": None}

    def examples(self, layer: int, neuron: int) -> list[dict[str, Any]]:
        """The neuron's exemplars, top first, then bottom, then bands (each by direction, band and rank)."""
        if self.file(EXAMPLES) is None:
            return []
        cols = self.columns(EXAMPLES)
        rows = clean(self.neuron_rows(EXAMPLES).rows(layer, neuron))
        for r in rows:
            del r["layer"], r["neuron"]
            r.setdefault("kind", "top")
            left, tok, right = split_context(str(r.get("context") or ""), str(r.get("token") or ""))
            r["left"], r["peak"], r["right"] = left, tok, right
        if "kind" in cols:
            kinds = {k: i for i, k in enumerate(EXAMPLE_KINDS)}
            rows.sort(key=lambda r: (kinds.get(r["kind"], len(kinds)), str(r["kind"]), r.get("direction") == "-",
                                     r.get("band") if r.get("band") is not None else -1, r.get("rank") or 0))
        else:
            rows.sort(key=lambda r: r.get("rank") or 0)
        return rows

    def table_rows(self, table: str, layer: int, neuron: int, limit: int = MAX_TABLE_ROWS) -> list[dict[str, Any]]:
        cols = self.columns(table)
        order = [c for c in ("direction", "rank", "category") if c in cols]
        rows = clean(self.neuron_rows(table).rows(layer, neuron))
        for r in rows:
            del r["layer"], r["neuron"]
        rows.sort(key=lambda r: tuple((r[c] is None, r[c] if r[c] is not None else 0) for c in order))
        if "is_best" in cols:  # explain's candidates: each direction's best first, the main scores shown
            rows.sort(key=lambda r: (str(r.get("direction")), not r.get("is_best")))
            rows = [{c: r[c] for c in EXPLANATION_SHOWN if c in r} for r in rows]
        return rows[:limit]

    def neuron(self, layer: int, neuron: int, *, examples: bool = True) -> dict[str, Any]:
        """Everything known about one neuron (the neuron page and ``GET /api/neurons/{layer}/{neuron}``)."""
        row = self.neuron_row(layer, neuron)
        cols = self.columns(NEURONS)
        groups: dict[str, list[str]] = {}
        for name in cols:
            if name not in HIDDEN:
                groups.setdefault(column_group(name), []).append(name)
        out: dict[str, Any] = {"run": self.name, "layer": layer, "neuron": neuron,
                               "verdict": row.get("verdict"), "direction": row.get("direction"),
                               "claim": row.get("claim_category") or row.get("claim_categories"),
                               "flags": split_list(row.get("flags")), "groups": groups,
                               "stats": {k: v for k, v in row.items() if k not in HIDDEN},
                               "histogram": self.histogram(row)}
        if examples:
            out["examples"] = self.examples(layer, neuron)
        out["tables"] = {t: self.table_rows(t, layer, neuron) for t in self.tables()}
        return out

    # ---------------------------------------------------------------------------------------------- search
    def sortable(self) -> list[str]:
        return [c for c, t in self.columns(NEURONS).items() if is_scalar(t)]

    def search(self, sq: SearchQuery) -> dict[str, Any]:
        """One page of the neurons matching every given filter, sorted (``GET /api/neurons``)."""
        cols = self.columns(NEURONS)
        where: list[str] = []
        params: list[Any] = []
        if sq.layers:
            where.append(f"layer IN ({', '.join('?' * len(sq.layers))})")
            params += sq.layers
        if sq.verdicts:
            self._need(cols, "verdict", "a verdict (run `neuronhunter hunt`)")
            where.append(f"verdict IN ({', '.join('?' * len(sq.verdicts))})")
            params += sq.verdicts
        if sq.category:
            clause, n = self._category_filter(cols)
            where.append(clause)
            params += [sq.category] * n
        if sq.direction:
            self._need(cols, "direction", "a direction")
            where.append("direction = ?")
            params.append(sq.direction)
        if sq.flag:
            where.append(self._flag_filter(cols, sq.flag))
            if "flags" in cols:
                params.append(sq.flag)
        for name, (lo, hi) in sq.ranges.items():
            if name not in cols or not is_numeric(cols[name]):
                raise HTTPError(400, f"cannot filter on {name!r}: not a numeric column of this run's neurons")
            if lo is not None:
                where.append(f"{_ident(name)} >= ?")
                params.append(lo)
            if hi is not None:
                where.append(f"{_ident(name)} <= ?")
                params.append(hi)
        if sq.token:
            where.append("((CAST(layer AS BIGINT) << 32) | neuron) IN (SELECT unnest(CAST(? AS BIGINT[])))")
            params.append(self.token_index().neurons(sq.token).tolist())
        if sq.text:
            clause, extra = self._text_filter(cols, sq.text)
            where.append(clause)
            params += extra
        sort = sq.sort or ("max" if "max" in cols else "layer")
        if sort not in cols or not is_scalar(cols[sort]):
            raise HTTPError(400, f"cannot sort by {sort!r}; sortable columns: {', '.join(self.sortable())}")
        order = "ASC" if sq.order == "asc" else "DESC"
        shown = [c for c in RESULT_COLUMNS if c in cols]
        shown += [c for c in cols if column_group(c) == "explanation" and is_scalar(cols[c]) and c not in shown][:2]
        if sort not in shown:
            shown.append(sort)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        per_page = max(1, min(int(sq.per_page), MAX_PER_PAGE))
        page = max(1, int(sq.page))
        src, arrow = self.view(NEURONS)
        rows = self.db.rows(
            f"SELECT {', '.join(_ident(c) for c in shown)}, count(*) OVER () AS _total FROM {src} "
            f"{clause} ORDER BY {_ident(sort)} {order} NULLS LAST, layer, neuron LIMIT {per_page} "
            f"OFFSET {(page - 1) * per_page}", params, arrow=arrow)
        if rows:
            total = int(rows[0]["_total"])
        else:
            total = int(self.db.rows(f"SELECT count(*) AS n FROM {src} {clause}", params, arrow=arrow)[0]["n"])
        for r in rows:
            del r["_total"]
        rows = clean(rows)
        self._add_top_tokens(rows)
        return {"run": self.name, "total": total, "page": page, "per_page": per_page,
                "pages": max(1, -(-total // per_page)), "sort": sort, "order": order.lower(),
                "columns": [*shown, *(["top_token"] if self.file(EXAMPLES) else [])], "rows": rows}

    @staticmethod
    def _need(cols: dict[str, str], column: str, what: str) -> None:
        if column not in cols:
            raise HTTPError(400, f"this run's neurons have no {column!r} column (no {what})")

    def _category_filter(self, cols: dict[str, str]) -> tuple[str, int]:
        """A filter matching a category in any category column of the neurons (and how many parameters it takes)."""
        parts = []
        # the top category alone says little (every neuron has one): it is searched only when nothing else is there
        names = [c for c in CATEGORY_COLUMNS[:-1] if c in cols] or [c for c in CATEGORY_COLUMNS[-1:] if c in cols]
        for c in names:
            if cols[c].endswith("[]"):
                parts.append(f"list_contains({_ident(c)}, ?)")
            else:
                parts.append(f"list_contains(string_split_regex(coalesce({_ident(c)}, ''), '{LIST_SPLIT}'), ?)")
        if not parts:
            raise HTTPError(400, "this run's neurons have no category columns (no concept categories: run "
                                 "`neuronhunter hunt`)")
        return "(" + " OR ".join(parts) + ")", len(parts)

    def _flag_filter(self, cols: dict[str, str], flag: str) -> str:
        if "flags" in cols:
            if cols["flags"].endswith("[]"):
                return "list_contains(flags, ?)"
            return f"list_contains(string_split_regex(coalesce(flags, ''), '{LIST_SPLIT}'), ?)"
        if flag in cols and cols[flag] == "BOOLEAN":
            return f"{_ident(flag)}"
        raise HTTPError(400, f"this run's neurons have no flags column nor a boolean column {flag!r}")

    def _text_filter(self, cols: dict[str, str], text: str) -> tuple[str, list[Any]]:
        """Case-insensitive substring match over the neurons' text columns (and an explanations table when the
        neurons table has no explanation column)."""
        needle = text.strip().lower()
        texts = [c for c, t in cols.items() if t == "VARCHAR"]
        # the neurons table's own explanations (explain writes each neuron's best there) are what is searched; the
        # explanations table (every candidate: 800,000 rows for the default run) only when there are none
        own = [c for c in texts if column_group(c) == "explanation"]
        texts = own or texts
        parts = [f"contains(lower(coalesce({_ident(c)}, '')), ?)" for c in texts]
        params: list[Any] = [needle] * len(texts)
        for table in ([] if own else self.tables()):
            tcols = self.columns(table)
            if table == "explanations" or any(column_group(c) == "explanation" for c in tcols):
                tt = [c for c, t in tcols.items() if t == "VARCHAR"]
                if tt:
                    match = " OR ".join(f"contains(lower(coalesce({_ident(c)}, '')), ?)" for c in tt)
                    parts.append(f"(layer, neuron) IN (SELECT layer, neuron FROM {self.src(table)} WHERE {match})")
                    params += [needle] * len(tt)
        if not parts:
            raise HTTPError(400, "this run has no text columns to search")
        return "(" + " OR ".join(parts) + ")", params

    def _add_top_tokens(self, rows: list[dict[str, Any]]) -> None:
        """Each row's strongest top exemplar's token (``top_token``)."""
        if not rows or self.file(EXAMPLES) is None:
            return
        top = self.token_index().top
        for r in rows:
            r["top_token"] = top.get(int(neuron_key(r["layer"], r["neuron"])))


class RunSet:
    """The runs given on the command line, by unique name (the folder's name, ``-2``, ``-3``... on clashes)."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        self.db = Database()
        self.runs: dict[str, Run] = {}
        for p in paths:
            path = require_run(Path(p), "neurons.parquet").resolve()
            name = path.name or "run"
            base, i = name, 2
            while name in self.runs:
                name, i = f"{base}-{i}", i + 1
            self.runs[name] = Run(name, path, self.db)
        if not self.runs:
            raise RunDirError("serve needs at least one run folder")

    @property
    def default(self) -> Run:
        return next(iter(self.runs.values()))

    def get(self, name: str | None) -> Run:
        if name is None or name == "":
            return self.default
        run = self.runs.get(name)
        if run is None:
            raise HTTPError(404, f"no run named {name!r}; runs served: {', '.join(self.runs)}")
        return run

    def __iter__(self) -> Any:
        return iter(self.runs.values())

    def __len__(self) -> int:
        return len(self.runs)
