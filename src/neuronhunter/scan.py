"""The streaming scan: one pass over a corpus computes statistics for every MLP neuron of every scanned layer.

Data flow::

    ScanConfig -> load model -> check layers/corpus/lexicon (before anything is written)
      -> corpus -> deterministic windows -> batches
      -> for each batch: forward pass with pre-hooks on each scanned layer's MLP output projection (the neuron is
         its input); each hook updates that layer's LayerStats, and the last one ends the pass (the rest of
         the model, from the last scanned layer's down-projection on, is not needed)
      -> every N batches: resumable checkpoint (temp file + rename)
      -> tables (neurons, examples, concepts) + stats.pt + config.json, manifest.json last

Memory does not grow with the corpus: the accumulators are sized by layers x neurons x (k, bins, categories), and
the tokens of a window are kept only while some neuron's top-k refers to it. After each batch the memory the C
allocator holds free is handed back (glibc ``malloc_trim``), which lowers the peak RSS and most of its run-to-run
variation (the allocator's slack).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .config import ScanConfig
from .data.batches import TokenLabeller, Window, iter_batches, iter_windows
from .data.corpus import Corpus
from .errors import ConfigError, RunDirError
from .io import MANIFEST, atomic_path
from .models.hooked import HookedModel, StopForward
from .models.sites import Site
from .stats.layer import LayerStats, StatsSpec

if TYPE_CHECKING:
    from .results import ScanResult

log = logging.getLogger(__name__)

CHECKPOINT = ".checkpoint.pt"
ProgressFn = Callable[[int, int | None], None]  # (tokens done, total tokens or None)


@dataclass
class StoredWindow:
    doc_id: int
    start: int
    ids: list[int]
    source: str


@dataclass
class ScanState:
    """Everything a scan accumulates: per-layer statistics, referenced windows and counters (mergeable)."""

    layers: dict[int, LayerStats]
    windows: dict[int, StoredWindow] = field(default_factory=dict)
    batches_done: int = 0
    tokens: int = 0
    n_windows: int = 0

    def prune_windows(self) -> None:
        """Forget the tokens of windows no top-k refers to any more."""
        keep: set[int] = set()
        for ls in self.layers.values():
            keep.update(ls.topk.referenced_windows().tolist())
        self.windows = {w: v for w, v in self.windows.items() if w in keep}

    def merge(self, other: ScanState) -> ScanState:
        """Merge another shard (window ids must be disjoint, e.g. offset by the caller)."""
        if set(self.layers) != set(other.layers):
            raise ValueError("cannot merge scans of different layers")
        for layer, ls in self.layers.items():
            ls.merge(other.layers[layer])
        self.windows.update(other.windows)
        self.batches_done += other.batches_done
        self.tokens += other.tokens
        self.n_windows += other.n_windows
        self.prune_windows()
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {layer: ls.state_dict() for layer, ls in self.layers.items()},
            "windows": {w: [v.doc_id, v.start, v.ids, v.source] for w, v in self.windows.items()},
            "batches_done": self.batches_done, "tokens": self.tokens, "n_windows": self.n_windows,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ScanState:
        return cls(
            layers={int(k): LayerStats.from_state_dict(v) for k, v in state["layers"].items()},
            windows={int(w): StoredWindow(*v) for w, v in state["windows"].items()},
            batches_done=state["batches_done"], tokens=state["tokens"], n_windows=state["n_windows"],
        )


def save_state(state: ScanState, path: Path, extra: dict[str, Any] | None = None) -> None:
    with atomic_path(path) as tmp:
        torch.save({"state": state.state_dict(), **(extra or {})}, tmp)


def load_state(path: Path) -> tuple[ScanState, dict[str, Any]]:
    blob = torch.load(path, weights_only=True)
    return ScanState.from_state_dict(blob.pop("state")), blob


def stats_spec(cfg: ScanConfig, categories: list[str]) -> StatsSpec:
    return StatsSpec(
        top_k=cfg.top_k, threshold=cfg.threshold, hist_lo=cfg.hist_range[0], hist_hi=cfg.hist_range[1],
        hist_bins=cfg.hist_bins, n_positions=cfg.context_length, include_first=cfg.include_first,
        categories=tuple(categories),
    )


class Scanner:
    """Runs a scan of ``model`` with ``cfg`` (see :func:`run_scan` for the one-call version)."""

    def __init__(self, model: HookedModel, cfg: ScanConfig, labeller: TokenLabeller | None = None) -> None:
        self.model, self.cfg, self.labeller = model, cfg, labeller
        self.layers = model.check_layers(cfg.layers if cfg.layers is not None else range(model.n_layers))
        if not self.layers:
            raise ConfigError("no layers to scan")
        self.n_neurons = min(cfg.neurons_per_layer or model.d_mlp, model.d_mlp)
        self.bos = model.bos_token_id if cfg.prepend_bos else None
        self.categories = list(labeller.categories) if labeller is not None else []
        self.corpus = Corpus(cfg.corpus, text_field=cfg.text_field)

    def new_state(self) -> ScanState:
        spec = stats_spec(self.cfg, self.categories)
        return ScanState({layer: LayerStats(layer, self.n_neurons, spec) for layer in self.layers})

    def windows(self) -> Any:
        return iter_windows(self.corpus, self.model.tokenizer, context_length=self.cfg.context_length,
                            bos_token_id=self.bos, labeller=self.labeller, max_tokens=self.cfg.max_tokens)

    def count_tokens(self) -> int | None:
        """Total corpus tokens for progress bars (None for streamed hub datasets)."""
        if isinstance(self.cfg.corpus, str) and self.cfg.corpus.startswith("hf:"):
            return self.cfg.max_tokens
        from .data.batches import tokenize_document

        total = 0
        for doc in self.corpus:
            total += len(tokenize_document(self.model.tokenizer, doc.text)[0])
            if self.cfg.max_tokens is not None and total >= self.cfg.max_tokens:
                return self.cfg.max_tokens
        return total

    def run(
        self,
        state: ScanState | None = None,
        *,
        progress: ProgressFn | None = None,
        checkpoint: Path | None = None,
        checkpoint_extra: dict[str, Any] | None = None,
    ) -> ScanState:
        """Stream the corpus through the model, updating ``state`` (a fresh one by default)."""
        state = state or self.new_state()
        total = self.count_tokens() if progress is not None else None
        for _ in self.steps(state, checkpoint=checkpoint, checkpoint_extra=checkpoint_extra):
            if progress is not None:
                progress(state.tokens, total)
        return state

    def steps(
        self,
        state: ScanState,
        *,
        checkpoint: Path | None = None,
        checkpoint_extra: dict[str, Any] | None = None,
    ) -> Iterator[ScanState]:
        """:meth:`run` one batch at a time: updates ``state`` and yields it after each batch; once the corpus is
        done, the windows no top-k refers to are pruned before the iteration ends. The hooks are registered only
        while a batch runs, so between steps the model is the caller's (the benchmark times a bare forward pass
        there)."""
        cfg, model = self.cfg, self.model
        for ls in state.layers.values():  # fresh or loaded from a checkpoint
            ls.compile, ls.full_batch = cfg.compile_stats, (cfg.batch_size, cfg.context_length)
        torch.manual_seed(cfg.seed)
        current: dict[str, Any] = {}
        n = self.n_neurons

        last = max(self.layers)

        def make_hook(layer: int) -> Callable[[torch.Tensor, Site], None]:
            ls = state.layers[layer]

            def hook(act: torch.Tensor, _site: Site) -> None:
                ls.update(act[..., :n] if n < act.shape[-1] else act, current["mask"], current["wids"],
                          current["labels"])
                if layer == last:  # nothing after the last scanned neurons is needed
                    raise StopForward

            return hook

        fns = {Site.mlp_post(layer): make_hook(layer) for layer in self.layers}
        stop = last + 1
        skip = state.batches_done
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        prune_every = 16
        batches = iter_batches(self.windows(), batch_size=cfg.batch_size, pad_token_id=pad,
                               has_bos=self.bos is not None,
                               n_categories=len(self.categories) if self.labeller is not None else None)
        for index, (batch, wins) in enumerate(batches):
            if index < skip:  # resuming: these batches are already in the state
                continue
            dev = model.device
            current["mask"] = batch.attention_mask.to(dev)
            current["wids"] = batch.window_ids
            current["labels"] = batch.labels.to(dev) if batch.labels is not None else None
            with torch.inference_mode(), model.hooks(fns):  # forward(stop_at_layer=...) ends the pass
                model.forward(batch.input_ids, current["mask"], stop_at_layer=stop)
            self._store(state, wins)
            release_free_memory()
            state.tokens += batch.n_tokens - (len(wins) if self.bos is not None else 0)
            state.n_windows += len(wins)
            state.batches_done = index + 1
            if state.batches_done % prune_every == 0:
                state.prune_windows()
            if checkpoint is not None and cfg.checkpoint_every and state.batches_done % cfg.checkpoint_every == 0:
                state.prune_windows()
                save_state(state, checkpoint, checkpoint_extra)
            yield state
        state.prune_windows()

    @staticmethod
    def _store(state: ScanState, wins: list[Window]) -> None:
        for w in wins:
            state.windows[w.window_id] = StoredWindow(w.doc_id, w.start, list(w.ids), w.source)


_malloc_trim: Any = None


def release_free_memory() -> bool:
    """Hand memory the C allocator holds free back to the system (glibc ``malloc_trim``; elsewhere a no-op).
    Returns whether it could."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if platform.system() == "Linux":
            try:
                import ctypes

                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _malloc_trim:
        _malloc_trim(0)
    return bool(_malloc_trim)


def environment(compile_stats: bool = True, device: torch.device | str = "cpu") -> dict[str, str]:
    import transformers

    from .stats.kernels import compile_enabled
    from .stats.native import used_by_scan

    return {"neuronhunter": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "threads": str(torch.get_num_threads()),
            "stats_kernel": "torch.compile" if compile_enabled(compile_stats) else "eager",
            "histograms": "native" if used_by_scan(compile_stats, device) else "bincount"}


def prepare_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Make ``out`` ready: refuse to clobber a complete run unless asked; never leave an old manifest behind."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a folder")
    if out.exists() and (out / MANIFEST).exists() and not overwrite:
        raise RunDirError(f"{out} already holds a complete run; pass --overwrite or choose another --out")
    if out.exists() and overwrite and not resume:
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()


def run_scan(
    cfg: ScanConfig,
    *,
    model: HookedModel | None = None,
    labeller: TokenLabeller | None = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    resume: bool = False,
    write: bool = True,
    write_manifest: bool = True,
) -> ScanResult:
    """Scan with ``cfg`` and write the run folder ``cfg.out``.

    Args:
        model: an already loaded model (else ``cfg.model`` is loaded).
        labeller: concept labeller (else built from ``cfg.concepts`` when set).
        progress: called with ``(tokens_done, total_tokens)`` after each batch.
        overwrite: replace a complete run in ``cfg.out``.
        resume: continue from ``cfg.out``'s checkpoint when its config matches.
        write: write the run folder (False: just return the result).
        write_manifest: write ``manifest.json`` (which marks the run complete); callers that add files to the
            run folder afterwards (the hunt) pass False and write the manifest themselves, last.
    """
    from .models.loading import load_model
    from .results import ScanResult

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if labeller is None and cfg.concepts is not None:
        from .data.concepts import ConceptLabeller

        labeller = ConceptLabeller(cfg.concepts, case_sensitive=cfg.case_sensitive,
                                   last_token_only=cfg.label_last_token_only)
    Corpus(cfg.corpus, text_field=cfg.text_field).check()  # fail early, before loading the model
    if model is None:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    timings["load_s"] = time.perf_counter() - t0
    scanner = Scanner(model, cfg, labeller)
    out = Path(cfg.out)
    key = cfg.model_dump(mode="json", exclude={"out", "formats", "checkpoint_every", "compile_stats"})
    state = None
    ckpt = out / CHECKPOINT
    if write:
        if resume and ckpt.exists():
            state, extra = load_state(ckpt)
            if extra.get("config") != key:
                raise RunDirError(f"{ckpt} was written with a different configuration; cannot resume")
            log.info("Resuming from batch %d (%d tokens)", state.batches_done, state.tokens)
        prepare_out(out, overwrite=overwrite or resume, resume=resume)
    t1 = time.perf_counter()
    state = scanner.run(state, progress=progress, checkpoint=ckpt if write else None,
                        checkpoint_extra={"config": key})
    timings["scan_s"] = time.perf_counter() - t1
    timings["tokens_per_s"] = state.tokens / max(timings["scan_s"], 1e-9)
    result = ScanResult(model=model, config=cfg, state=state, categories=scanner.categories,
                        corpus_sha256=scanner.corpus.sha256, n_docs=scanner.corpus.n_docs,
                        bos_token_id=scanner.bos, timings=timings, environment=environment(cfg.compile_stats, model.device))
    if write:
        t2 = time.perf_counter()
        result.write(out)
        if ckpt.exists():
            os.remove(ckpt)
        timings["write_s"] = time.perf_counter() - t2
        if write_manifest:
            result.write_manifest(out)
    return result
