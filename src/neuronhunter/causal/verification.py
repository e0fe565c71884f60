"""Causal verification of the hunt's claims: does ablating a "category neuron" hurt that category specifically?

The hunt labels neurons from correlations (which concepts they fire on). ``verify`` tests the claim causally:

1. **Candidates.** For each verdict (``monosemantic``, ``polysemantic`` by default) and each top category, the
   ``top_k`` neurons, ranked by the hunt's d' of the top category (else its mean response, from
   ``concepts.parquet``, else CRS or max activation). A neuron's *claimed categories* are the categories the hunt
   found it responsive to (``categories``: one related group for a monosemantic neuron, several for a
   polysemantic one), or its ``top_category`` when that list is absent.
2. **Effect.** Each candidate is ablated alone (mean ablation over the verification corpus by default) and the
   per-token increase of next-token loss is measured. With ``align="input"`` a token "belongs to" a category when
   the *input* token at that position carries the label (where the neuron fires; the loss is that of predicting
   the next token); ``target`` uses the predicted token's label, ``either`` both::

       causal_effect = mean Δloss(category tokens) - mean Δloss(other tokens)

3. **Baseline.** ``n_random`` random neurons of the same layer are ablated the same way and scored against the
   same category tokens. A claim is **causally confirmed** when ``causal_effect > 0``, the category has at least
   ``min_tokens`` tokens, ``z = (causal_effect - mean_random) / std_random >= z_threshold``, and the effect beats
   every random neuron (an empirical p-value of ``1 / (n_random + 1)``; raise ``n_random`` for stronger claims).

``neurons.parquet`` gains ``causal_effect``, ``causal_z`` and ``causally_confirmed`` (NaN / NaN / False for neurons
that were not tested); ``verification.parquet`` holds the details and ``verification.json`` the summary.

Single-neuron effects in a 30-layer model are small (often < 0.01 nats on average); the random baseline is what
makes them interpretable. Costs one forward pass over the corpus per ablated neuron: keep the corpus small
(``max_tokens``) on a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..models.hooked import HookedModel
from ..models.sites import Site
from ..stats.tokens import n_counted
from .interventions import TokenTable, ablation_factory, corpus_losses, reference_means

log = logging.getLogger(__name__)

CLAIM_VERDICTS = ("monosemantic", "polysemantic")


@dataclass
class VerifyConfig:
    """Options of :func:`verify_neurons` / :func:`verify_run` (see the module docstring)."""

    top_k: int = 3
    verdicts: tuple[str, ...] = CLAIM_VERDICTS
    n_random: int = 5
    method: str = "mean"
    align: str = "input"
    z_threshold: float = 2.0
    min_tokens: int = 5
    max_tokens: int | None = 2048
    batch_size: int = 8
    seed: int = 0
    categories: tuple[str, ...] | None = None  # only claims whose top category is one of these

    def check(self) -> None:
        if self.top_k < 1 or self.n_random < 2:
            raise ConfigError("verify needs top_k >= 1 and n_random >= 2 (the baseline needs a spread)")
        if self.method not in ("zero", "mean", "resample"):
            raise ConfigError(f"unknown ablation method {self.method!r}; use zero, mean or resample")
        if self.align not in ("input", "target", "either"):
            raise ConfigError(f"align must be input, target or either, got {self.align!r}")


def run_settings(run: str | Path) -> dict[str, Any]:
    """Model, corpus and windowing of a run folder (from its ``config.json``), with defaults."""
    from ..io import read_json, require_run

    run = require_run(run)
    cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
    # the hunt stores the exact lexicon it used as lexicon.json; else the config names a lexicon file
    lexicon = read_json(run / "lexicon.json") if (run / "lexicon.json").exists() else None
    if lexicon is None and cfg.get("categories"):
        lexicon = {"categories": cfg["categories"]}
    return {"model": cfg.get("model") or "smollm2-135m", "corpus": cfg.get("corpus"),
            "context_length": int(cfg.get("context_length") or 128), "prepend_bos": bool(cfg.get("prepend_bos", True)),
            "lexicon": lexicon or cfg.get("categories_file") or cfg.get("concepts"),
            "labeller_options": {"last_token_only": bool(cfg.get("label_last_token_only", False)),
                                 "case_sensitive": bool(cfg.get("case_sensitive", False))}}


def _as_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [v for v in value.split(";") if v]
    return [str(v) for v in list(value)]


def select_candidates(neurons: Any, *, top_k: int = 3, verdicts: Sequence[str] = CLAIM_VERDICTS,
                      concepts: Any = None, categories: Sequence[str] | None = None) -> Any:
    """The neurons to verify: top ``top_k`` per (verdict, top category), with their claimed categories.

    Returns:
        a DataFrame ``layer, neuron, verdict, top_category, claimed (list), strength``.
    """
    import pandas as pd

    need = {"layer", "neuron", "verdict", "top_category"}
    if not need <= set(neurons.columns):
        raise ConfigError(f"neurons.parquet has no hunt results (missing {', '.join(sorted(need - set(neurons.columns)))});"
                          " run `neuronhunter hunt` first")
    df = neurons[neurons.verdict.isin(list(verdicts)) & neurons.top_category.notna()
                 & (neurons.top_category.astype(str) != "")].copy()
    if categories is not None:
        df = df[df.top_category.isin(list(categories))]
    if df.empty:
        return pd.DataFrame(columns=["layer", "neuron", "verdict", "top_category", "claimed", "strength"])
    col = next((c for c in ("dprime", "top_mean") if c in df.columns), None)
    if col is None and concepts is not None and {"layer", "neuron", "category", "mean"} <= set(concepts.columns):
        strength = concepts.rename(columns={"category": "top_category", "mean": "strength"})
        df = df.merge(strength[["layer", "neuron", "top_category", "strength"]], how="left",
                      on=["layer", "neuron", "top_category"])
    else:
        col = col or next((c for c in ("crs", "max", "mean") if c in df.columns), None)
        df["strength"] = df[col] if col else 0.0
    cats = df["categories"] if "categories" in df.columns else [None] * len(df)
    df["claimed"] = [_as_list(c) or [t] for t, c in zip(df.top_category, cats, strict=True)]
    df = df.sort_values(["verdict", "top_category", "strength"], ascending=[True, True, False], kind="stable")
    df = df.groupby(["verdict", "top_category"], sort=True).head(top_k)
    return df[["layer", "neuron", "verdict", "top_category", "claimed", "strength"]].reset_index(drop=True)


def _effect(delta: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any() or mask.all():
        return float("nan")
    return float(delta[mask].mean() - delta[~mask].mean())


def verify_neurons(model: HookedModel, batches: Sequence[Any], categories: Sequence[str], candidates: Any,
                   config: VerifyConfig | None = None, *, progress: Callable[[], None] | None = None) -> Any:
    """Ablate each candidate and a random same-layer baseline; score the claims (module docstring).

    Args:
        batches: labelled TokenBatches (the label columns are ``categories``).
        candidates: a DataFrame with ``layer, neuron, verdict, claimed`` (see :func:`select_candidates`).

    Returns:
        a DataFrame, one row per candidate: ``layer, neuron, verdict, top_category, claimed, n_category_tokens,
        delta_category, delta_other, causal_effect, baseline_mean, baseline_std, causal_z, causally_confirmed``.
    """
    import pandas as pd

    cfg = config or VerifyConfig()
    cfg.check()
    tokens = TokenTable.from_batches(batches)
    if tokens.labels_input is None:
        raise ConfigError("verification needs concept-labelled tokens")
    cats = list(categories)
    layers = sorted({int(x) for x in candidates.layer})
    model.check_layers(layers)
    for L, n in zip(candidates.layer, candidates.neuron, strict=True):
        if not 0 <= int(n) < model.d_mlp:
            raise ConfigError(f"neuron {L}.{n} is out of range for {model.name} (d_mlp {model.d_mlp})")
    means = None
    if cfg.method == "mean" and layers:
        means = reference_means(model, [Site(L, "mlp.hook_post") for L in layers], batches)

    def deltas(neurons: list[tuple[int, int]]) -> np.ndarray:
        make = ablation_factory(model, neurons=neurons, method=cfg.method, means=means)
        return corpus_losses(model, batches, make) - clean

    clean = corpus_losses(model, batches)
    rng = np.random.default_rng(cfg.seed)
    chosen = {(int(a), int(b)) for a, b in zip(candidates.layer, candidates.neuron, strict=True)}
    random_deltas: dict[int, list[np.ndarray]] = {}
    for L in layers:
        pool = np.array([n for n in range(model.d_mlp) if (L, n) not in chosen])
        picks = rng.choice(pool, size=min(cfg.n_random, len(pool)), replace=False)
        random_deltas[L] = []
        for n in picks:
            random_deltas[L].append(deltas([(L, int(n))]))
            if progress is not None:
                progress()
    own: dict[tuple[int, int], np.ndarray] = {}
    rows = []
    for r in candidates.itertuples(index=False):
        unit = (int(r.layer), int(r.neuron))
        if unit not in own:
            own[unit] = deltas([unit])
            if progress is not None:
                progress()
        claimed = [c for c in _as_list(r.claimed) if c in cats]
        unknown = [c for c in _as_list(r.claimed) if c not in cats]
        if unknown:
            log.warning("neuron %d.%d: categories %s are not labelled in this corpus", *unit, unknown)
        mask = tokens.category_mask([cats.index(c) for c in claimed], cfg.align) if claimed else np.zeros(len(tokens), bool)
        d = own[unit]
        effect = _effect(d, mask)
        base = np.array([_effect(x, mask) for x in random_deltas[unit[0]]])
        base = base[np.isfinite(base)]
        b_mean = float(base.mean()) if len(base) else float("nan")
        b_std = float(base.std(ddof=1)) if len(base) > 1 else float("nan")
        z = (effect - b_mean) / max(b_std, 1e-9) if np.isfinite(effect) and np.isfinite(b_std) else float("nan")
        b_max = float(base.max()) if len(base) else float("nan")
        confirmed = bool(np.isfinite(z) and effect > 0 and z >= cfg.z_threshold and effect > b_max
                         and mask.sum() >= cfg.min_tokens)
        rows.append({"layer": unit[0], "neuron": unit[1], "verdict": r.verdict,
                     "top_category": getattr(r, "top_category", claimed[0] if claimed else None),
                     "claimed": _as_list(r.claimed), "n_category_tokens": int(mask.sum()),
                     "delta_category": float(d[mask].mean()) if mask.any() else float("nan"),
                     "delta_other": float(d[~mask].mean()) if (~mask).any() else float("nan"),
                     "delta_all": float(d.mean()), "causal_effect": effect, "baseline_mean": b_mean,
                     "baseline_std": b_std, "baseline_max": b_max, "causal_z": float(z),
                     "causally_confirmed": confirmed})
    return pd.DataFrame(rows)


def summarise(results: Any, config: VerifyConfig | None = None) -> dict[str, Any]:
    """How many claims per verdict (and category) were tested and confirmed."""
    out: dict[str, Any] = {"config": asdict(config) if config else None, "by_verdict": {}, "by_category": {}}
    for verdict, g in results.groupby("verdict"):
        out["by_verdict"][str(verdict)] = {"tested": int(len(g)), "confirmed": int(g.causally_confirmed.sum())}
    for cat, g in results.groupby("top_category"):
        out["by_category"][str(cat)] = {"tested": int(len(g)), "confirmed": int(g.causally_confirmed.sum())}
    out["tested"] = int(len(results))
    out["confirmed"] = int(results.causally_confirmed.sum()) if len(results) else 0
    return out


def update_neurons_table(run: Path, results: Any) -> Path:
    """Add ``causal_effect``, ``causal_z`` and ``causally_confirmed`` to ``RUN/neurons.parquet`` (atomically)."""
    from ..io import read_table, write_table

    neurons = read_table(run / "neurons.parquet")
    neurons = neurons.drop(columns=[c for c in ("causal_effect", "causal_z", "causally_confirmed")
                                    if c in neurons.columns])
    res = results.drop_duplicates(["layer", "neuron"])[["layer", "neuron", "causal_effect", "causal_z",
                                                        "causally_confirmed"]]
    merged = neurons.merge(res, how="left", on=["layer", "neuron"])
    merged["causally_confirmed"] = merged["causally_confirmed"].astype("boolean").fillna(False).astype(bool)
    formats = ("parquet", "csv") if (run / "neurons.csv").exists() else ("parquet",)
    write_table(merged, run / "neurons", formats=formats)
    return run / "neurons.parquet"


def verify_run(run: str | Path, model: HookedModel | None = None, config: VerifyConfig | None = None, *,
               corpus: Any = None, labeller: Any = None, progress_total: Callable[[int], None] | None = None,
               progress: Callable[[], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Verify a hunt run folder and write the results into it (module docstring).

    Args:
        model: the loaded model (default: the run's model).
        corpus: a corpus spec overriding the run's corpus.
        labeller: a TokenLabeller overriding the run's concept categories.
        progress_total: called once with the number of ablations, before they start.

    Returns:
        ``(results DataFrame, summary dict)``.
    """
    from ..io import read_table, require_run, write_json, write_table
    from ..models import load_model
    from ..runfolder import updating
    from .interventions import corpus_batches, load_concept_labeller

    cfg = config or VerifyConfig()
    cfg.check()
    run = require_run(run, "neurons.parquet")
    settings = run_settings(run)
    neurons = read_table(run / "neurons.parquet")
    concepts = read_table(run / "concepts.parquet") if (run / "concepts.parquet").exists() else None
    candidates = select_candidates(neurons, top_k=cfg.top_k, verdicts=cfg.verdicts, concepts=concepts,
                                   categories=cfg.categories)
    if candidates.empty:
        raise ConfigError(f"{run} has no neurons with verdicts {', '.join(cfg.verdicts)} to verify")
    model = model or load_model(settings["model"])
    labeller = labeller or load_concept_labeller(settings["lexicon"], **settings["labeller_options"])
    batches = corpus_batches(model, corpus if corpus is not None else settings["corpus"],
                             context_length=settings["context_length"], max_tokens=cfg.max_tokens,
                             batch_size=cfg.batch_size, prepend_bos=settings["prepend_bos"], labeller=labeller)
    if progress_total is not None:
        n_layers = candidates.layer.nunique()
        n_units = len(candidates[["layer", "neuron"]].drop_duplicates())
        progress_total(n_units + n_layers * cfg.n_random)
    results = verify_neurons(model, batches, labeller.categories, candidates, cfg, progress=progress)
    summary = summarise(results, cfg)
    summary["n_tokens"] = sum(n_counted(b.attention_mask) for b in batches)
    summary["run"] = str(run)
    with updating(run) as manifest:  # the run reads as incomplete while its neurons table is rewritten
        write_table(results, run / "verification", formats=("parquet", "csv"))
        update_neurons_table(run, results)
        write_json(run / "verification.json", summary)
        manifest["verification"] = {"tested": summary["tested"], "confirmed": summary["confirmed"]}
    return results, summary
