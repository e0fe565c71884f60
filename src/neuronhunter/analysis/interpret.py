"""Interpreting a hunt run with SQL: pivots, category overlaps, correlations and run comparisons.

Everything here reads the run folder's Parquet files through DuckDB (views ``neurons``, ``concepts``, ``examples``
and ``top_neurons``), so any table below is one SQL query away and users can run their own
(``neuronhunter query RUN "SELECT ..."``). Nothing re-runs the model.

Tables produced by :func:`interpret_run`:

* ``category_layer``: category x layer counts of *selective* neurons (a neuron is selective for a category when the
  category is responsive and the neuron's verdict is monosemantic or polysemantic).
* ``monosemantic_layer``: the same for monosemantic neurons only (by their top category).
* ``verdict_layer``: verdict counts per layer.
* ``selectivity_layer``: per layer, the mean CRS, d' and entropy of the active (non-dead) neurons, and the share of
  each verdict.
* ``overlaps``: for each category pair, the neurons selective for both (``shared``), against chance: with ``N``
  neurons, ``n_a`` and ``n_b`` selective for each, independence predicts ``expected = n_a * n_b / N``; ``ratio`` is
  ``shared / expected`` and ``p_value`` the hypergeometric upper tail ``P(X >= shared)``,
  ``X ~ Hypergeometric(N, n_a, n_b)``.
* ``correlation``: the Pearson correlation, over all neurons, between the categories' d' columns (do neurons that
  prefer one category tend to prefer the other?).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunDirError
from ..io import MANIFEST, read_json, require_run, write_table

VIEWS = ("neurons", "concepts", "examples", "top_neurons")


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def connect(run: str | Path) -> Any:
    """An in-memory DuckDB connection with views over the run's Parquet tables (those that exist)."""
    import duckdb

    run = require_run(run, "neurons.parquet")
    con = duckdb.connect()
    for name in VIEWS:
        path = run / f"{name}.parquet"
        if path.exists():
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_quote(path)})")
    return con


def query(run: str | Path, sql: str) -> Any:
    """Run ``sql`` against the run's tables (views: neurons, concepts, examples, top_neurons); a DataFrame."""
    import duckdb

    con = connect(run)
    try:
        return con.execute(sql).df()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"query failed: {first}") from None
    finally:
        con.close()


def run_categories(run: str | Path) -> tuple[list[str], list[str]]:
    """``(concept categories, control categories)`` of a hunt run, from its manifest."""
    m = read_json(Path(run) / MANIFEST)
    cats = list(m.get("categories") or [])
    control = list(m.get("control_categories") or [])
    return [c for c in cats if c not in control], control


def require_hunt(run: str | Path) -> Path:
    """Check that ``run`` is a complete hunt run (verdicts in neurons, selectivity in concepts)."""
    run = require_run(run, "neurons.parquet")
    import pyarrow.parquet as pq

    if "verdict" not in pq.read_schema(run / "neurons.parquet").names:
        raise RunDirError(f"{run} has no hunt results (no verdict column); run `neuronhunter hunt` first")
    if not (run / "concepts.parquet").exists() or "selective" not in pq.read_schema(run / "concepts.parquet").names:
        raise RunDirError(f"{run} has no concept selectivity table; run `neuronhunter hunt` first")
    return run


def _in_list(values: Sequence[str]) -> str:
    return "(" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + ")" if values else "(NULL)"


def _pivot(df: Any, index: str, columns: str, values: str, rows: Sequence[Any], cols: Sequence[Any]) -> Any:
    table = df.pivot_table(index=index, columns=columns, values=values, aggfunc="sum", fill_value=0)
    return table.reindex(index=list(rows), columns=list(cols), fill_value=0).astype(int)


def category_layer_counts(con: Any, categories: Sequence[str], layers: Sequence[int], *,
                          monosemantic_only: bool = False) -> Any:
    """Category x layer counts of selective (or only monosemantic, by top category) neurons."""
    if monosemantic_only:
        df = con.execute(f"""
            SELECT top_category AS category, layer, count(*) AS n FROM neurons
            WHERE verdict = 'monosemantic' AND top_category IN {_in_list(categories)} GROUP BY ALL""").df()
    else:
        df = con.execute(f"""
            SELECT category, layer, count(*) AS n FROM concepts
            WHERE selective AND category IN {_in_list(categories)} GROUP BY ALL""").df()
    table = _pivot(df, "category", "layer", "n", categories, layers)
    table.index.name, table.columns.name = "category", "layer"
    return table


def verdict_layer_counts(con: Any, layers: Sequence[int]) -> Any:
    from ..judge.thresholds import VERDICTS

    df = con.execute("SELECT verdict, layer, count(*) AS n FROM neurons GROUP BY ALL").df()
    table = _pivot(df, "verdict", "layer", "n", VERDICTS, layers)
    table.index.name, table.columns.name = "verdict", "layer"
    return table


def selectivity_by_layer(con: Any) -> Any:
    """Per layer: neurons, mean CRS / d' / entropy over active (non-dead) neurons, and the share of each verdict."""
    from ..judge.thresholds import VERDICTS

    shares = ", ".join(f"avg(CASE WHEN verdict = '{v}' THEN 1.0 ELSE 0.0 END) AS share_{v}" for v in VERDICTS)
    return con.execute(f"""
        SELECT layer, count(*) AS neurons,
               avg(crs) FILTER (WHERE verdict != 'dead') AS mean_crs,
               avg(dprime) FILTER (WHERE verdict != 'dead') AS mean_dprime,
               avg(entropy) FILTER (WHERE verdict != 'dead') AS mean_entropy,
               {shares}
        FROM neurons GROUP BY layer ORDER BY layer""").df()


def hypergeom_sf(k: int, total: int, n_a: int, n_b: int) -> float:
    """``P(X >= k)`` for ``X ~ Hypergeometric(total, n_a, n_b)`` (exact sum of log-space terms)."""
    hi = min(n_a, n_b)
    lo = max(0, n_a + n_b - total)
    k = max(k, lo)
    if k > hi:
        return 0.0

    def log_comb(n: int, r: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    denom = log_comb(total, n_b)
    terms = [log_comb(n_a, i) + log_comb(total - n_a, n_b - i) - denom for i in range(k, hi + 1)]
    top = max(terms)
    return float(min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms)))


def category_overlaps(con: Any, categories: Sequence[str]) -> Any:
    """Category pairs sharing selective neurons, against chance (module docstring)."""
    import pandas as pd

    total = int(con.execute("SELECT count(*) FROM neurons").fetchone()[0])
    n_sel = dict(con.execute(f"""
        SELECT category, count(*) FROM concepts WHERE selective AND category IN {_in_list(categories)}
        GROUP BY category""").fetchall())
    shared = {(a, b): n for a, b, n in con.execute(f"""
        WITH s AS (SELECT layer, neuron, category FROM concepts
                   WHERE selective AND category IN {_in_list(categories)})
        SELECT a.category, b.category, count(*) FROM s a JOIN s b USING (layer, neuron)
        WHERE a.category < b.category GROUP BY ALL""").fetchall()}
    rows = []
    for i, a in enumerate(categories):
        for b in categories[i + 1:]:
            key = (a, b) if a < b else (b, a)
            na, nb, k = int(n_sel.get(a, 0)), int(n_sel.get(b, 0)), int(shared.get(key, 0))
            expected = na * nb / total if total else 0.0
            rows.append({"category_a": a, "category_b": b, "n_a": na, "n_b": nb, "shared": k,
                         "expected": expected, "ratio": k / expected if expected > 0 else float("nan"),
                         "p_value": hypergeom_sf(k, total, na, nb) if total else 1.0})
    cols = ["category_a", "category_b", "n_a", "n_b", "shared", "expected", "ratio", "p_value"]
    return pd.DataFrame(rows, columns=cols).sort_values(["shared", "ratio"], ascending=False, kind="stable") \
        .reset_index(drop=True)


def category_correlations(con: Any, categories: Sequence[str], value: str = "dprime") -> Any:
    """Pearson correlation between categories of a per-neuron value (``dprime`` or ``mean``) over all neurons."""
    if value not in ("dprime", "mean"):
        raise ConfigError(f"correlation value must be dprime or mean, got {value!r}")
    df = con.execute(f"""
        SELECT layer, neuron, category, {value} AS v FROM concepts
        WHERE category IN {_in_list(categories)}""").df()
    wide = df.pivot_table(index=["layer", "neuron"], columns="category", values="v")
    corr = wide.reindex(columns=list(categories)).corr()
    corr.index.name, corr.columns.name = "category", None
    return corr


def interpret_run(run: str | Path, out: str | Path | None = None, *, write: bool = True) -> dict[str, Any]:
    """All interpretation tables of a hunt run (module docstring); written as CSV under ``out``
    (default ``RUN/interpret``) when ``write``."""
    run = require_hunt(run)
    categories, _ = run_categories(run)
    con = connect(run)
    try:
        layers = [int(r[0]) for r in con.execute("SELECT DISTINCT layer FROM neurons ORDER BY layer").fetchall()]
        tables = {
            "category_layer": category_layer_counts(con, categories, layers),
            "monosemantic_layer": category_layer_counts(con, categories, layers, monosemantic_only=True),
            "verdict_layer": verdict_layer_counts(con, layers),
            "selectivity_layer": selectivity_by_layer(con),
            "overlaps": category_overlaps(con, categories),
            "correlation": category_correlations(con, categories),
        }
    finally:
        con.close()
    if write:
        folder = Path(out) if out is not None else run / "interpret"
        for name, table in tables.items():
            keep_index = name in ("category_layer", "monosemantic_layer", "verdict_layer", "correlation")
            write_table(table.reset_index() if keep_index else table, folder / name, formats=("csv",))
    return tables


def _depth_counts(run: Path, categories: Sequence[str], bins: int) -> tuple[Any, Any]:
    m = read_json(run / MANIFEST)
    n_layers = int(m.get("model", {}).get("n_layers") or (max(m.get("layers") or [0]) + 1))
    denom = max(n_layers - 1, 1)
    depth = f"least(CAST(floor(layer / {denom}.0 * {bins}) AS INTEGER), {bins - 1})"
    con = connect(run)
    try:
        sel = con.execute(f"""
            SELECT category, {depth} AS depth_bin, count(*) AS n FROM concepts
            WHERE selective AND category IN {_in_list(categories)} GROUP BY ALL""").df()
        scanned = con.execute(f"SELECT {depth} AS depth_bin, count(*) AS n FROM neurons GROUP BY ALL").df()
        verdicts = con.execute("SELECT verdict, count(*) AS n FROM neurons GROUP BY verdict").df()
    finally:
        con.close()
    return sel.merge(scanned, on="depth_bin", suffixes=("", "_scanned")), verdicts


def compare_runs(run_a: str | Path, run_b: str | Path, *, bins: int = 5) -> dict[str, Any]:
    """Per-category counts of selective neurons per relative depth, for two hunt runs side by side.

    Relative depth is ``layer / (n_layers - 1)`` cut into ``bins`` equal bins, so models of different depths line
    up. ``per_1k`` = selective neurons per 1000 neurons scanned in that depth bin.

    Returns:
        ``{"depth": DataFrame(category, depth, selective_a, selective_b, per_1k_a, per_1k_b),
        "verdicts": DataFrame(verdict, a, b), "categories": [...], "only_a": [...], "only_b": [...]}``.
    """
    import pandas as pd

    if bins < 1:
        raise ConfigError("bins must be >= 1")
    run_a, run_b = require_hunt(run_a), require_hunt(run_b)
    cats_a, _ = run_categories(run_a)
    cats_b, _ = run_categories(run_b)
    common = [c for c in cats_a if c in cats_b]
    if not common:
        raise ConfigError(f"{run_a} and {run_b} share no concept categories; scan both with the same lexicon")
    frames = []
    for tag, run in (("a", run_a), ("b", run_b)):
        sel, verdicts = _depth_counts(run, common, bins)
        sel[f"per_1k_{tag}"] = 1000.0 * sel["n"] / sel["n_scanned"]
        frames.append((sel.rename(columns={"n": f"selective_{tag}"})
                       .drop(columns=["n_scanned"]), verdicts.rename(columns={"n": tag})))
    grid = pd.DataFrame([(c, d) for c in common for d in range(bins)], columns=["category", "depth_bin"])
    for sel, _ in frames:
        grid = grid.merge(sel, on=["category", "depth_bin"], how="left")
    for col in ("selective_a", "selective_b", "per_1k_a", "per_1k_b"):
        grid[col] = grid[col].fillna(0)
    grid[["selective_a", "selective_b"]] = grid[["selective_a", "selective_b"]].astype(int)
    width = 100 / bins
    grid.insert(1, "depth", [f"{d * width:.0f}-{(d + 1) * width:.0f}%" for d in grid["depth_bin"]])
    grid = grid.drop(columns=["depth_bin"])
    from ..judge.thresholds import VERDICTS

    verdicts = pd.DataFrame({"verdict": list(VERDICTS)})
    for _, v in frames:
        verdicts = verdicts.merge(v, on="verdict", how="left")
    verdicts = verdicts.fillna(0)
    verdicts[["a", "b"]] = verdicts[["a", "b"]].astype(int)
    return {"depth": grid[["category", "depth", "selective_a", "selective_b", "per_1k_a", "per_1k_b"]],
            "verdicts": verdicts, "categories": common,
            "only_a": [c for c in cats_a if c not in common], "only_b": [c for c in cats_b if c not in common]}


def _claim_key(df: Any) -> Any:
    """A neuron's claim as one string: verdict, direction and what it is about (category set or token)."""
    cols = [c for c in ("claim_category", "claim_categories", "claim_token") if c in df.columns]
    what = df[cols].astype("string").fillna("").agg("|".join, axis=1) if cols else ""
    direction = df["direction"].astype("string").fillna("") if "direction" in df.columns else ""
    return df["verdict"].astype(str) + "/" + direction + "/" + what


def run_model(run: str | Path) -> str | None:
    """The model a run folder was made with (its ``config.json``), or None."""
    path = Path(run) / "config.json"
    return read_json(path).get("model") if path.exists() else None


def replication(run_a: str | Path, run_b: str | Path) -> Any:
    """Do a run's verdicts survive a change of text? Two hunts of the **same model** (e.g. ``--split train`` and
    ``--split heldout``, or two corpora), compared neuron by neuron.

    Returns a DataFrame, one row per verdict of A (and ``all``): ``n_a`` neurons with it in A, ``n_b`` in B;
    ``same_verdict`` / ``pct_same_verdict`` of A's neurons with the same verdict in B; ``same_claim`` /
    ``pct_same_claim`` with the same verdict, direction and claimed category set or token; ``pct_chance`` the
    same-verdict share expected if B's verdicts were assigned at random with B's shares (``n_b / N``).
    Raises a ConfigError when the runs are not of the same model and neurons.
    """
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from ..judge.thresholds import VERDICTS

    run_a, run_b = require_hunt(run_a), require_hunt(run_b)
    model_a, model_b = run_model(run_a), run_model(run_b)
    if model_a != model_b:
        raise ConfigError(f"replication compares two runs of one model: {run_a} is {model_a}, {run_b} is {model_b}")
    cols = ["layer", "neuron", "verdict", "direction", "claim_category", "claim_categories", "claim_token"]
    a, b = (pd.read_parquet(r / "neurons.parquet", columns=[c for c in cols if c in
                                                               pq.read_schema(r / "neurons.parquet").names])
            for r in (run_a, run_b))
    a, b = (d.assign(key=_claim_key(d))[["layer", "neuron", "verdict", "key"]] for d in (a, b))
    both = a.merge(b, on=["layer", "neuron"], suffixes=("_a", "_b"))
    if len(both) != len(a) or len(both) != len(b):
        raise ConfigError(f"{run_a} and {run_b} did not judge the same neurons ({len(a)} and {len(b)} neurons, "
                          f"{len(both)} in common)")
    same_verdict = (both.verdict_a == both.verdict_b).to_numpy()
    same_claim = (both.key_a == both.key_b).to_numpy()
    share_a = both.verdict_a.value_counts(normalize=True)
    share_b = both.verdict_b.value_counts(normalize=True)
    rows = []
    for verdict in [*[v for v in VERDICTS if v in share_a.index], "all"]:
        sel = (both.verdict_a == verdict).to_numpy() if verdict != "all" else np.ones(len(both), dtype=bool)
        n = int(sel.sum())
        chance = float(share_b.get(verdict, 0.0)) if verdict != "all" else \
            float(sum(share_a[v] * share_b.get(v, 0.0) for v in share_a.index))
        rows.append({"verdict": verdict, "n_a": n,
                     "n_b": int((both.verdict_b == verdict).sum()) if verdict != "all" else len(both),
                     "same_verdict": int(same_verdict[sel].sum()), "same_claim": int(same_claim[sel].sum()),
                     "pct_same_verdict": 100.0 * same_verdict[sel].mean() if n else math.nan,
                     "pct_same_claim": 100.0 * same_claim[sel].mean() if n else math.nan,
                     "pct_chance": 100.0 * chance})
    return pd.DataFrame(rows)
