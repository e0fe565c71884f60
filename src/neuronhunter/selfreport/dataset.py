"""Activation datasets: texts -> a target neuron's activation at each token (the ``ActivationDatasetGenerator``).

Leakage-free splits: whole documents are assigned to train/val/test (a seeded shuffle of the document indices;
each split gets at least one document), *then* documents are cut into windows. No window, and so no token
context, is shared between splits. Each split receives ``max_tokens x fraction`` tokens.

One Parquet table per target neuron, one row per token position of every window::

    split  doc_id  window_id  position  token_id  token  activation  target  selected  model  site  layer  neuron

``activation`` is the neuron's value (``blocks.L.mlp.hook_post[..., n]``) at that position; ``target`` is what
the predictor learns: the activation itself, or for ``target: window_max`` the max over the last ``window``
positions (causal, so the model has seen every token it reports on). ``selected`` marks the positions that count
in losses and metrics: never position 0 (BOS, or the first token without context) and, with ``balance``, only
the training tokens kept by balanced sampling (most tokens are near zero). The Parquet schema metadata
(``neuronhunter.selfreport``) records the model, neuron, site, corpus hash and all dataset settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Corpus, Document, iter_batches, iter_windows
from ..errors import ConfigError, RunDirError
from ..io import atomic_path
from ..models import HookedModel, Site
from .config import DatasetConfig, NeuronRef

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
META_KEY = b"neuronhunter.selfreport"
ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------------- splits
def assign_splits(n_docs: int, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """The split of each document index: a seeded shuffle, then ``fractions`` of the documents (>= 1 each)."""
    if n_docs < 3:
        raise ConfigError(f"splitting by document needs at least 3 documents, the corpus has {n_docs}")
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = max(1, int(round(fractions[1] * n_docs)))
    n_test = max(1, int(round(fractions[2] * n_docs)))
    while n_docs - n_val - n_test < 1:  # keep at least one training document
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    n_train = n_docs - n_val - n_test
    out = [""] * n_docs
    for rank, doc in enumerate(order):
        out[int(doc)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def split_documents(cfg: DatasetConfig) -> tuple[dict[str, list[Document]], str | None]:
    """Read the corpus and group its documents by split (corpus order kept within a split).

    Returns:
        ``({split: documents}, corpus sha256)``.
    """
    corpus = Corpus(cfg.corpus, text_field=cfg.text_field, max_docs=cfg.max_docs)
    docs = list(corpus)
    labels = assign_splits(len(docs), cfg.splits, cfg.split_seed)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc, label in zip(docs, labels, strict=True):
        out[label].append(doc)
    return out, corpus.sha256


# --------------------------------------------------------------------------------------------------- tensors
@dataclass
class SplitTensors:
    """One split as padded window tensors ``[windows, pos]`` (what the trainer and evaluator consume)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    activation: torch.Tensor
    target: torch.Tensor
    selected: torch.Tensor
    window_ids: torch.Tensor
    doc_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.selected.sum())

    def subset(self, idx: torch.Tensor | list[int]) -> SplitTensors:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return SplitTensors(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


@dataclass
class ActivationDataset:
    """The token table of one target neuron plus its metadata (see the module docstring)."""

    table: Any  # pandas DataFrame
    meta: dict[str, Any]

    @property
    def neuron(self) -> NeuronRef:
        return NeuronRef(layer=int(self.meta["layer"]), neuron=int(self.meta["neuron"]))

    def split(self, name: str) -> Any:
        return self.table[self.table["split"] == name]

    def tensors(self, name: str, pad_token_id: int = 0) -> SplitTensors:
        """Padded window tensors of split ``name``."""
        df = self.split(name).sort_values(["window_id", "position"])
        if df.empty:
            raise ConfigError(f"the {name} split is empty; raise dataset.max_tokens or use more documents")
        wids, inverse = np.unique(df["window_id"].to_numpy(), return_inverse=True)
        width = int(df["position"].max()) + 1
        n = len(wids)
        pos = df["position"].to_numpy()
        ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        act = torch.zeros((n, width), dtype=torch.float32)
        tgt = torch.zeros((n, width), dtype=torch.float32)
        sel = torch.zeros((n, width), dtype=torch.bool)
        r, c = torch.from_numpy(inverse.astype(np.int64)), torch.from_numpy(pos.astype(np.int64))
        ids[r, c] = torch.from_numpy(df["token_id"].to_numpy().astype(np.int64))
        mask[r, c] = 1
        act[r, c] = torch.from_numpy(df["activation"].to_numpy().astype(np.float32))
        tgt[r, c] = torch.from_numpy(df["target"].to_numpy().astype(np.float32))
        sel[r, c] = torch.from_numpy(df["selected"].to_numpy().astype(bool))
        docs = df.groupby("window_id", sort=True)["doc_id"].first().to_numpy()
        return SplitTensors(ids, mask, act, tgt, sel, torch.from_numpy(wids.astype(np.int64)),
                            torch.from_numpy(docs.astype(np.int64)))

    def save(self, path: str | Path) -> Path:
        """Write the table as Parquet (atomically) with the metadata in the schema."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(self.table, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps(self.meta).encode()
        table = table.replace_schema_metadata(meta)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ActivationDataset:
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"dataset not found: {path}")
        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise RunDirError(f"{path} is not a neuronhunter self-report dataset (no metadata)")
        return cls(table.to_pandas(), json.loads(raw))


# --------------------------------------------------------------------------------------------------- generator
def trailing_max(values: np.ndarray, window: int) -> np.ndarray:
    """``out[t] = max(values[max(0, t - window + 1) : t + 1])`` along the last axis."""
    out = values.copy()
    for k in range(1, window):
        out[..., k:] = np.maximum(out[..., k:], values[..., :-k])
    return out


class ActivationDatasetGenerator:
    """Builds :class:`ActivationDataset` tables for target neurons in one forward pass over the corpus.

    Args:
        hooked: the model whose neurons are recorded (read only).
        config: the dataset section.
        batch_size: windows per forward pass.
        progress: optional ``(description, done, total)`` callback.
    """

    def __init__(self, hooked: HookedModel, config: DatasetConfig, *, batch_size: int = 8,
                 progress: ProgressFn | None = None) -> None:
        self.hooked = hooked
        self.config = config
        self.batch_size = batch_size
        self.progress = progress

    def generate(self, neurons: list[NeuronRef], *, seed: int = 0) -> dict[NeuronRef, ActivationDataset]:
        """One dataset per neuron (they share windows and splits; only activations and targets differ)."""
        import pandas as pd

        cfg, hooked = self.config, self.hooked
        for n in neurons:
            if n.layer >= hooked.n_layers or n.neuron >= hooked.d_mlp:
                raise ConfigError(f"neuron {n} does not exist in {hooked.name} "
                                  f"({hooked.n_layers} layers x {hooked.d_mlp} neurons)")
        docs, sha = split_documents(cfg)
        layers = sorted({n.layer for n in neurons})
        sites = [Site.mlp_post(L) for L in layers]
        stop = max(layers) + 1
        pad = hooked.tokenizer.pad_token_id or 0
        bos = hooked.bos_token_id
        cols: dict[str, list[Any]] = {k: [] for k in ("split", "doc_id", "window_id", "position", "token_id")}
        acts: dict[NeuronRef, list[np.ndarray]] = {n: [] for n in neurons}
        window_base = 0
        done, total = 0, cfg.max_tokens
        counts: dict[str, dict[str, int]] = {}
        for split, frac in zip(SPLITS, cfg.splits, strict=True):
            budget = max(1, int(round(cfg.max_tokens * frac)))
            windows = iter_windows(docs[split], hooked.tokenizer, context_length=cfg.context_length,
                                   bos_token_id=bos, max_tokens=budget)
            n_windows = n_tokens = 0
            split_docs: set[int] = set()
            with hooked.capture(sites, stop_at_layer=stop) as cache:
                for batch, wins in iter_batches(windows, batch_size=self.batch_size, pad_token_id=pad,
                                                has_bos=bos is not None):
                    hooked.forward(batch.input_ids, batch.attention_mask, stop_at_layer=stop)
                    for i, w in enumerate(wins):
                        n = len(w.ids)
                        cols["split"].append(np.full(n, split, dtype=object))
                        cols["doc_id"].append(np.full(n, w.doc_id, dtype=np.int64))
                        cols["window_id"].append(np.full(n, window_base + w.window_id, dtype=np.int64))
                        cols["position"].append(np.arange(n, dtype=np.int64))
                        cols["token_id"].append(np.asarray(w.ids, dtype=np.int64))
                        for ref in neurons:
                            a = cache[Site.mlp_post(ref.layer)][i, :n, ref.neuron]
                            acts[ref].append(a.float().cpu().numpy())
                        split_docs.add(w.doc_id)
                        n_windows += 1
                        n_tokens += n - (1 if bos is not None else 0)
                    done += int(batch.attention_mask.sum()) - (len(wins) if bos is not None else 0)
                    if self.progress:
                        self.progress("recording activations", min(done, total), total)
            window_base += n_windows
            counts[split] = {"documents": len(split_docs), "windows": n_windows, "tokens": n_tokens}
            if n_windows == 0:
                raise ConfigError(f"the {split} split got no tokens; raise dataset.max_tokens or use a bigger corpus")
        base = {k: np.concatenate(v) for k, v in cols.items()}
        token_ids = base["token_id"]
        uniq = np.unique(token_ids)
        strings = dict(zip(uniq.tolist(), hooked.tokenizer.batch_decode([[int(t)] for t in uniq]), strict=True))
        base["token"] = np.array([strings[int(t)] for t in token_ids], dtype=object)
        site_names = {ref: str(Site.mlp_post(ref.layer)) for ref in neurons}
        out: dict[NeuronRef, ActivationDataset] = {}
        for ref in neurons:
            activation = np.concatenate(acts[ref]).astype(np.float32)
            df = pd.DataFrame(base)
            df["activation"] = activation
            df["target"] = self._targets(df)
            df["selected"] = (df["position"] > 0).to_numpy()
            df = self._balance(df, seed)
            df["model"] = hooked.name
            df["site"] = site_names[ref]
            df["layer"] = np.int64(ref.layer)
            df["neuron"] = np.int64(ref.neuron)
            for c in ("split", "model", "site"):
                df[c] = df[c].astype("category")
            meta = {
                "model": hooked.name, "model_info": {k: str(v) for k, v in hooked.info.items()},
                "layer": ref.layer, "neuron": ref.neuron, "site": site_names[ref], "neuron_name": str(ref),
                "corpus": cfg.corpus or "default", "corpus_sha256": sha, "has_bos": bos is not None,
                "counts": counts, "dataset_config": cfg.model_dump(mode="json"), "seed": seed,
                "balanced_train_tokens": int(df[(df["split"] == "train") & df["selected"]].shape[0]),
            }
            out[ref] = ActivationDataset(df, meta)
        return out

    def _targets(self, df: Any) -> np.ndarray:
        act = df["activation"].to_numpy().astype(np.float32)
        if self.config.target == "token":
            return act.copy()
        out = act.copy()
        # per window: trailing max over positions >= 1 (the BOS/first position is never part of a target)
        for _, idx in df.groupby("window_id", sort=False).indices.items():
            vals = act[idx].copy()
            vals[0] = -np.inf
            tm = trailing_max(vals, self.config.window)
            tm[0] = act[idx][0]
            out[idx] = tm
        return out

    def _balance(self, df: Any, seed: int) -> Any:
        cfg = self.config
        if not cfg.balance:
            return df
        train = (df["split"] == "train").to_numpy() & df["selected"].to_numpy()
        values = df["target"].to_numpy()[train]
        if values.size == 0:
            return df
        thr = float(np.quantile(values, cfg.balance_quantile))
        idx = np.flatnonzero(train)
        high = idx[values >= thr]
        low = idx[values < thr]
        n_low = min(len(low), int(round(cfg.balance_ratio * len(high))))
        keep_low = np.random.default_rng(seed).choice(low, size=n_low, replace=False) if n_low else low[:0]
        selected = df["selected"].to_numpy().copy()
        selected[idx] = False
        selected[high] = True
        selected[keep_low] = True
        df = df.copy()
        df["selected"] = selected
        log.info("balanced sampling: %d high (>= %.4g) and %d low training tokens kept", len(high), thr, n_low)
        return df
