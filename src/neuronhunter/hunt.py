"""The hunt: one streaming scan with concept labels, then two-sided selectivity scores and a verdict for every neuron.

Data flow::

    HuntConfig (a ScanConfig + lexicon + verdict thresholds; scans the train side of the document split)
      -> ConceptLabeller (words, not tokens: every BPE piece of a matched word is labelled; broad classes such as
         ``noun`` also hold their member categories' tokens)
      -> run_scan: the same single pass accumulates both tails (top-k and bottom-k windows, band samples),
         per-neuron histograms and per-category histograms on the same bins, per-category moments, position
         statistics (mergeable, resumable); the labeller also counts label co-occurrence
      -> judge.judge_state: per direction (+ reads a, - reads -a) precision / recall / F1 / AUPRC / hypergeometric
         p of every category over the neuron's high activations, word types of its top-k peaks, CRS and d';
         Benjamini-Hochberg over every test; verdict per direction, then per neuron, with flags
      -> run folder: neurons (+ verdict columns), directions (one row per neuron and direction), concepts
         (+ per-category, per-direction scores), top_neurons, hunt.json, lexicon.json; manifest.json last

Defaults: the embedded model, the train side (70% of the paragraphs) of the bundled master text and the bundled
lexicon; the held-out paragraphs are left for explanation scoring and causal verification.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from .config import ScanConfig
from .data.concepts import CategorySpec, ConceptLabeller, Lexicon, load_lexicon
from .errors import ConfigError
from .io import MANIFEST, compact_floats, write_json, write_table
from .judge.judgement import (
    PER_CATEGORY,
    SCORE_COLUMNS,
    Judgement,
    champion,
    direction_counts,
    judge_state,
    top_neurons_per_category,
    verdict_counts,
)
from .judge.thresholds import VerdictThresholds
from .runfolder import RunFolder, updating

if TYPE_CHECKING:
    import pandas as pd

    from .models.hooked import HookedModel
    from .results import ScanResult
    from .stats.state import ScanState

log = logging.getLogger(__name__)

HUNT_FILE = "hunt.json"
LEXICON_FILE = "lexicon.json"
CONCEPT_SCORE_COLUMNS = ("dprime", "responsive", "selective",
                         *(f"{k}_{tag}" for k in PER_CATEGORY for tag in ("pos", "neg")))


class HuntConfig(ScanConfig):
    """A scan config with hunt defaults (master text, train side, bundled lexicon) plus the verdict thresholds.

    The lexicon comes from ``categories`` (inline, same schema as the lexicon file's ``categories``) or else from the
    ``concepts`` file (``"default"`` = the bundled lexicon). A user adds a category by adding an entry to either.
    """

    corpus: str | None = Field("master", description="corpus spec (default: the bundled master text)")
    split: str = Field("train", pattern="^(all|train|heldout)$", description="which documents the hunt reads: "
                       "the train side by default, so explanations and verification can score on the held-out one")
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


def _text(value: Any) -> str:
    """A text cell as a string ('' for None / NaN)."""
    return value if isinstance(value, str) else ""


def includes_of(lexicon: Lexicon) -> dict[str, list[str]]:
    """The lexicon's broad classes: ``{class: [member categories]}``."""
    return {name: list(spec.includes) for name, spec in lexicon.categories.items() if spec.includes}


def neurons_with_scores(base: pd.DataFrame, judgement: Judgement) -> pd.DataFrame:
    """A neurons table with the verdict columns (replacing any from an earlier hunt)."""
    base = base.drop(columns=[c for c in SCORE_COLUMNS if c in base.columns])
    out = base.merge(judgement.neurons, on=["layer", "neuron"], how="left", validate="one_to_one")
    if out["verdict"].isna().any():
        raise ConfigError("the neurons table and the scan statistics do not describe the same neurons")
    return out


def concepts_with_scores(base: pd.DataFrame, judgement: Judgement) -> pd.DataFrame:
    """A concepts table plus ``dprime`` (+ direction, vs the unlabelled baseline), the per-direction scores
    ``precision_pos`` ... ``specific_neg``, ``responsive`` (specific in either direction) and ``selective`` (a
    category the neuron's monosemantic/polysemantic verdict claims); the ``unlabelled`` rows get NaN / False."""
    import pandas as pd

    base = base.drop(columns=[c for c in CONCEPT_SCORE_COLUMNS if c in base.columns])
    frame = judgement.neurons
    pc = judgement.per_category
    n, _, c = pc["precision"].shape
    cats = np.array(judgement.categories, dtype=object)
    long: dict[str, Any] = {
        "layer": np.repeat(frame["layer"].to_numpy(), c),
        "neuron": np.repeat(frame["neuron"].to_numpy(), c),
        "category": np.tile(cats, n),
    }
    for key in PER_CATEGORY:
        for di, tag in enumerate(("pos", "neg")):
            long[f"{key}_{tag}"] = pc[key][:, di, :].reshape(-1)
    long["responsive"] = (pc["specific"].any(1)).reshape(-1)
    claimed = [set(_text(cl).split(",")) | {_text(cc)} for cl, cc in zip(frame["claim_categories"],
                                                                          frame["claim_category"], strict=True)]
    mono_poly = frame["verdict"].isin(["monosemantic", "polysemantic"]).to_numpy()
    long["selective"] = np.array([[mono_poly[i] and cat in claimed[i] for cat in cats] for i in range(n)]).reshape(-1)
    out = base.merge(pd.DataFrame(long), on=["layer", "neuron", "category"], how="left")
    if "mean" in out.columns and "std" in out.columns:  # d' against the unlabelled baseline, direction +
        unl = out[out["category"] == "unlabelled"][["layer", "neuron", "mean", "std"]].rename(
            columns={"mean": "u_mean", "std": "u_std"})
        out = out.merge(unl, on=["layer", "neuron"], how="left")
        dp = (out["mean"] - out["u_mean"]) / np.sqrt((out["std"] ** 2 + out["u_std"] ** 2) / 2 + 1e-12)
        out["dprime"] = np.where(out["category"] == "unlabelled", np.nan, dp)
        out = out.drop(columns=["u_mean", "u_std"])
    for col in ("responsive", "selective", "specific_pos", "specific_neg"):
        out[col] = out[col].astype("boolean").fillna(False).astype(bool)
    return out


@dataclass
class HuntResult:
    """Everything a hunt produced: the judgement, the tables it writes, the champion and top neurons.

    Attributes:
        judgement: verdicts and scores (per neuron, per direction, per category).
        neurons: the neurons table with the verdict columns.
        directions: one row per neuron and direction.
        concepts: the concepts table with ``dprime``, per-direction scores, ``responsive`` and ``selective``.
        top: top monosemantic and polysemantic neurons per category (ranked by F1), with their top example.
        champion: the strongest non-positional, non-dead neuron (dict) or None.
        manifest: the run manifest (``kind: hunt``).
        info: what ``hunt.json`` holds (thresholds, categories, co-occurrence, counts, champion).
        scan: the underlying scan (None when re-scored from a run folder).
    """

    judgement: Judgement
    neurons: pd.DataFrame
    directions: pd.DataFrame
    concepts: pd.DataFrame
    top: pd.DataFrame
    champion: dict[str, Any] | None
    manifest: dict[str, Any]
    info: dict[str, Any]
    scan: ScanResult | None = None
    lexicon: Lexicon | None = None

    @property
    def categories(self) -> list[str]:
        return self.judgement.categories

    @property
    def control(self) -> list[str]:
        return self.judgement.control

    def verdict_counts(self) -> pd.DataFrame:
        """Verdicts per layer, plus a ``total`` row."""
        return verdict_counts(self.judgement.neurons)

    def direction_counts(self) -> pd.DataFrame:
        """Verdicts by the direction they are about."""
        return direction_counts(self.judgement.neurons)

    def write(self, out: str | Path, formats: tuple[str, ...] = ("parquet",),
              config: dict[str, Any] | None = None) -> None:
        """Write the hunt's tables into ``out`` (the manifest is written by the caller, last: a new run's
        :meth:`RunFolder.commit`, or :func:`~neuronhunter.runfolder.updating` for a re-scored one)."""
        out = Path(out)
        write_table(self.neurons, out / "neurons", formats=formats)
        write_table(compact_floats(self.directions), out / "directions", formats=formats)
        write_table(compact_floats(self.concepts), out / "concepts", formats=formats)
        write_table(self.top, out / "top_neurons", formats=tuple(dict.fromkeys((*formats, "csv"))))  # small
        if self.lexicon is not None:
            write_json(out / LEXICON_FILE, self.lexicon.model_dump(mode="json"))
        if config is not None:
            write_json(out / "config.json", config)
        write_json(out / HUNT_FILE, self.info)


def assemble(
    judgement: Judgement,
    neurons: pd.DataFrame,
    concepts: pd.DataFrame,
    example: Callable[[int, int, str], str],
    manifest: dict[str, Any],
    labelled: list[int],
    *,
    thresholds: VerdictThresholds,
    cooccurrence: np.ndarray | None,
    top_per_category: int,
    tokens: int,
) -> HuntResult:
    """Build a :class:`HuntResult` (``example(layer, neuron, direction)`` gives the top example's text)."""
    neurons = neurons_with_scores(neurons, judgement)
    concepts = concepts_with_scores(concepts, judgement)
    top = top_neurons_per_category(judgement, top_per_category)
    top["example"] = [example(int(r.layer), int(r.neuron), str(r.direction)) for r in top.itertuples()]
    row = champion(neurons)
    champ = None
    if row is not None:
        layer, neuron = int(row["layer"]), int(row["neuron"])
        side = "+" if row["max"] >= -row["min"] else "-"
        champ = {"layer": layer, "neuron": neuron, "activation": float(row["max"] if side == "+" else row["min"]),
                 "direction": side, "verdict": str(row["verdict"]), "verdict_direction": str(row["direction"]),
                 "claim": _text(row["claim_category"]) or _text(row["claim_categories"]) or _text(row["claim_token"]),
                 "flags": str(row["flags"]), "example": example(layer, neuron, side)}
    totals = verdict_counts(judgement.neurons).loc["total"]
    verdicts = {k: int(v) for k, v in totals.items()}
    dirs = direction_counts(judgement.neurons)
    by_direction = {v: {"+": int(dirs.loc[v, "+"]), "-": int(dirs.loc[v, "-"])} for v in dirs.index}
    th = thresholds.model_dump(mode="json")
    info = {
        "tokens": int(tokens), "neurons": int(len(judgement.neurons)), "verdicts": verdicts,
        "verdicts_by_direction": by_direction, "champion": champ,
        "labelled_tokens": dict(zip([*judgement.categories, "unlabelled"], [int(x) for x in labelled], strict=True)),
        "thresholds": th, "categories": judgement.categories, "control": judgement.control,
        "layer_scale": {str(k): v for k, v in judgement.layer_scale.items()},
        "cooccurrence": None if cooccurrence is None else np.asarray(cooccurrence).tolist(),
        "split": (manifest.get("corpus") or {}).get("split"),
    }
    manifest = {**manifest, "kind": "hunt", "control_categories": judgement.control,
                "hunt": {"verdicts": verdicts, "verdicts_by_direction": by_direction, "thresholds": th,
                         "judged_on": (manifest.get("corpus") or {}).get("split")}}
    return HuntResult(judgement=judgement, neurons=neurons, directions=judgement.directions, concepts=concepts,
                      top=top, champion=champ, manifest=manifest, info=info)


def top_example(scan: ScanResult, layer: int, neuron: int, direction: str = "+", rank: int = 0) -> str:
    """The context of a neuron's ``rank``-th strongest activation in ``direction`` (top-k for ``+``, bottom-k for
    ``-``) as the examples table renders it (:func:`~neuronhunter.results.render_example`; '' if none)."""
    from .results import TokenText, render_example

    ls = scan.state.layers[layer]
    topk = ls.topk if direction == "+" else ls.bottomk
    if rank >= topk.k:
        return ""
    wid, pos = int(topk.window[rank, neuron]), int(topk.pos[rank, neuron])
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
        cfg: the hunt configuration (defaults: embedded model, train side of the master text, bundled lexicon).
        model: an already loaded model (else ``cfg.model`` is loaded).
        progress: called with ``(tokens_done, total_tokens)`` after each batch.
        overwrite: replace a complete run in ``cfg.out``.
        resume: continue an interrupted scan from its checkpoint.
        write: write the run folder (False: only return the result).
    """
    from .results import TokenText
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
    judgement = judge_state(scan.state, scan.categories, labeller.control, cfg.thresholds,
                            decode=TokenText(scan.model.tokenizer), includes=includes_of(lexicon),
                            cooccurrence=labeller.cooccurrence)
    if folder is not None:  # the scan just wrote its tables: reading them back is cheaper than rebuilding them
        from .io import read_table

        neurons, concepts = read_table(folder.work / "neurons.parquet"), read_table(folder.work / "concepts.parquet")
    else:
        neurons, concepts = scan.neurons_frame(), scan.concepts_frame()
    result = assemble(judgement, neurons, concepts,
                      lambda layer, neuron, direction: top_example(scan, layer, neuron, direction), scan.manifest(),
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


def _examples_decoder(run: Path, state: ScanState) -> tuple[Callable[[int], str], dict[tuple[int, int, str], str]]:
    """For a finished run: token id -> string (from the top/bottom exemplars' tokens, the only tokens the verdicts
    decode) and ``(layer, neuron, direction) -> context`` of each neuron's strongest exemplar."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = run / "examples.parquet"
    if not path.exists():
        raise ConfigError(f"{run} has no examples.parquet; run `neuronhunter hunt` instead")
    table = pq.read_table(path, columns=["layer", "neuron", "kind", "direction", "rank", "window", "window_pos",
                                         "token", "context"])
    table = table.filter(pc.is_in(table["kind"].cast("string"), value_set=pa.array(["top", "bottom"])))
    names: dict[int, str] = {}
    for wid, wpos, tok in zip(table["window"].to_numpy(), table["window_pos"].to_numpy(),
                              table["token"].cast("string").to_pylist(), strict=True):
        win = state.windows.get(int(wid))
        if win is not None:
            names.setdefault(int(win.ids[int(wpos)]), tok)
    first = table.filter(pc.equal(table["rank"], 0))
    contexts = {(int(a), int(b), str(c)): str(d) for a, b, c, d in zip(
        first["layer"].to_numpy(), first["neuron"].to_numpy(), first["direction"].cast("string").to_pylist(),
        first["context"].cast("string").to_pylist(), strict=True)}
    return (lambda token_id: names.get(token_id, f"<{token_id}>")), contexts


def rescore_run(run: str | Path, thresholds: VerdictThresholds | None = None, *,
                top_per_category: int | None = None, write: bool = True) -> HuntResult:
    """Give a finished run new verdicts from its stored statistics (``stats.pt``), without re-running the model.

    Works on a hunt run (new thresholds) and on a scan run made with a lexicon (turning it into a hunt run). The
    run's config.json records the thresholds used.
    """

    from .io import read_json, read_table, require_run
    from .stats.state import load_state

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
    state = load_state(run / "stats.pt")[0]
    cooc = np.asarray(info["cooccurrence"]) if info.get("cooccurrence") is not None else None
    decode, contexts = _examples_decoder(run, state)
    judgement = judge_state(state, categories, control, th, decode=decode, includes=includes_of(lexicon),
                            cooccurrence=cooc)
    result = assemble(judgement, read_table(run / "neurons.parquet"), read_table(run / "concepts.parquet"),
                      lambda layer, neuron, direction: contexts.get((layer, neuron, direction), ""), manifest,
                      _labelled_counts(state), thresholds=th, cooccurrence=cooc, top_per_category=top_n,
                      tokens=state.tokens)
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
