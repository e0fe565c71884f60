"""Choosing target neurons (the ``NeuronScanner`` role).

A self-report experiment needs a neuron worth reporting: one that varies (``variance``), or fires rarely but
strongly (``kurtosis``: heavy right tail; ``density``: a low fraction of tokens above ``active_threshold``). The
statistics come from one of three sources:

* ``explicit``: the config names the neurons; their statistics are still measured (a fresh scan of their layers)
  so ``selection.json`` says what the chosen neurons look like.
* ``scan``: a small self-contained scan of the candidate layers over the first ``scan_tokens`` tokens of the
  *training* documents (never validation/test text). Per neuron and layer it accumulates power sums of the
  activation in float64 (shifted by a first-batch mean to avoid cancellation) and derives mean, std, min, max,
  excess kurtosis ``m4 / m2^2 - 3``, the fraction of tokens above ``active_threshold`` and the fraction of
  documents in which it exceeds the threshold at least once (``doc_frac_active``: with a split by document, a
  neuron that fires in a single document can be neither learned nor evaluated). Position 0 (BOS, the attention
  sink with atypical activations) is never counted.
* ``run``: a scan run folder's ``neurons.parquet`` (``layer``, ``neuron`` and the statistics columns; after a
  hunt also ``verdict`` and ``top_category`` for the ``verdict``/``category`` filters).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, RunDirError
from ..models import HookedModel, Site
from ..stats.accumulators import Moments
from ..stats.tokens import counted_tokens, n_counted
from .config import DatasetConfig, NeuronRef, SelectionConfig

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
STAT_COLUMNS = ["layer", "neuron", "count", "mean", "std", "min", "max", "frac_active", "kurtosis",
                "doc_frac_active", "n_docs"]


@dataclass
class Selection:
    """The chosen neurons, why they were chosen, and the best-ranked candidates."""

    neurons: list[NeuronRef]
    chosen: Any  # pandas DataFrame: one row per chosen neuron (stats, score, rank)
    candidates: Any  # pandas DataFrame: the top candidates after filtering
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.info,
            "neurons": [
                {"neuron": str(n), "layer": n.layer, "index": n.neuron, **_row_dict(self.chosen, n)}
                for n in self.neurons
            ],
            "top_candidates": self.candidates.head(20).to_dict(orient="records"),
        }


def _row_dict(df: Any, n: NeuronRef) -> dict[str, Any]:
    rows = df[(df["layer"] == n.layer) & (df["neuron"] == n.neuron)]
    if rows.empty:
        return {}
    out = {}
    for col in rows.columns:  # column by column, so integer columns stay integers
        if col not in ("layer", "neuron"):
            v = rows[col].iloc[0]
            out[col] = v.item() if hasattr(v, "item") else v
    return out


# --------------------------------------------------------------------------------------------------- scanning
def scan_stats(
    hooked: HookedModel,
    batches: Iterable[tuple[torch.Tensor, ...]],
    layers: list[int],
    *,
    active_threshold: float = 0.0,
) -> Any:
    """Per-neuron statistics of ``mlp.hook_post`` at ``layers``.

    Args:
        batches: ``(input_ids, attention_mask)`` or ``(input_ids, attention_mask, doc_ids)``; with document ids the
            table also has ``doc_frac_active``, the fraction of documents where the neuron exceeds
            ``active_threshold`` at least once (a neuron that fires in one document only cannot be learned and
            evaluated with a split by document).

    Position 0 of every row is skipped (BOS). Returns a DataFrame with :data:`STAT_COLUMNS`.
    """
    import pandas as pd

    layers = hooked.check_layers(layers)
    sites = [Site.mlp_post(L) for L in layers]
    d = hooked.d_mlp
    n_l = len(layers)
    moments = [Moments(d, active_threshold) for _ in layers]  # the scan's own accumulator, in float64
    doc_max: dict[int, torch.Tensor] = {}  # doc id -> [layers, d_mlp] max activation in that document
    with hooked.capture(sites, stop_at_layer=max(layers) + 1) as cache:
        for batch in batches:
            ids, mask = batch[0], batch[1]
            hooked.forward(ids, mask, stop_at_layer=max(layers) + 1)
            keep = counted_tokens(mask)
            if not keep.any():
                continue
            if len(batch) > 2:
                full = torch.stack([cache[s] for s in sites], 1).float().cpu()  # [b, layers, pos, d_mlp]
                full = full.masked_fill(~keep[:, None, :, None], -torch.inf).amax(2)  # [b, layers, d_mlp]
                for row, doc in enumerate(batch[2].tolist()):
                    prev = doc_max.get(doc)
                    doc_max[doc] = full[row] if prev is None else torch.maximum(prev, full[row])
            for m, s in zip(moments, sites, strict=True):
                m.update(cache[s][keep.to(cache[s].device)].to(torch.float64).cpu())  # [tokens, d_mlp]
    count = moments[0].count
    if count < 2:
        raise ConfigError("the selection scan saw fewer than 2 tokens; raise selection.scan_tokens")
    summary = [m.summary() for m in moments]

    def stacked(key: str) -> np.ndarray:
        return torch.stack([sm[key] for sm in summary]).reshape(-1).numpy()

    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.array(layers, dtype=np.int64), d),
            "neuron": np.tile(np.arange(d, dtype=np.int64), n_l),
            "count": np.full(n_l * d, count, dtype=np.int64),
            "mean": stacked("mean"),
            "std": stacked("std"),
            "min": torch.stack([m.min for m in moments]).double().reshape(-1).numpy(),
            "max": torch.stack([m.max for m in moments]).double().reshape(-1).numpy(),
            "frac_active": stacked("frac_active"),
            "kurtosis": stacked("kurtosis"),
        }
    )
    if doc_max:
        docs = torch.stack(list(doc_max.values()))  # [docs, layers, d_mlp]
        frame["doc_frac_active"] = (docs > active_threshold).double().mean(0).reshape(-1).numpy()
        frame["n_docs"] = len(doc_max)
    return frame


class NeuronScanner:
    """Selects target neurons by explicit reference, a fresh scan or a scan run (see the module docstring).

    Args:
        hooked: the model.
        config: the selection section.
        dataset: the dataset section (corpus, context length and split, for the fresh scan).
        progress: optional ``(description, done, total)`` callback.
    """

    def __init__(self, hooked: HookedModel, config: SelectionConfig, dataset: DatasetConfig,
                 *, progress: ProgressFn | None = None) -> None:
        self.hooked = hooked
        self.config = config
        self.dataset = dataset
        self.progress = progress

    # ------------------------------------------------------------------------------------------ public
    def select(self) -> Selection:
        cfg = self.config
        if cfg.source == "explicit":
            for n in cfg.neurons:
                self._check_neuron(n)
            layers = sorted({n.layer for n in cfg.neurons})
            stats = self.fresh_scan(layers)
            chosen = self._pick_rows(stats, cfg.neurons)
            chosen = chosen.assign(score=np.nan, rank=np.arange(1, len(chosen) + 1))
            info = {"source": "explicit", "reason": "named in the config",
                    "scan_tokens": int(stats["count"].iloc[0])}
            return Selection(list(cfg.neurons), chosen, chosen, info)
        if cfg.source == "scan":
            layers = cfg.layers if cfg.layers is not None else list(range(self.hooked.n_layers))
            stats = self.fresh_scan(layers)
            info = {"source": "scan", "layers": self.hooked.check_layers(layers),
                    "scan_tokens": int(stats["count"].iloc[0])}
        else:
            stats = self.read_run(Path(cfg.run or ""))
            info = {"source": "run", "run": str(cfg.run)}
            if cfg.layers is not None:
                stats = stats[stats["layer"].isin(cfg.layers)]
        return self._rank(stats, info)

    def fresh_scan(self, layers: list[int]) -> Any:
        """Statistics of ``layers`` over the first ``scan_tokens`` tokens of the training documents."""
        from .dataset import split_documents

        ds = self.dataset
        docs = split_documents(ds)[0]["train"]
        from ..data import iter_batches, iter_windows

        windows = iter_windows(docs, self.hooked.tokenizer, context_length=ds.context_length,
                               bos_token_id=self.hooked.bos_token_id, max_tokens=self.config.scan_tokens)
        pad = self.hooked.tokenizer.pad_token_id or 0
        total = self.config.scan_tokens
        done = [0]

        def batches():
            for batch, _ in iter_batches(windows, batch_size=8, pad_token_id=pad, has_bos=True):
                yield batch.input_ids, batch.attention_mask, batch.doc_ids
                done[0] += n_counted(batch.attention_mask)
                if self.progress:
                    self.progress("scanning neurons", min(done[0], total), total)

        return scan_stats(self.hooked, batches(), layers, active_threshold=self.config.active_threshold)

    def read_run(self, run: Path) -> Any:
        """Read a scan run's ``neurons.parquet``."""
        import pandas as pd

        path = run / "neurons.parquet"
        if not path.is_file():
            raise RunDirError(f"scan run {run} has no neurons.parquet; run `neuronhunter scan` first")
        df = pd.read_parquet(path)
        missing = [c for c in ("layer", "neuron") if c not in df.columns]
        if missing:
            raise RunDirError(f"{path} has no column {missing[0]!r}; is it a neuronhunter scan table?")
        cfg_file = run / "config.json"
        if cfg_file.is_file():
            import json

            try:
                model = json.loads(cfg_file.read_text()).get("model")
            except (OSError, ValueError):
                model = None
            if model and model != self.hooked.name:
                log.warning("scan run %s used model %r; this experiment uses %r", run, model, self.hooked.name)
        bad = df[(df["layer"] >= self.hooked.n_layers) | (df["neuron"] >= self.hooked.d_mlp)]
        if len(bad):
            raise ConfigError(f"scan run {run} has neurons outside this model ({self.hooked.name}); wrong model?")
        return df

    # ------------------------------------------------------------------------------------------ helpers
    def _check_neuron(self, n: NeuronRef) -> None:
        if n.layer >= self.hooked.n_layers:
            raise ConfigError(f"neuron {n}: layer {n.layer} is out of range (0..{self.hooked.n_layers - 1})")
        if n.neuron >= self.hooked.d_mlp:
            raise ConfigError(f"neuron {n}: index {n.neuron} is out of range (0..{self.hooked.d_mlp - 1})")

    @staticmethod
    def _pick_rows(stats: Any, neurons: list[NeuronRef]) -> Any:
        import pandas as pd

        rows = [stats[(stats["layer"] == n.layer) & (stats["neuron"] == n.neuron)] for n in neurons]
        return pd.concat(rows, ignore_index=True)

    def _rank(self, stats: Any, info: dict[str, Any]) -> Selection:
        cfg = self.config
        where = "the scan run" if cfg.source == "run" else "the scan"

        def need(col: str, why: str) -> None:
            if col not in stats.columns:
                raise ConfigError(f"{where} has no {col!r} column, needed for {why}")

        df = stats
        if cfg.min_frac_active > 0 or cfg.max_frac_active < 1 or cfg.criterion == "density":
            need("frac_active", "the frac_active filters / density criterion")
            df = df[(df["frac_active"] >= cfg.min_frac_active) & (df["frac_active"] <= cfg.max_frac_active)]
        if cfg.min_doc_frac_active > 0:
            need("doc_frac_active", "the min_doc_frac_active filter (a fresh scan computes it)")
            df = df[df["doc_frac_active"] >= cfg.min_doc_frac_active]
        if cfg.verdict is not None:
            need("verdict", "the verdict filter (run `neuronhunter hunt` on the scan first)")
            df = df[df["verdict"].astype(str) == cfg.verdict]
        if cfg.category is not None:
            need("top_category", "the category filter (run `neuronhunter hunt` on the scan first)")
            df = df[df["top_category"].astype(str) == cfg.category]
        if cfg.criterion == "variance":
            if "std" in df.columns:
                score = df["std"].astype(float) ** 2
            else:
                need("var", "the variance criterion")
                score = df["var"].astype(float)
            ascending = False
        elif cfg.criterion == "kurtosis":
            need("kurtosis", "the kurtosis criterion")
            score, ascending = df["kurtosis"].astype(float), False
        else:
            score, ascending = df["frac_active"].astype(float), True
        df = df.assign(score=score).dropna(subset=["score"])
        if df.empty:
            raise ConfigError("no neuron passes the selection filters (frac_active bounds, verdict, category)")
        df = df.sort_values(["score", "layer", "neuron"], ascending=[ascending, True, True]).reset_index(drop=True)
        df = df.assign(rank=np.arange(1, len(df) + 1))
        chosen = df.head(cfg.count)
        neurons = [NeuronRef(layer=int(r.layer), neuron=int(r.neuron)) for r in chosen.itertuples()]
        for n in neurons:
            self._check_neuron(n)
        order = "lowest" if ascending else "highest"
        filters = {"min_frac_active": cfg.min_frac_active, "max_frac_active": cfg.max_frac_active,
                   "min_doc_frac_active": cfg.min_doc_frac_active,
                   "active_threshold": cfg.active_threshold, "verdict": cfg.verdict, "category": cfg.category}
        info = {**info, "criterion": cfg.criterion, "filters": filters, "n_candidates": int(len(df)),
                "reason": f"{order} {cfg.criterion} among {len(df)} candidate neurons after filtering"}
        return Selection(neurons, chosen.reset_index(drop=True), df.head(50), info)
