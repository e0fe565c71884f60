"""Reading explanations back: summaries for the CLI and the docs, one neuron's report, evidence for verdicts.

:func:`verdict_evidence` is the hook for the hunt's verdict policy: per neuron and direction, whether one
explanation scores well on held-out text, which kind, and whether two *disjoint* explanations (different lexicon
categories, or a category and a token set sharing no token with it) both score well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import RunDirError, SiteError
from ...io import read_table, require_run
from .candidates import BASELINES

if TYPE_CHECKING:
    import pandas as pd

EXPLANATIONS = "explanations.parquet"


def winning_kinds(best: pd.DataFrame, good_r: float = 0.5) -> pd.DataFrame:
    """How often each kind is a neuron's best explanation, overall and among neurons explained at ``good_r``."""
    import pandas as pd

    good = best[best["explanation_r"] >= good_r]
    out = pd.DataFrame({"best": best["explanation_kind"].value_counts(),
                        f"best, r >= {good_r}": good["explanation_kind"].value_counts()}).fillna(0).astype(int)
    return out.rename_axis("kind").reset_index().sort_values("best", ascending=False, kind="stable")


def baseline_table(table: pd.DataFrame) -> pd.DataFrame:
    """The best explanation of each (neuron, direction) against its baselines, all on held-out fold 1 (the fold
    that did not choose the best): mean and median r, and how often the best beats each baseline."""
    import pandas as pd

    key = ["layer", "neuron", "direction"]
    best = table[table["is_best"]].set_index(key)["confirm_simulation_r"].rename("best")
    cols = {"best explanation": best}
    for kind in BASELINES:
        cols[kind] = table[table["kind"] == kind].set_index(key)["confirm_simulation_r"]
    wide = pd.DataFrame(cols).dropna(subset=["best explanation"])
    rows = []
    for name, col in wide.items():
        ok = col.notna()
        beats = (wide.loc[ok, "best explanation"] > col[ok]).mean() if name != "best explanation" else np.nan
        rows.append({"explanation": name, "neuron-directions": int(ok.sum()), "mean r": col[ok].mean(),
                     "median r": col[ok].median(), "r >= 0.5": (col[ok] >= 0.5).mean(),
                     "best beats it": beats})
    return pd.DataFrame(rows)


def score_distribution(best: pd.DataFrame, by: pd.Series) -> pd.DataFrame:
    """Quantiles of the best explanation's held-out r (fold 1) per group, with the shares at 0.5 and 0.7."""
    import pandas as pd

    frame = pd.DataFrame({"group": by.to_numpy(), "r": best["explanation_r"].to_numpy(dtype=float)})
    frame = frame[np.isfinite(frame["r"])]
    g = frame.groupby("group")["r"]
    return pd.DataFrame({"neurons": g.size(), "median": g.median(), "p10": g.quantile(0.1), "p90": g.quantile(0.9),
                         "r >= 0.5": g.apply(lambda x: (x >= 0.5).mean()),
                         "r >= 0.7": g.apply(lambda x: (x >= 0.7).mean())}).reset_index()


def neuron_report(run: str | Path, layer: int, neuron: int) -> dict[str, Any]:
    """One neuron's explanations (both directions), its neurons-table summary and its train exemplars."""
    import pyarrow.dataset as ds

    from ...results import _decoded

    run = require_run(run, "neurons.parquet")
    if not (run / EXPLANATIONS).exists():
        raise RunDirError(f"{run} has no {EXPLANATIONS}; run `neuronhunter explain {run}` first")
    flt = (ds.field("layer") == layer) & (ds.field("neuron") == neuron)
    ex = ds.dataset(str(run / EXPLANATIONS)).to_table(filter=flt).to_pandas()
    if not len(ex):
        neurons = read_table(run / "neurons.parquet")
        if not ((neurons.layer == layer) & (neurons.neuron == neuron)).any():
            raise SiteError(f"L{layer}.N{neuron} is not in {run} (layers {sorted(neurons.layer.unique().tolist())}, "
                            f"neurons 0..{int(neurons.neuron.max())})")
    order = {k: i for i, k in enumerate(["text", *BASELINES])}
    ex = ex.assign(_o=ex["kind"].map(order).fillna(-1), _r=-ex["simulation_r"].fillna(-2))
    ex = ex.sort_values(["direction", "_o", "_r"], kind="stable").drop(columns=["_o", "_r"])
    row = ds.dataset(str(run / "neurons.parquet")).to_table(filter=flt).to_pandas()
    head: dict[str, Any] = {}
    if len(row):
        r = row.iloc[0]
        for col in ("verdict", "direction", "claim_category", "max", "min", "explanation_kind", "explanation_r"):
            if col in row.columns and r[col] is not None and r[col] == r[col]:
                head[col] = round(float(r[col]), 3) if isinstance(r[col], float | np.floating) else r[col]
    exemplars = None
    if (run / "examples.parquet").exists():
        t = _decoded(ds.dataset(str(run / "examples.parquet")).to_table(
            columns=["kind", "direction", "rank", "activation", "context"], filter=flt)).to_pandas()
        t = t[t["kind"].isin(["top", "bottom"])]
        exemplars = (t.sort_values(["kind", "rank"], ascending=[False, True]).groupby("kind", sort=False).head(5)
                     [["kind", "rank", "activation", "context"]])
    import pandas as pd

    return {"explanations": ex, "neuron": head,
            "exemplars": exemplars if exemplars is not None else pd.DataFrame()}


def verdict_evidence(explanations: pd.DataFrame | str | Path, *, good_r: float = 0.5,
                     score: str = "simulation_r") -> pd.DataFrame:
    """Per (layer, neuron, direction): evidence from held-out explanation scores for the hunt's verdicts.

    Columns: ``best_kind``, ``best_r`` (the best explanation's ``score``), ``explained`` (``best_r >= good_r``),
    ``n_good`` (non-baseline rule explanations reaching ``good_r``), ``good_categories`` (comma-joined lexicon
    categories whose ``category`` explanation reaches ``good_r``) and ``disjoint_good`` (two or more *different*
    categories reach it: two disjoint well-scoring explanations). A neuron explained by one concept is a
    monosemantic candidate, one with ``disjoint_good`` a polysemantic candidate; the policy is the hunt's.

    Args:
        explanations: the table (``explanations.parquet``) or a run folder holding it.
        good_r: the threshold on ``score`` (default: simulation r on all held-out tokens; ``confirm_simulation_r``
            is the fold that did not choose the best).
    """
    import pandas as pd

    if not hasattr(explanations, "columns"):
        run = require_run(explanations)
        explanations = read_table(run / EXPLANATIONS)
    t = explanations[~explanations["kind"].isin([*BASELINES, "text"])]
    key = ["layer", "neuron", "direction"]
    best = t[t["is_best"]].set_index(key)
    good = t[t[score] >= good_r]
    cats = good[good["kind"] == "category"]
    cats = cats.assign(cat=cats["rule"].map(lambda r: json.loads(r).get("category")))
    good_cats = cats.groupby(key)["cat"].apply(lambda s: ",".join(sorted(set(s))))
    out = pd.DataFrame({"best_kind": best["kind"], "best_r": best[score]})
    out["explained"] = out["best_r"] >= good_r
    out["n_good"] = good.groupby(key).size().reindex(out.index).fillna(0).astype(int)
    out["good_categories"] = good_cats.reindex(out.index)
    out["disjoint_good"] = out["good_categories"].fillna("").str.count(",") >= 1
    return out.reset_index()
