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
from dataclasses import dataclass, field
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

if TYPE_CHECKING:
    import pandas as pd

    from .models.hooked import HookedModel
    from .results import ScanResult

log = logging.getLogger(__name__)

HUNT_FILE = "hunt.json"
LEXICON_FILE = "lexicon.json"
SCORE_COLUMNS = ("top_category", "top_mean", "second_category", "second_mean", "crs", "dprime", "entropy",
                 "n_categories", "categories", "control_dprime", "range", "pos0_share", "pos0_max_share",
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


@dataclass
class HuntResult:
    """A scan plus its selectivity scores, verdicts, champion and top neurons per category."""

    scan: ScanResult
    scores: Scores
    cooccurrence: np.ndarray | None
    config: HuntConfig
    lexicon: Lexicon
    _neurons: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def categories(self) -> list[str]:
        return self.scores.categories

    @property
    def control(self) -> list[str]:
        return self.scores.control

    def neurons_frame(self) -> pd.DataFrame:
        """The scan's neurons table with the selectivity columns and ``verdict`` added."""
        if self._neurons is None:
            base = self.scan.neurons_frame()
            extra = self.scores.frame
            if not (np.array_equal(base["layer"].to_numpy(), extra["layer"].to_numpy())
                    and np.array_equal(base["neuron"].to_numpy(), extra["neuron"].to_numpy())):
                raise RuntimeError("scores and neurons are not aligned")  # pragma: no cover - internal invariant
            base = base.drop(columns=[c for c in SCORE_COLUMNS if c in base.columns])
            self._neurons = base.join(extra[list(SCORE_COLUMNS)])
        return self._neurons

    def concepts_frame(self) -> pd.DataFrame:
        """The scan's concepts table (layer, neuron, category, mean, std, max, count) plus ``dprime`` (vs the
        unlabelled baseline), ``responsive`` and ``selective`` (responsive and the neuron is mono/polysemantic)."""
        import pandas as pd

        base = self.scan.concepts_frame()
        frame = self.scores.frame
        n, c = self.scores.dprime.shape
        verdict = frame["verdict"].to_numpy()
        concept = np.array([cat not in self.control for cat in self.categories])
        long = pd.DataFrame({
            "layer": np.repeat(frame["layer"].to_numpy(), c),
            "neuron": np.repeat(frame["neuron"].to_numpy(), c),
            "category": np.tile(np.array(self.categories, dtype=object), n),
            "dprime": self.scores.dprime.reshape(-1),
            "responsive": self.scores.responsive.reshape(-1),
            "selective": (self.scores.responsive & concept[None, :]
                          & np.isin(verdict, ["monosemantic", "polysemantic"])[:, None]).reshape(-1),
        })
        out = base.merge(long, on=["layer", "neuron", "category"], how="left")
        out["responsive"] = out["responsive"].astype("boolean").fillna(False).astype(bool)
        out["selective"] = out["selective"].astype("boolean").fillna(False).astype(bool)
        return out

    def verdict_counts(self) -> pd.DataFrame:
        return verdict_counts(self.scores.frame)

    def champion(self) -> dict[str, Any] | None:
        """The strongest non-positional, non-dead neuron with its top example (position 0 excluded)."""
        row = champion(self.scores.frame, self.neurons_frame())
        if row is None:
            return None
        layer, neuron = int(row["layer"]), int(row["neuron"])
        return {"layer": layer, "neuron": neuron, "max": float(row["max"]), "verdict": str(row["verdict"]),
                "top_category": str(row["top_category"]), "categories": str(row["categories"]),
                "example": top_example(self.scan, layer, neuron)}

    def top_neurons(self) -> pd.DataFrame:
        """Top monosemantic and polysemantic neurons per concept category (ranked by d'), with their top example."""
        top = top_neurons_per_category(self.scores, self.config.top_per_category)
        top["example"] = [top_example(self.scan, int(r.layer), int(r.neuron)) for r in top.itertuples()]
        return top

    def summary(self) -> dict[str, Any]:
        counts = self.verdict_counts()
        return {
            "tokens": self.scan.state.tokens,
            "neurons": int(len(self.scores.frame)),
            "verdicts": {k: int(v) for k, v in counts.loc["total"].items()},
            "champion": self.champion(),
            "labelled_tokens": {c: int(v) for c, v in zip(
                [*self.categories, "unlabelled"], self._counts(), strict=True)},
        }

    def _counts(self) -> list[int]:
        ls = next(iter(self.scan.state.layers.values()))
        return [int(x) for x in ls.concepts.count.tolist()]

    def hunt_info(self) -> dict[str, Any]:
        """What ``hunt.json`` holds: thresholds, categories, co-occurrence, verdict counts, champion."""
        return {
            "thresholds": self.config.thresholds.model_dump(mode="json"),
            "categories": self.categories,
            "control": self.control,
            "cooccurrence": None if self.cooccurrence is None else self.cooccurrence.tolist(),
            **self.summary(),
        }

    def write(self, out: Path) -> None:
        """Rewrite the run folder's tables with the hunt columns, then the manifest (last)."""
        formats = tuple(self.config.formats)
        manifest = out / MANIFEST
        if manifest.exists():  # the folder is incomplete until the hunt tables are in place
            manifest.unlink()
        write_table(self.neurons_frame(), out / "neurons", formats=formats)
        write_table(self.concepts_frame(), out / "concepts", formats=formats)
        write_table(self.top_neurons(), out / "top_neurons", formats=formats)
        write_json(out / LEXICON_FILE, self.lexicon.model_dump(mode="json"))
        if self.config.categories:
            # let tools that re-label text from config.json (verify, plot) find the inline lexicon
            cfg = self.config.model_dump(mode="json")
            cfg["concepts"] = str((out / LEXICON_FILE).resolve())
            write_json(out / "config.json", cfg)
        write_json(out / HUNT_FILE, self.hunt_info())
        write_json(manifest, self.manifest())

    def manifest(self) -> dict[str, Any]:
        m = self.scan.manifest()
        m["kind"] = "hunt"
        m["control_categories"] = self.control
        m["hunt"] = {"verdicts": self.summary()["verdicts"], "thresholds": self.config.thresholds.model_dump(mode="json")}
        return m


def top_example(scan: ScanResult, layer: int, neuron: int, rank: int = 0, left: int = 8) -> str:
    """The text around a neuron's ``rank``-th top activation, the token marked ``[[token]]`` ('' if none)."""
    ls = scan.state.layers[layer]
    if rank >= ls.topk.k:
        return ""
    wid, pos = int(ls.topk.window[rank, neuron]), int(ls.topk.pos[rank, neuron])
    win = scan.state.windows.get(wid)
    if wid < 0 or win is None:
        return ""
    tok = scan.model.tokenizer
    lo = max(1 if scan.bos_token_id is not None else 0, pos - left)
    before = tok.decode(win.ids[lo:pos])
    after = tok.decode(win.ids[pos + 1:pos + 3])
    return (before + "[[" + tok.decode([win.ids[pos]]) + "]]" + after).replace("\n", " ")


def score_scan(result: ScanResult, cfg: HuntConfig, control: list[str],
               cooccurrence: np.ndarray | None = None) -> Scores:
    """Selectivity scores and verdicts for a finished scan with concept statistics."""
    features = features_from_state(result.state, result.categories)
    return score_neurons(features, control, cfg.thresholds, cooccurrence)


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
    concept = [c for c in labeller.categories if c not in labeller.control]
    if not concept:
        raise ConfigError("the lexicon has only control categories; the hunt needs at least one concept category")
    names = set(labeller.categories)
    for a, b in cfg.thresholds.related:
        if a not in names or b not in names:
            log.debug("thresholds.related: (%s, %s) names a category not in the lexicon; ignored", a, b)
    scan = run_scan(cfg, model=model, labeller=labeller, progress=progress, overwrite=overwrite, resume=resume,
                    write=write)
    scores = score_scan(scan, cfg, labeller.control, labeller.cooccurrence)
    result = HuntResult(scan=scan, scores=scores, cooccurrence=labeller.cooccurrence, config=cfg, lexicon=lexicon)
    if write:
        result.write(Path(cfg.out))
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
