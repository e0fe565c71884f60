"""``explain_run``: candidates from a run's train statistics, one held-out pass, scores, outputs.

Data flow::

    run folder (stats.pt from a scan/hunt of the *train* side; manifest corpus.split)
      -> candidates (tokens, context, category, position, domain + baselines) per neuron and direction
      -> held-out pass (HeldoutScanner: the scan engine over the held-out documents, or another corpus)
      -> scores per candidate (all held-out documents; fold 0 to choose the best, fold 1 to report it)
      -> optional text explanations for a sample of neurons (explainer + simulator models, :mod:`.text`)
      -> explanations.parquet, best-explanation columns in neurons.parquet, manifest["explain"] (in place)

A run that read every document of its corpus (``split: all``) has no held-out text: it is refused unless another
corpus is given (``corpus=...``, read whole and recorded as ``scored_on``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from ...config import ScanConfig, StrictModel
from ...errors import ConfigError, RunDirError
from ...io import MANIFEST, read_json, require_run
from .candidates import BASELINES, KINDS, CandidateSet, CandidateSettings, derive_candidates, render
from .features import Vocabulary
from .heldout import ExplainState, HeldoutScanner, run_heldout
from .metrics import SCORE_COLUMNS, layer_scores

if TYPE_CHECKING:
    import pandas as pd

    from ...models.hooked import HookedModel

log = logging.getLogger(__name__)

EXPLANATIONS = "explanations.parquet"
ISSUE_COLUMNS = ("layer", "neuron", "direction", "kind", "explanation", "simulation_r", "detection_f1",
                 "detection_auprc", "hard_negative_accuracy", "n_heldout_tokens", "is_best")
CONFIRM = ("simulation_r", "detection_f1", "detection_auprc", "detection_balanced_accuracy", "hard_negative_accuracy",
           "n_heldout_tokens")
NEURON_COLUMNS = ("explanation", "explanation_kind", "explanation_direction", "explanation_r", "explanation_f1",
                  "explanation_auprc", "explanation_hard_negative_accuracy", "explanation_tokens")


class ExplainConfig(StrictModel):
    """Options of ``neuronhunter explain``."""

    corpus: str | None = Field(None, description="score on this corpus (all of it) instead of the held-out side "
                               "of the run's corpus")
    text_field: str | None = Field(None, description="text field of a JSONL/Parquet --corpus [default: the run's]")
    max_tokens: int | None = Field(None, ge=1, description="stop the held-out pass after this many tokens")
    batch_size: int = Field(16, ge=1)
    device: str = Field("cpu")
    engine: str = Field("local", pattern="^(local|ray)$", description="local: one process; ray: the held-out pass "
                        "as shards on Ray (the scan's engine: same shards, merged in shard order)")
    workers: int | None = Field(None, ge=1, description="Ray actors [default: one per node, one per GPU on CUDA]")
    ray_address: str | None = Field(None, description="Ray cluster to join [default: start a local Ray]")
    shards: int = Field(16, ge=1, le=65536, description="shards of the held-out pass on Ray")
    high_fraction: float = Field(0.5, gt=0, le=1, description="high = above this fraction of the neuron's median "
                                 "top-k peak (train) in the direction")
    silent_fraction: float = Field(0.1, ge=0, lt=1, description="silent (hard negatives) = below this fraction")
    coverage: float = Field(0.8, gt=0, le=1, description="share of exemplar activation a token set must carry")
    max_elements: int = Field(8, ge=1, le=32, description="most tokens/positions in one explanation")
    seed: int = 0
    text_neurons: int = Field(0, ge=0, description="write text explanations for this many neurons (a seeded "
                              "sample of the well explained and the rest; 0 = none)")
    text_units: list[str] | None = Field(None, description="explicit neurons for text explanations ('L.N')")
    explainer: str = Field("embedded", description="'embedded' (the bundled instruct model) or the base URL of an "
                           "OpenAI-compatible chat endpoint (e.g. http://localhost:8080/v1)")
    explainer_model: str | None = Field(None, description="model name sent to the endpoint")
    simulator: str | None = Field(None, description="simulator: 'embedded' or an endpoint URL [default: the "
                                  "explainer]")
    text_windows: int = Field(6, ge=2, le=64, description="held-out excerpts per neuron for text simulation")

    @model_validator(mode="after")
    def _thresholds(self) -> ExplainConfig:
        if self.silent_fraction >= self.high_fraction:
            raise ValueError("silent_fraction must be below high_fraction")
        return self

    @field_validator("explainer", "simulator")
    @classmethod
    def _client(cls, value: str | None) -> str | None:
        if value is not None and value != "embedded" and not re.match(r"^https?://", value):
            raise ValueError(f"must be 'embedded' or an http(s) URL, not {value!r}")
        return value


@dataclass
class ExplainResult:
    """What ``explain_run`` produced: the explanations table, the per-neuron best columns, the manifest section."""

    explanations: pd.DataFrame
    best: pd.DataFrame
    info: dict[str, Any]
    state: ExplainState | None = None
    candidates: CandidateSet | None = None
    text: pd.DataFrame | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ run inputs
def run_lexicon(run: Path, config: dict[str, Any]) -> Any:
    """The lexicon a run was labelled with (``lexicon.json``, inline categories or the lexicon file), or None."""
    if (run / "lexicon.json").exists():
        return read_json(run / "lexicon.json")
    if config.get("categories"):
        return {"categories": config["categories"]}
    return config.get("concepts")


def scoring_side(manifest: dict[str, Any], config: dict[str, Any], cfg: ExplainConfig) -> dict[str, Any]:
    """Which documents the held-out pass reads (see the module docstring); refuses a run without held-out text."""
    split = (manifest.get("corpus") or {}).get("split") or {"side": "all"}
    run_corpus = config.get("corpus") or (manifest.get("corpus") or {}).get("spec")
    if cfg.corpus is not None:
        return {"corpus": cfg.corpus, "side": "all", "heldout_fraction": float(split.get("heldout_fraction", 0.3)),
                "split_seed": int(split.get("seed", 0)), "derived_from": {"corpus": run_corpus, **split}}
    if split.get("side") != "train":
        raise RunDirError(f"the run read {'every document' if split.get('side', 'all') == 'all' else 'the held-out side'}"
                          f" of its corpus (split {split.get('side', 'all')!r}): no text is left that it has not "
                          "seen; rerun it on the train side (--split train) or score on another corpus (--corpus)")
    return {"corpus": run_corpus, "side": "heldout", "heldout_fraction": float(split["heldout_fraction"]),
            "split_seed": int(split["seed"]), "derived_from": {"corpus": run_corpus, **split}}


def scan_config(config: dict[str, Any], manifest: dict[str, Any], side: dict[str, Any], cfg: ExplainConfig) -> ScanConfig:
    """The scan settings of the held-out pass: the run's windowing and token policy, the scoring documents."""
    allowed = set(ScanConfig.model_fields)
    base = {k: v for k, v in config.items() if k in allowed}
    base.update(corpus=side["corpus"], split=side["side"], heldout_fraction=side["heldout_fraction"],
                split_seed=side["split_seed"], max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                device=cfg.device, layers=list(manifest.get("layers") or []) or None,
                neurons_per_layer=manifest.get("neurons_per_layer"), checkpoint_every=0, compile_stats=False,
                out="unused", concepts=None, formats=["parquet"], engine=cfg.engine, workers=cfg.workers,
                ray_address=cfg.ray_address, shards=cfg.shards, shard_store=None)
    if cfg.text_field is not None:
        base["text_field"] = cfg.text_field
    elif cfg.corpus is not None:
        base["text_field"] = "text"
    try:
        return ScanConfig.model_validate(base)
    except Exception as exc:  # pydantic: one line
        raise ConfigError(f"cannot rebuild the run's scan settings: {exc}".splitlines()[0]) from None


def train_domains(config: dict[str, Any], side: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """Domain names of the run's train documents and their sources (source -> domain index)."""
    from ...data.corpus import Corpus
    from ...data.split import DocumentSplit

    derived = side["derived_from"]
    spec = derived.get("corpus")
    corpus = Corpus(spec, text_field=config.get("text_field", "text"), on_error=config.get("on_bad_document", "skip"))
    chooser = DocumentSplit(float(derived.get("heldout_fraction", 0.3)), int(derived.get("seed", 0)))
    by_source: dict[str, str] = {}
    for doc in chooser.select(corpus, derived.get("side", "all")):
        by_source[doc.source] = doc.domain
    names = sorted(set(by_source.values()))
    index = {n: i for i, n in enumerate(names)}
    return names, {s: index[d] for s, d in by_source.items()}


# ------------------------------------------------------------------------------------------------ tables
def explanation_table(cands: CandidateSet, state: ExplainState, vocab: Vocabulary, scored_on: str) -> pd.DataFrame:
    """One row per candidate: the issue's columns, more detection scores, fold scores, the rule as JSON."""
    import pandas as pd

    counts = state.feature_counts.numpy()
    frames = []
    cache: dict[tuple, tuple[str, str]] = {}
    for layer, lc in sorted(cands.layers.items()):
        scorer = state.layers[layer]
        allf = layer_scores(lc, scorer, counts, (0, 1))
        sel = layer_scores(lc, scorer, counts, (0,))
        conf = layer_scores(lc, scorer, counts, (1,))
        texts, rules = [], []
        for i in range(len(lc.neuron)):
            keys = tuple(int(k) for k in lc.keys[i] if k >= 0)
            key = (lc.family[i], lc.kind[i], keys)
            hit = cache.get(key)
            if hit is None:
                text, rule = render(lc.family[i], lc.kind[i], list(keys), vocab, cands.space)
                weights = [round(float(w), 4) for w, k in zip(lc.weight[i], lc.keys[i], strict=True) if k >= 0]
                hit = cache[key] = (text, json.dumps({**rule, "weights": weights}, ensure_ascii=False))
            texts.append(hit[0])
            rules.append(hit[1])
        frame = pd.DataFrame({
            "layer": np.full(len(lc.neuron), layer, dtype=np.int32), "neuron": lc.neuron.astype(np.int32),
            "direction": np.where(lc.direction == 0, "+", "-"), "kind": lc.kind.astype(str),
            "explanation": texts, **{c: allf[c] for c in SCORE_COLUMNS},
            "n_elements": (lc.keys >= 0).sum(1).astype(np.int16),
            "simulation_r_select": sel["simulation_r"],
            **{f"confirm_{c}": conf[c] for c in CONFIRM},
            "rule": rules,
        })
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ISSUE_COLUMNS))
    table["scored_on"] = scored_on
    table["is_best"] = best_mask(table)
    return table


def best_mask(table: pd.DataFrame) -> np.ndarray:
    """The best explanation of every (neuron, direction): the highest simulation r on held-out fold 0 among the
    non-baseline kinds (ties: the kind listed first in :data:`KINDS`); none when no candidate has a score."""
    if not len(table):
        return np.zeros(0, dtype=bool)
    score = table["simulation_r_select"].to_numpy(dtype=np.float64)
    eligible = ~table["kind"].isin(BASELINES).to_numpy() & np.isfinite(score)
    kind_rank = table["kind"].map({k: i for i, k in enumerate(KINDS)}).fillna(len(KINDS)).to_numpy()
    order = np.lexsort((np.arange(len(table)), kind_rank, -np.where(eligible, score, -np.inf),
                        (table["direction"] == "-").to_numpy(), table["neuron"].to_numpy(), table["layer"].to_numpy()))
    key = table[["layer", "neuron", "direction"]].to_numpy()[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (key[1:] != key[:-1]).any(1)
    out = np.zeros(len(table), dtype=bool)
    out[order[first & eligible[order]]] = True
    return out


def best_per_neuron(table: pd.DataFrame, neurons: pd.DataFrame) -> pd.DataFrame:
    """One row per neuron: its best explanation in the direction the hunt's verdict is about (the ``direction``
    column of ``neurons``, when present), else in the direction whose best scores higher on fold 0; the scores are
    those of fold 1 (see :mod:`.heldout`)."""
    import pandas as pd

    best = table[table["is_best"]].copy()
    best["_rank"] = -best["simulation_r_select"].fillna(-np.inf)
    if "direction" in neurons.columns:
        wanted = neurons[["layer", "neuron", "direction"]].rename(columns={"direction": "_wanted"})
        best = best.merge(wanted, on=["layer", "neuron"], how="left")
        best["_rank"] = np.where(best["direction"] == best["_wanted"], -np.inf, best["_rank"])
    best = best.sort_values(["layer", "neuron", "_rank", "direction"], kind="stable")
    chosen = best.drop_duplicates(["layer", "neuron"], keep="first")
    return pd.DataFrame({
        "layer": chosen["layer"].to_numpy(), "neuron": chosen["neuron"].to_numpy(),
        "explanation": chosen["explanation"].to_numpy(), "explanation_kind": chosen["kind"].to_numpy(),
        "explanation_direction": chosen["direction"].to_numpy(),
        "explanation_r": chosen["confirm_simulation_r"].to_numpy(),
        "explanation_f1": chosen["confirm_detection_f1"].to_numpy(),
        "explanation_auprc": chosen["confirm_detection_auprc"].to_numpy(),
        "explanation_hard_negative_accuracy": chosen["confirm_hard_negative_accuracy"].to_numpy(),
        "explanation_tokens": chosen["confirm_n_heldout_tokens"].to_numpy(),
    })


def neurons_with_explanations(neurons: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    base = neurons.drop(columns=[c for c in NEURON_COLUMNS if c in neurons.columns])
    return base.merge(best, on=["layer", "neuron"], how="left")


# ------------------------------------------------------------------------------------------------ entry point
def explain_run(run: str | Path, cfg: ExplainConfig | None = None, *, model: HookedModel | None = None,
                progress: Callable[[int, int | None], None] | None = None, write: bool = True) -> ExplainResult:
    """Explain every neuron of a finished scan/hunt run and score the explanations on held-out text.

    Args:
        run: the run folder (needs ``stats.pt`` and ``neurons.parquet``; concept categories when the run has a
            lexicon).
        cfg: options (defaults: held-out side of the run's corpus, no text explanations).
        model: the run's model, already loaded (else loaded by name from the run's config).
        progress: called with ``(tokens_done, total)`` during the held-out pass.
        write: write ``explanations.parquet`` and the new ``neurons.parquet`` columns into the run, in place.
    """

    from ...data.concepts import ConceptLabeller
    from ...io import read_table
    from ...models.loading import load_model
    from ...stats.state import load_state, model_fingerprint

    cfg = cfg or ExplainConfig()
    given = model  # a caller's model goes to Ray workers as it is (else they load the run's model by name)
    t0 = time.perf_counter()
    run = require_run(run, "stats.pt", "neurons.parquet")
    manifest = read_json(run / MANIFEST)
    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    side = scoring_side(manifest, config, cfg)
    scfg = scan_config(config, manifest, side, cfg)
    from ...data.corpus import Corpus

    Corpus(scfg.corpus, text_field=scfg.text_field, on_error=scfg.on_bad_document).check()  # type: ignore[arg-type]
    if model is None:
        model = load_model(config.get("model") or "smollm2-135m", device=cfg.device)
    want = manifest.get("model_fingerprint")
    if want and model_fingerprint(model.model) != want:
        raise RunDirError(f"the model's weights differ from those {run} was scanned with")
    timings = {"load_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    state = load_state(run / "stats.pt")[0]
    categories = list(manifest.get("categories") or [])
    labeller = None
    if categories:
        options = {"case_sensitive": bool(config.get("case_sensitive", False)),
                   "last_token_only": bool(config.get("label_last_token_only", False))}
        labeller = ConceptLabeller(run_lexicon(run, config), **options)
        if labeller.categories != categories:
            raise RunDirError(f"{run}: the lexicon's categories differ from the scanned ones")
    vocab = Vocabulary(model.tokenizer)
    domains, domain_of = train_domains(config, side)
    settings = CandidateSettings(high_fraction=cfg.high_fraction, silent_fraction=cfg.silent_fraction,
                                 coverage=cfg.coverage, max_elements=cfg.max_elements, seed=cfg.seed)
    cands = derive_candidates(state, vocab, categories=categories, domains=domains, domain_of=domain_of,
                              include_first=bool(manifest.get("include_first", False)),
                              bos=bool(manifest.get("prepend_bos", True)), settings=settings)
    del state
    timings["candidates_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    scanner = HeldoutScanner(model, scfg, labeller, cands, vocab, domains=cands.space.domains, fold_seed=cfg.seed)
    if scfg.engine == "ray":
        from .heldout import run_heldout_on_ray

        est, ray_timings = run_heldout_on_ray(scanner, run, model=given, progress=progress)
        timings.update({f"ray_{k}": v for k, v in ray_timings.items()})
    else:
        est = run_heldout(scanner, progress=progress)
    if est.tokens == 0:
        raise ConfigError("the held-out pass counted no tokens: the held-out documents are too few or too short "
                          "(raise the run's --heldout-fraction, or pass --corpus)")
    timings["heldout_s"] = time.perf_counter() - t2
    timings["heldout_tokens_per_s"] = est.tokens / max(timings["heldout_s"], 1e-9)
    t3 = time.perf_counter()
    scored_on = f"{side['corpus'] or 'default'}:{side['side']}"
    table = explanation_table(cands, est, vocab, scored_on)
    timings["scores_s"] = time.perf_counter() - t3
    neurons = read_table(run / "neurons.parquet")
    best = best_per_neuron(table, neurons)
    text = None
    if cfg.text_neurons or cfg.text_units:
        from .text import explain_text

        t4 = time.perf_counter()
        text = explain_text(model, scanner, table, best, run, cfg, vocab)
        table = merge_text(table, text)
        timings["text_s"] = time.perf_counter() - t4
    info = {
        "scored_on": {k: v for k, v in side.items() if k != "derived_from"} | {
            "label": scored_on, "documents": est.documents, "tokens": est.tokens, "windows": est.n_windows,
            "fold_documents": est.fold_documents, "fingerprint": f"{est.corpus_fp:064x}"},
        "derived_from": side["derived_from"],
        "settings": cfg.model_dump(mode="json"),
        "candidates": int(len(table)), "neurons": int(best.shape[0]),
        "kinds": {k: int(v) for k, v in table["kind"].value_counts().items()},
        "selection": "best = highest simulation r on held-out fold 0 among non-baseline kinds; neurons.parquet "
                     "reports its fold-1 scores; explanations.parquet reports every candidate on all held-out "
                     "documents",
        "timings": timings,
    }
    result = ExplainResult(table, best, info, est, cands, text, timings)
    if write:
        write_explanations(run, result, neurons)
    timings["total_s"] = time.perf_counter() - t0
    return result


def merge_text(table: pd.DataFrame, text: pd.DataFrame) -> pd.DataFrame:
    """Add the text explanations' rows (and recompute ``is_best``)."""
    import pandas as pd

    if text is None or not len(text):
        return table
    out = pd.concat([table, text[[c for c in text.columns if c in table.columns]]], ignore_index=True)
    out["is_best"] = best_mask(out)
    return out


def write_explanations(run: Path, result: ExplainResult, neurons: pd.DataFrame) -> None:
    """Write ``explanations.parquet`` and the best-explanation columns of ``neurons.parquet`` in place."""
    from ...io import compact_floats, write_table
    from ...runfolder import updating

    formats = tuple(f for f in ("parquet", "csv", "json") if (run / f"neurons.{f}").exists()) or ("parquet",)
    with updating(run) as manifest:
        write_table(compact_floats(result.explanations), run / "explanations", formats=("parquet",))
        write_table(neurons_with_explanations(neurons, result.best), run / "neurons", formats=formats)
        if result.text is not None and len(result.text):
            write_table(result.text, run / "explain" / "text", formats=("parquet", "csv"))
        manifest["explain"] = result.info
