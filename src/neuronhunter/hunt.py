"""The hunt: one streaming scan with concept labels, then selectivity scores and a verdict for every neuron.

Data flow::

    HuntConfig (a ScanConfig + lexicon + verdict thresholds)
      -> ConceptLabeller (words, not tokens: every BPE piece of a matched word is labelled)
      -> run_scan: the same single pass accumulates per-category sums/max/counts, per-position means and top-k
         (mergeable, resumable); the labeller also counts label co-occurrence (which categories share tokens)
      -> analysis.selectivity: CRS, d' vs unlabelled, entropy, responsive categories, verdict, champion
      -> run folder: neurons (+ selectivity columns and ``verdict``), concepts (+ ``dprime``, ``responsive``,
         ``selective``), top_neurons, hunt.json, lexicon.json; manifest.json rewritten last

Defaults: the embedded model, the bundled master text (``corpus="master"``) and the bundled lexicon.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from .analysis.selectivity import (
    Scores,
    VerdictThresholds,
    champion,
    features_from_state,
    score_neurons,
    top_neurons_per_category,
    verdict_counts,
)
from .config import ScanConfig
from .data.concepts import CategorySpec, ConceptLabeller, Lexicon, load_lexicon
from .errors import ConfigError
from .io import MANIFEST, write_json, write_table
from .runfolder import RunFolder, updating

if TYPE_CHECKING:
    import pandas as pd

    from .models.hooked import HookedModel
    from .results import ScanResult

log = logging.getLogger(__name__)

HUNT_FILE = "hunt.json"
LEXICON_FILE = "lexicon.json"
SCORE_COLUMNS = ("top_category", "top_mean", "second_category", "second_mean", "crs", "dprime", "entropy",
                 "n_categories", "categories", "control_dprime", "pos0_share", "pos0_max_share",
                 "topk_pos", "topk_pos_frac", "verdict")


class HuntConfig(ScanConfig):
    """A scan config with hunt defaults (master text, bundled lexicon) plus the verdict thresholds.

    The lexicon comes from ``categories`` (inline, same schema as the lexicon file's ``categories``) or else from the
    ``concepts`` file (``"default"`` = the bundled lexicon). A user adds a category by adding an entry to either.
    """

    corpus: str | None = Field("master", description="corpus spec (default: the bundled master text)")
    out: str = Field("runs/hunt", description="run folder")
    concepts: str | None = Field("default", description="lexicon file (YAML/JSON); 'default' = bundled lexicon")
    categories: dict[str, CategorySpec] | None = Field(None, description="inline lexicon categories (override concepts)")
    thresholds: VerdictThresholds = Field(default_factory=VerdictThresholds)
    top_per_category: int = Field(3, ge=1, description="top neurons per category and kind in the summary")

    @model_validator(mode="after")
    def _need_lexicon(self) -> HuntConfig:
        if self.concepts is None and not self.categories:
            raise ValueError("the hunt needs concept categories: set concepts (a lexicon file) or categories")
        return self

    def lexicon(self) -> Lexicon:
        """The validated lexicon (inline categories win over the lexicon file)."""
        if self.categories:
            return load_lexicon({"categories": {k: v.model_dump() for k, v in self.categories.items()}})
        return load_lexicon(self.concepts)

    def labeller(self) -> ConceptLabeller:
        return ConceptLabeller(self.lexicon(), case_sensitive=self.case_sensitive,
                               last_token_only=self.label_last_token_only)


class CooccurrenceLabeller:
    """Wraps a labeller and counts label co-occurrence ``[C, C]`` over every document it labels.

    Entry ``(a, b)`` is the number of tokens labelled both ``a`` and ``b``; the diagonal counts tokens per category.
    (Counted over the documents the scan reads, whole documents even when ``max_tokens`` cuts the last one.)
    """

    def __init__(self, inner: ConceptLabeller) -> None:
        self.inner = inner
        self.categories = list(inner.categories)
        self.control = list(inner.control)
        self.cooccurrence = np.zeros((len(self.categories),) * 2, dtype=np.int64)

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        labels = self.inner.label(text, offsets)
        if labels.shape[0]:
            m = labels.astype(np.int64)
            self.cooccurrence += m.T @ m
        return labels


def neurons_with_scores(base: pd.DataFrame, scores: Scores) -> pd.DataFrame:
    """A neurons table with the selectivity columns and ``verdict`` (replacing any from an earlier hunt)."""
    base = base.drop(columns=[c for c in SCORE_COLUMNS if c in base.columns])
    extra = scores.frame[["layer", "neuron", *SCORE_COLUMNS]]
    out = base.merge(extra, on=["layer", "neuron"], how="left", validate="one_to_one")
    if out["verdict"].isna().any():
        raise ConfigError("the neurons table and the scan statistics do not describe the same neurons")
    return out


def concepts_with_scores(base: pd.DataFrame, scores: Scores) -> pd.DataFrame:
    """A concepts table plus ``dprime`` (vs the unlabelled baseline), ``responsive`` and ``selective`` (responsive
    concept category of a monosemantic/polysemantic neuron); the ``unlabelled`` rows get NaN / False."""
    import pandas as pd

    base = base.drop(columns=[c for c in ("dprime", "responsive", "selective") if c in base.columns])
    frame = scores.frame
    n, c = scores.dprime.shape
    verdict = frame["verdict"].to_numpy()
    concept = np.array([cat not in scores.control for cat in scores.categories])
    long = pd.DataFrame({
        "layer": np.repeat(frame["layer"].to_numpy(), c),
        "neuron": np.repeat(frame["neuron"].to_numpy(), c),
        "category": np.tile(np.array(scores.categories, dtype=object), n),
        "dprime": scores.dprime.reshape(-1),
        "responsive": scores.responsive.reshape(-1),
        "selective": (scores.responsive & concept[None, :]
                      & np.isin(verdict, ["monosemantic", "polysemantic"])[:, None]).reshape(-1),
    })
    out = base.merge(long, on=["layer", "neuron", "category"], how="left")
    for col in ("responsive", "selective"):
        out[col] = out[col].astype("boolean").fillna(False).astype(bool)
    return out


@dataclass
class HuntResult:
    """Everything a hunt produced: scores and verdicts, the tables it writes, the champion and top neurons.

    Attributes:
        scores: per-neuron scores and per-(neuron, category) d' / responsiveness.
        neurons: the neurons table with the selectivity columns and ``verdict``.
        concepts: the concepts table with ``dprime``, ``responsive`` and ``selective``.
        top: top monosemantic and polysemantic neurons per category (ranked by d'), with their top example.
        champion: the strongest non-positional, non-dead neuron (dict) or None.
        manifest: the run manifest (``kind: hunt``).
        info: what ``hunt.json`` holds (thresholds, categories, co-occurrence, counts, champion).
        scan: the underlying scan (None when re-scored from a run folder).
    """

    scores: Scores
    neurons: pd.DataFrame
    concepts: pd.DataFrame
    top: pd.DataFrame
    champion: dict[str, Any] | None
    manifest: dict[str, Any]
    info: dict[str, Any]
    scan: ScanResult | None = None
    lexicon: Lexicon | None = None

    @property
    def categories(self) -> list[str]:
        return self.scores.categories

    @property
    def control(self) -> list[str]:
        return self.scores.control

    def verdict_counts(self) -> pd.DataFrame:
        """Verdicts per layer, plus a ``total`` row."""
        return verdict_counts(self.scores.frame)

    def write(self, out: str | Path, formats: tuple[str, ...] = ("parquet",),
              config: dict[str, Any] | None = None) -> None:
        """Write the hunt's tables into ``out`` (the manifest is written by the caller, last: a new run's
        :meth:`RunFolder.commit`, or :func:`~neuronhunter.runfolder.updating` for a re-scored one)."""
        out = Path(out)
        write_table(self.neurons, out / "neurons", formats=formats)
        write_table(self.concepts, out / "concepts", formats=formats)
        write_table(self.top, out / "top_neurons", formats=tuple(dict.fromkeys((*formats, "csv"))))  # small
        if self.lexicon is not None:
            write_json(out / LEXICON_FILE, self.lexicon.model_dump(mode="json"))
        if config is not None:
            write_json(out / "config.json", config)
        write_json(out / HUNT_FILE, self.info)


def assemble(
    scores: Scores,
    neurons: pd.DataFrame,
    concepts: pd.DataFrame,
    example: Callable[[int, int], str],
    manifest: dict[str, Any],
    labelled: list[int],
    *,
    thresholds: VerdictThresholds,
    cooccurrence: np.ndarray | None,
    top_per_category: int,
    tokens: int,
) -> HuntResult:
    """Build a :class:`HuntResult` from scores and the scan's tables (``example(layer, neuron)`` gives top text)."""
    neurons = neurons_with_scores(neurons, scores)
    concepts = concepts_with_scores(concepts, scores)
    top = top_neurons_per_category(scores, top_per_category)
    top["example"] = [example(int(r.layer), int(r.neuron)) for r in top.itertuples()]
    row = champion(scores.frame, neurons)
    champ = None
    if row is not None:
        layer, neuron = int(row["layer"]), int(row["neuron"])
        champ = {"layer": layer, "neuron": neuron, "max": float(row["max"]), "verdict": str(row["verdict"]),
                 "top_category": str(row["top_category"]), "categories": str(row["categories"]),
                 "example": example(layer, neuron)}
    totals = verdict_counts(scores.frame).loc["total"]
    verdicts = {k: int(v) for k, v in totals.items()}
    th = thresholds.model_dump(mode="json")
    info = {
        "tokens": int(tokens), "neurons": int(len(scores.frame)), "verdicts": verdicts, "champion": champ,
        "labelled_tokens": dict(zip([*scores.categories, "unlabelled"], [int(x) for x in labelled], strict=True)),
        "thresholds": th, "categories": scores.categories, "control": scores.control,
        "cooccurrence": None if cooccurrence is None else np.asarray(cooccurrence).tolist(),
    }
    manifest = {**manifest, "kind": "hunt", "control_categories": scores.control,
                "hunt": {"verdicts": verdicts, "thresholds": th}}
    return HuntResult(scores=scores, neurons=neurons, concepts=concepts, top=top, champion=champ,
                      manifest=manifest, info=info)


def top_example(scan: ScanResult, layer: int, neuron: int, rank: int = 0) -> str:
    """The context of a neuron's ``rank``-th top activation as the examples table renders it
    (:func:`~neuronhunter.results.render_example`; '' if none)."""
    from .results import TokenText, render_example

    ls = scan.state.layers[layer]
    if rank >= ls.topk.k:
        return ""
    wid, pos = int(ls.topk.window[rank, neuron]), int(ls.topk.pos[rank, neuron])
    win = scan.state.windows.get(wid)
    if wid < 0 or win is None:
        return ""
    left, right = scan.config.context_tokens
    return render_example(TokenText(scan.model.tokenizer), win.ids, pos, left=left, right=right,
                          first=1 if scan.bos_token_id is not None else 0)[1]


def _labelled_counts(state: Any) -> list[int]:
    ls = next(iter(state.layers.values()))
    return [int(x) for x in ls.concepts.count.tolist()]


def check_out(out: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse a run folder the hunt may not write (see :class:`~neuronhunter.runfolder.RunFolder`), before any
    model is loaded."""
    RunFolder(out, kind="hunt").check(overwrite=overwrite, resume=resume)


def run_hunt(
    cfg: HuntConfig | None = None,
    *,
    model: HookedModel | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    write: bool = True,
) -> HuntResult:
    """Scan with concept labels and give every neuron a verdict; write the run folder ``cfg.out``.

    Args:
        cfg: the hunt configuration (defaults: embedded model, master text, bundled lexicon).
        model: an already loaded model (else ``cfg.model`` is loaded).
        progress: called with ``(tokens_done, total_tokens)`` after each batch.
        overwrite: replace a complete run in ``cfg.out``.
        resume: continue an interrupted scan from its checkpoint.
        write: write the run folder (False: only return the result).
    """
    from .scan import run_scan

    cfg = cfg or HuntConfig()
    lexicon = cfg.lexicon()
    labeller = CooccurrenceLabeller(ConceptLabeller(lexicon, case_sensitive=cfg.case_sensitive,
                                                    last_token_only=cfg.label_last_token_only))
    if not [c for c in labeller.categories if c not in labeller.control]:
        raise ConfigError("the lexicon has only control categories; the hunt needs at least one concept category")
    folder = RunFolder(cfg.out, kind="hunt") if write else None
    if folder is not None:
        folder.check(overwrite=overwrite, resume=resume)  # fail before loading the model
    scan = run_scan(cfg, model=model, labeller=labeller, progress=progress, overwrite=overwrite, resume=resume,
                    write=write, write_manifest=False, folder=folder)
    features = features_from_state(scan.state, scan.categories)
    scores = score_neurons(features, labeller.control, cfg.thresholds, labeller.cooccurrence)
    if folder is not None:  # the scan just wrote its tables: reading them back is cheaper than rebuilding them
        from .io import read_table

        neurons, concepts = read_table(folder.work / "neurons.parquet"), read_table(folder.work / "concepts.parquet")
    else:
        neurons, concepts = scan.neurons_frame(), scan.concepts_frame()
    result = assemble(scores, neurons, concepts,
                      lambda layer, neuron: top_example(scan, layer, neuron), scan.manifest(),
                      _labelled_counts(scan.state), thresholds=cfg.thresholds, cooccurrence=labeller.cooccurrence,
                      top_per_category=cfg.top_per_category, tokens=scan.state.tokens)
    result.scan, result.lexicon = scan, lexicon
    if folder is not None:
        config = None
        if cfg.categories:  # tools that re-label text from config.json (verify, plot) find the inline lexicon
            config = cfg.model_dump(mode="json")
            config["concepts"] = str((Path(cfg.out) / LEXICON_FILE).resolve())
        result.write(folder.work, tuple(cfg.formats), config)
        folder.commit(result.manifest)
    return result


def rescore_run(run: str | Path, thresholds: VerdictThresholds | None = None, *,
                top_per_category: int | None = None, write: bool = True) -> HuntResult:
    """Give a finished run new verdicts from its stored statistics (``stats.pt``), without re-running the model.

    Works on a hunt run (new thresholds) and on a scan run made with a lexicon (turning it into a hunt run). The
    run's config.json records the thresholds used.
    """
    import torch

    from .io import read_json, read_table, require_run
    from .stats.state import ScanState

    run = require_run(run, "stats.pt", "neurons.parquet", "concepts.parquet")
    manifest = read_json(run / MANIFEST)
    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    info = read_json(run / HUNT_FILE) if (run / HUNT_FILE).exists() else {}
    categories = list(manifest.get("categories") or [])
    if not categories:
        raise ConfigError(f"{run} was scanned without concept categories; run `neuronhunter hunt` instead")
    if (run / LEXICON_FILE).exists():
        lexicon = load_lexicon(read_json(run / LEXICON_FILE))
    else:
        lexicon = load_lexicon(config.get("concepts") or None)
    if list(lexicon.categories) != categories:
        raise ConfigError(f"{run}: the lexicon's categories differ from the scanned ones")
    control = [c for c, spec in lexicon.categories.items() if spec.control]
    th = thresholds or VerdictThresholds.model_validate(config.get("thresholds") or {})
    top_n = top_per_category or int(config.get("top_per_category") or 3)
    state = ScanState.from_state_dict(torch.load(run / "stats.pt", weights_only=True))
    cooc = np.asarray(info["cooccurrence"]) if info.get("cooccurrence") is not None else None
    scores = score_neurons(features_from_state(state, categories), control, th, cooc)
    examples = {}
    if (run / "examples.parquet").exists():
        ex = read_table(run / "examples.parquet")
        first = ex[(ex["kind"] == "top") & (ex["rank"] == 0)] if "kind" in ex.columns else ex[ex["rank"] == 0]
        examples = {(int(a), int(b)): str(c)
                    for a, b, c in zip(first["layer"], first["neuron"], first["context"], strict=True)}
    result = assemble(scores, read_table(run / "neurons.parquet"), read_table(run / "concepts.parquet"),
                      lambda layer, neuron: examples.get((layer, neuron), ""), manifest, _labelled_counts(state),
                      thresholds=th, cooccurrence=cooc, top_per_category=top_n, tokens=state.tokens)
    result.lexicon = lexicon
    if write:
        formats = tuple(f for f in ("parquet", "csv", "json") if (run / f"neurons.{f}").exists())
        with updating(run) as current:
            result.write(run, formats, {**config, "thresholds": th.model_dump(mode="json"),
                                        "top_per_category": top_n})
            current.clear()
            current.update(result.manifest)
    return result


def activation_history(
    model: HookedModel,
    layer: int,
    neuron: int,
    text: str,
    labeller: ConceptLabeller,
    *,
    context_length: int = 128,
    prepend_bos: bool = True,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A neuron's activation on every token of ``text``, with the tokens' concept labels.

    The text is cut into windows exactly as the scan cuts a document (BOS prepended to each window when asked);
    the BOS tokens are dropped except the first one, which is returned as token 0.

    Returns:
        ``(tokens [T], activations [T], labels bool [T, C])``; with ``prepend_bos`` token 0 is the BOS token.
    """
    import torch

    from .data.batches import iter_windows
    from .data.corpus import Document
    from .errors import SiteError
    from .models.sites import Site

    model.check_layers([layer])
    if not 0 <= neuron < model.d_mlp:
        raise SiteError(f"neuron {neuron} is out of range: layer {layer} has neurons 0..{model.d_mlp - 1}")
    if not text.strip():
        raise ConfigError("the text is empty")
    bos = model.bos_token_id if prepend_bos else None
    site = Site.mlp_post(layer)
    ids: list[int] = []
    acts: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    windows = iter_windows([Document(0, text, "text")], model.tokenizer, context_length=context_length,
                           bos_token_id=bos, labeller=labeller)
    for w in windows:
        keep = 1 if (bos is not None and ids) else 0  # drop repeated BOS tokens after the first window
        _, cache = model.run_with_cache(torch.tensor([w.ids]), sites=[site], stop_at_layer=layer + 1)
        a = cache[site][0, :, neuron].float().cpu().numpy()
        ids.extend(w.ids[keep:])
        acts.append(a[keep:])
        labels.append(w.labels[keep:])
    tokens = model.to_str_tokens(ids)
    return tokens, np.concatenate(acts), np.concatenate(labels).astype(bool)
