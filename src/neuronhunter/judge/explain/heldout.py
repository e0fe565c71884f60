"""The held-out pass on the scan engine: :class:`HeldoutScanner` is the :class:`~neuronhunter.scan.Scanner` (same
windows, batches, BOS and position-0 policy, hooks on every layer's neurons, early stop after the last layer) with
:class:`~.scoring.LayerScorer` in place of the scan's statistics.

Documents: the scanner reads the side of the document split it is configured for (``split="heldout"`` of the run's
corpus, or ``"all"`` of another corpus). Each held-out document is further assigned to one of two *folds* by a
stable hash of its id (:func:`doc_fold`): the best explanation of a neuron is chosen on fold 0 and its reported
scores come from fold 1, so that the selection among candidates does not inflate the number reported for the
winner (every candidate's scores on all held-out documents are reported as well).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...config import ScanConfig
from ...data.split import unit_hash
from ...distributed import ShardWorker
from ...scan import Scanner
from ...stats.state import ScanState
from ...stats.tokens import counted_tokens
from .candidates import CandidateSet
from .features import BatchFeatures, Vocabulary, batch_features
from .scoring import LayerScorer


def doc_fold(uid: str, seed: int) -> int:
    """The held-out fold (0 or 1) of a document: a stable hash of its id, independent of the train/held-out hash."""
    return int(unit_hash("explain-fold\x00" + uid, seed) >= 0.5)


@dataclass
class ExplainState(ScanState):
    """A :class:`ScanState` whose layers are :class:`LayerScorer` s, plus the per-fold feature counts."""

    feature_counts: torch.Tensor = field(default_factory=lambda: torch.zeros((2, 0), dtype=torch.long))
    fold_documents: list[int] = field(default_factory=lambda: [0, 0])

    def merge(self, other: ExplainState) -> ExplainState:  # type: ignore[override]
        if set(self.layers) != set(other.layers) or self.feature_counts.shape != other.feature_counts.shape:
            raise ValueError("cannot merge held-out passes over different layers or explanations")
        for layer, scorer in self.layers.items():
            scorer.merge(other.layers[layer])
        self.feature_counts += other.feature_counts
        self.tokens += other.tokens
        self.n_windows += other.n_windows
        self.batches_done += other.batches_done
        self.documents += other.documents
        self.fold_documents = [a + b for a, b in zip(self.fold_documents, other.fold_documents, strict=True)]
        self.corpus_fp = (self.corpus_fp + other.corpus_fp) % (1 << 256)
        return self

    def prune_windows(self) -> None:  # nothing is stored
        self.windows.clear()

    def state_dict(self) -> dict[str, Any]:
        """The mergeable statistics (layers, feature counts, counters) and the fingerprints: what a shard of the
        held-out pass stores."""
        return {"layers": {k: v.state_dict() for k, v in self.layers.items()}, "feature_counts": self.feature_counts,
                "tokens": self.tokens, "n_windows": self.n_windows, "documents": self.documents,
                "fold_documents": self.fold_documents, "corpus_fp": f"{self.corpus_fp:064x}",
                "batches_done": self.batches_done, "model_fp": self.model_fp, "settings": self.settings}

    def load(self, state: dict[str, Any]) -> ExplainState:
        """Fill this fresh state (:meth:`HeldoutScanner.new_explain_state`) from a :meth:`state_dict`."""
        if set(state["layers"]) != set(self.layers) or state["feature_counts"].shape != self.feature_counts.shape:
            raise ValueError("the stored held-out statistics are of other layers or explanations")
        for layer, scorer in self.layers.items():
            scorer.load_state_dict(state["layers"][layer])
        self.feature_counts = state["feature_counts"].clone()
        self.tokens, self.n_windows, self.documents = int(state["tokens"]), int(state["n_windows"]), int(state["documents"])
        self.batches_done = int(state["batches_done"])
        self.fold_documents = [int(x) for x in state["fold_documents"]]
        self.corpus_fp = int(state["corpus_fp"], 16)
        self.model_fp, self.settings = state["model_fp"], state["settings"]
        return self



class HeldoutScanner(Scanner):
    """The scan engine reading held-out documents, feeding :class:`LayerScorer` s (see the module docstring)."""

    def __init__(self, model: Any, cfg: ScanConfig, labeller: Any, candidates: CandidateSet, vocab: Vocabulary, *,
                 domains: list[str], fold_seed: int, shard: tuple[int, int] | None = None,
                 window_range: tuple[int, int, int] | None = None, stop: tuple[int, int] | None = None) -> None:
        super().__init__(model, cfg, labeller, shard=shard, window_range=window_range, stop=stop)
        self.candidates, self.vocab = candidates, vocab
        self.domain_index = {name: i for i, name in enumerate(candidates.space.domains)}
        self.fold_seed = fold_seed
        self.pending: dict[int, Any] = {}
        self.doc_info: dict[int, tuple[int, int]] = {}  # doc id -> (domain index, fold)
        self._cache: tuple[tuple[int, ...], BatchFeatures] | None = None
        self._state: ExplainState | None = None

    def documents(self, *, all_shards: bool = False) -> Any:
        for doc in super().documents(all_shards=all_shards):
            self.doc_info[doc.doc_id] = (self.domain_index.get(doc.domain, -1), doc_fold(doc.uid, self.fold_seed))
            yield doc

    def windows(self, *, all_shards: bool = False, labelled: bool = True) -> Any:
        for w in super().windows(all_shards=all_shards, labelled=labelled):
            self.pending[w.window_id] = w
            yield w

    def _store(self, state: ScanState, wins: list[Any]) -> None:  # type: ignore[override]
        for w in wins:
            state.add_window(w.source, w.start, w.ids)
            self.pending.pop(w.window_id, None)
            if w.start == 0 and isinstance(state, ExplainState):
                state.fold_documents[self.doc_info[w.doc_id][1]] += 1

    def new_explain_state(self) -> ExplainState:
        """A fresh state: one :class:`LayerScorer` per layer, wired to this scanner's batch features."""
        space = self.candidates.space
        layers = {}
        for layer in self.layers:
            lc = self.candidates.layers[layer]
            s = self.candidates.settings
            scale = torch.from_numpy(lc.scale).float()
            ok = torch.isfinite(scale) & (scale > 1e-6)
            inf = torch.full_like(scale, float("inf"))
            high = torch.where(ok, s.high_fraction * scale, inf)
            silent = torch.where(ok, s.silent_fraction * scale, -inf)
            scorer = LayerScorer(layer, self.n_neurons, lc.pairs, high, silent, lc.tokset, space)
            scorer.features = self.features
            layers[layer] = scorer
        state = ExplainState(layers, feature_counts=torch.zeros((2, space.n_features), dtype=torch.long),
                             settings=self.settings)
        self._state = state
        return state

    def features(self, wids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None) -> BatchFeatures:
        """The features of the batch now in the model (computed once per batch, shared by all layers)."""
        key = tuple(wids.tolist())  # window ids are global: a batch's tuple is unique
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        wins = [self.pending[int(w)] for w in key]
        b, p = mask.shape
        pad = self.model.tokenizer.pad_token_id if self.model.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, p), pad, dtype=torch.long)
        for i, w in enumerate(wins):
            ids[i, : len(w.ids)] = torch.tensor(w.ids, dtype=torch.long)
        real = mask.cpu().bool()
        keep = counted_tokens(real, include_first=self.cfg.include_first)
        info = [self.doc_info[w.doc_id] for w in wins]
        domain = torch.tensor([x[0] for x in info], dtype=torch.long)
        fold = torch.tensor([x[1] for x in info], dtype=torch.long)
        starts = torch.tensor([w.start for w in wins], dtype=torch.long)
        bf, counts = batch_features(self.candidates.space, self.vocab, ids, real, keep, starts, domain, fold,
                                    labels.cpu() if labels is not None else None, bos=self.bos is not None)
        if self._state is not None:
            self._state.feature_counts += counts
        self._cache = (key, bf)
        return bf


def run_heldout(scanner: HeldoutScanner, *, progress: Callable[[int, int | None], None] | None = None,
                state: ExplainState | None = None) -> ExplainState:
    """Stream the scanner's documents through the model once, updating (and returning) the explain state."""
    state = state or scanner.new_explain_state()
    total = scanner.count_tokens() if progress is not None else None
    for _ in scanner.steps(state):
        if progress is not None:
            progress(state.tokens, total)
    return state


class HeldoutShardWorker(ShardWorker):
    """A Ray worker of the held-out pass (``explain --engine ray``): the scan's
    :class:`~neuronhunter.distributed.ShardWorker` (same plan, same shards: contiguous runs of the single-process
    pass's batches) whose shards are scored by a :class:`HeldoutScanner` instead of scanned. ``candidates``: the
    path of the pickled :class:`CandidateSet` (read by each worker, and again by a restarted one)."""

    def __init__(self, config: ScanConfig, model: Any = None, labeller: Any = None, threads: int | None = None,
                 candidates: str = "", fold_seed: int = 0) -> None:
        import pickle

        from ...errors import RunDirError

        super().__init__(config, model, labeller, threads)
        self.fold_seed, self.vocab = fold_seed, None
        try:
            with open(candidates, "rb") as fh:
                self.candidates: CandidateSet = pickle.load(fh)  # noqa: S301 - written by this pass's driver
        except OSError:
            self.error = self.error or RunDirError(
                f"a Ray worker cannot read {candidates}: on a cluster the run folder must be on a filesystem "
                "every node mounts")
        if self.error is None:
            self.vocab = Vocabulary(self.model.tokenizer)

    def calibrate(self) -> dict[int, dict[str, Any]]:
        return {}  # (the held-out pass keeps no histograms)

    def shard_pass(self, labeller: Any, window_range: tuple[int, int, int], stop: tuple[int, int] | None,
                   calibration: dict[int, dict[str, Any]]) -> tuple[Any, ScanState]:
        assert self.vocab is not None
        sc = HeldoutScanner(self.model, self.cfg, labeller, self.candidates, self.vocab,
                            domains=self.candidates.space.domains, fold_seed=self.fold_seed, window_range=window_range,
                            stop=stop)
        state = sc.new_explain_state()
        state.model_fp = self.scanner.model_fp
        return sc, state


def run_heldout_on_ray(scanner: HeldoutScanner, run: Path, *, model: Any = None,
                       progress: Callable[[int, int | None], None] | None = None) -> tuple[ExplainState, dict[str, float]]:
    """:func:`run_heldout` as shards on Ray (``scanner.cfg``'s engine options: workers, address, shards): each
    worker scores its shards, the driver merges their states in shard order into a state of ``scanner``. The
    candidates and the shard states go to a folder of this call's own inside the run folder ``run`` (on a cluster
    it must be on a filesystem every node mounts, as for the scan), removed afterwards. ``model``: hand this loaded
    model to the workers (else each loads ``scanner.cfg.model`` by name)."""
    import pickle
    import shutil
    import uuid

    from ...distributed import run_sharded_pass
    from ...io import atomic_path

    def build(sd: dict[str, Any]) -> ExplainState:
        return scanner.new_explain_state().load(sd)

    work = Path(run) / f".explain-shards-{uuid.uuid4().hex[:12]}"
    work.mkdir()
    try:
        path = work / "candidates.pkl"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            pickle.dump(scanner.candidates, fh, protocol=pickle.HIGHEST_PROTOCOL)
        state, timings = run_sharded_pass(scanner.cfg, HeldoutShardWorker, (str(path), scanner.fold_seed), build, work,
                                          model=model, labeller=scanner.labeller, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # (this call's own folder)
    assert isinstance(state, ExplainState)
    return state, timings
