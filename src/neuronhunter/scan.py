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

import functools
import itertools
import logging
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__
from .config import ScanConfig
from .data.batches import TokenLabeller, Window, iter_batches, iter_windows
from .data.corpus import Corpus
from .errors import ConfigError, CorpusError, NeuronHunterError, RunDirError
from .models.hooked import HookedModel, StopForward
from .models.sites import Site
from .runfolder import CHECKPOINT, RunFolder
from .stats.concepts import label_bits
from .stats.layer import Calibration, LayerStats, StatsSpec
from .stats.state import ScanState, StoredWindow, load_state, model_fingerprint, save_state, settings_digest
from .stats.tokens import counted_tokens, n_counted

__all__ = ["CHECKPOINT", "ScanState", "Scanner", "StoredWindow", "load_state", "run_scan", "save_state"]

if TYPE_CHECKING:
    from .results import ScanResult

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None], None]  # (tokens done, total tokens or None)


def stats_spec(cfg: ScanConfig, categories: list[str]) -> StatsSpec:
    lo, hi = cfg.hist_range if cfg.hist_range is not None else (None, None)
    return StatsSpec(
        top_k=cfg.top_k, threshold=cfg.threshold, hist_lo=lo, hist_hi=hi, hist_bins=cfg.hist_bins,
        n_positions=cfg.context_length, include_first=cfg.include_first, categories=tuple(categories),
        band_samples=cfg.band_samples, seed=cfg.seed,
    )


WINDOW_BITS = 24  # windows per document: up to 16M (2 billion tokens at 128 per window)


def window_key(doc_id: int, index: int) -> int:
    """The global id of the ``index``-th window of document ``doc_id`` (its place in the corpus): the same in
    every shard, so shards merge without renumbering and ties between windows go to the earlier one."""
    if index >= 1 << WINDOW_BITS:
        raise CorpusError(f"document {doc_id} has more than {1 << WINDOW_BITS:,} windows")
    return (int(doc_id) << WINDOW_BITS) | int(index)


def shard_of(source: str, n: int) -> int:
    """The shard (0..n-1) of a document, from a stable hash of its source (file and line or row): results do not
    depend on how many workers scan the shards or in which order they finish."""
    import hashlib

    digest = hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


# how a scan is run, not what it computes (a Ray scan's plan records its shard count itself)
ENGINE_FIELDS = {"engine", "workers", "ray_address", "shards", "shard_store"}


def resume_key(cfg: ScanConfig) -> dict[str, Any]:
    """What a resumed scan must share with the interrupted one (batch size included: the checkpoint counts batches)."""
    return cfg.model_dump(mode="json", exclude={"out", "formats", "checkpoint_every", "compile_stats",
                                                *ENGINE_FIELDS})


def merge_settings(cfg: ScanConfig, n_neurons: int, bos: int | None) -> str:
    """Digest of what two shards of one scan must share to be merged (not the corpus, batching or device)."""
    key = cfg.model_dump(mode="json", exclude={"out", "formats", "checkpoint_every", "compile_stats", "corpus",
                                               "max_tokens", "batch_size", "device", "seed", "layers",
                                               *ENGINE_FIELDS})
    return settings_digest({**key, "n_neurons": n_neurons, "bos_token_id": bos})


def context_limit(model: HookedModel) -> int | None:
    """The longest sequence the model was built for (learned or rotary position limit), or None if unknown."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Scanner:
    """Runs a scan of ``model`` with ``cfg`` (see :func:`run_scan` for the one-call version).

    The checks of the model's limits (layers, context length) run here, before anything is written.
    """

    def __init__(self, model: HookedModel, cfg: ScanConfig, labeller: TokenLabeller | None = None, *,
                 shard: tuple[int, int] | None = None, window_range: tuple[int, int, int] | None = None,
                 stop: tuple[int, int] | None = None) -> None:
        self.model, self.cfg, self.labeller = model, cfg, labeller
        if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ConfigError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        self.shard = shard
        # a contiguous part of the scan's windows, (document id, its first window's index, number of windows): the
        # scan's batches, cut where the whole scan's batches are cut, so each batch equals one of the single-process
        # scan's (neuronhunter.distributed); with it, ``stop`` (document id, tokens) is where the whole scan's
        # max_tokens cut falls (read that document's first tokens only, no later document), instead of max_tokens
        self.window_range, self.stop = window_range, stop
        self.layers = model.check_layers(cfg.layers if cfg.layers is not None else range(model.n_layers))
        if not self.layers:
            raise ConfigError("no layers to scan")
        limit = context_limit(model)
        if limit is not None and cfg.context_length > limit:
            raise ConfigError(f"--context-length {cfg.context_length} is longer than {model.name} supports "
                              f"({limit} positions)")
        self.n_neurons = min(cfg.neurons_per_layer or model.d_mlp, model.d_mlp)
        self.bos = model.bos_token_id if cfg.prepend_bos else None
        self.categories = list(labeller.categories) if labeller is not None else []
        self.corpus = Corpus(cfg.corpus, text_field=cfg.text_field, on_error=cfg.on_bad_document)  # type: ignore[arg-type]
        self.split = cfg.document_split()
        self.settings = merge_settings(cfg, self.n_neurons, self.bos)
        self._model_fp: str | None = None

    @property
    def model_fp(self) -> str:
        """The model's weight fingerprint (computed once per scanner)."""
        if self._model_fp is None:
            self._model_fp = model_fingerprint(self.model.model)
        return self._model_fp

    def new_state(self, calibration: dict[int, Calibration] | None = None) -> ScanState:
        """A fresh state; its per-neuron ranges come from ``calibration`` (default: :meth:`calibrate`, or the
        fixed ``hist_range`` when one is configured)."""
        spec = stats_spec(self.cfg, self.categories)
        if calibration is None:
            calibration = self.calibrate() if self.cfg.hist_range is None else {}
        return ScanState({layer: LayerStats(layer, self.n_neurons, spec, calibration=calibration.get(layer))
                          for layer in self.layers}, model_fp=self.model_fp, settings=self.settings)

    def calibrate(self) -> dict[int, Calibration]:
        """Each neuron's range on the scan's first ``calibration_windows`` windows (one forward pass over them,
        batched as the scan batches): it fixes the histogram bins and the exemplar band scales of every neuron
        before the scan starts, so that all batches, shards and resumed runs share them."""
        cfg, model, n = self.cfg, self.model, self.n_neurons
        lo = {layer: torch.full((n,), float("inf")) for layer in self.layers}
        hi = {layer: torch.full((n,), float("-inf")) for layer in self.layers}
        current: dict[str, torch.Tensor] = {}
        last = max(self.layers)

        def make_hook(layer: int) -> Callable[[torch.Tensor, Site], None]:
            def hook(act: torch.Tensor, _site: Site) -> None:
                a = act[..., :n].float()
                keep = counted_tokens(current["mask"], include_first=cfg.include_first).unsqueeze(-1)
                torch.minimum(lo[layer], torch.where(keep, a, float("inf")).amin((0, 1)).cpu(), out=lo[layer])
                torch.maximum(hi[layer], torch.where(keep, a, float("-inf")).amax((0, 1)).cpu(), out=hi[layer])
                if layer == last:
                    raise StopForward

            return hook

        fns = {Site.mlp_post(layer): make_hook(layer) for layer in self.layers}
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        windows = itertools.islice(self.windows(all_shards=True, labelled=False), cfg.calibration_windows)
        n_windows = n_tokens = 0
        for batch, wins in iter_batches(windows, batch_size=cfg.batch_size, pad_token_id=pad,
                                        has_bos=self.bos is not None):
            current["mask"] = batch.attention_mask.to(model.device)
            with torch.inference_mode(), model.hooks(fns):
                model.forward(batch.input_ids, current["mask"], stop_at_layer=last + 1)
            n_windows += len(wins)
            n_tokens += n_counted(batch.attention_mask, include_first=cfg.include_first)
        return {layer: Calibration.from_extremes(lo[layer], hi[layer], windows=n_windows, tokens=n_tokens)
                for layer in self.layers}

    def documents(self, *, all_shards: bool = False) -> Iterator[Any]:
        """The corpus's documents on the configured side of the split, those of this scanner's shard only (unless
        ``all_shards``)."""
        for doc in self.split.select(self.corpus, self.cfg.split):
            if self.shard is None or all_shards or shard_of(doc.source, self.shard[1]) == self.shard[0]:
                yield doc

    def windows(self, *, all_shards: bool = False, labelled: bool = True) -> Iterator[Window]:
        """The scan's windows, numbered globally (:func:`window_key`: the same id whatever the shard)."""
        step = self.cfg.context_length - (1 if self.bos is not None else 0)
        cut = functools.partial(iter_windows, tokenizer=self.model.tokenizer, context_length=self.cfg.context_length,
                                bos_token_id=self.bos, labeller=self.labeller if labelled else None)
        if self.window_range is None or all_shards:
            windows = cut(self.documents(all_shards=all_shards), max_tokens=self.cfg.max_tokens)
        else:
            windows = self._windows_in_range(cut, self.documents(all_shards=True), step)
        for w in windows:
            w.window_id = window_key(w.doc_id, w.start // step)
            yield w

    def _windows_in_range(self, cut: Callable[..., Iterator[Window]], docs: Iterator[Any],
                          step: int) -> Iterator[Window]:
        """The windows of :attr:`window_range`, none after the :attr:`stop` cut (documents come in id order; those
        before the range are read but not tokenised)."""
        assert self.window_range is not None
        first, skip, count = self.window_range
        last, tokens = self.stop if self.stop is not None else (None, None)
        if count <= 0:
            return
        for doc in docs:
            if doc.doc_id < first:
                continue
            if last is not None and doc.doc_id > last:
                return
            for w in cut([doc], max_tokens=tokens if doc.doc_id == last else None):
                if doc.doc_id == first and w.start // step < skip:
                    continue
                yield w
                count -= 1
                if count == 0:
                    return

    def count_tokens(self) -> int | None:
        """Total corpus tokens for progress bars (None for streamed hub datasets)."""
        if isinstance(self.cfg.corpus, str) and self.cfg.corpus.startswith("hf:"):
            return self.cfg.max_tokens
        from .data.batches import tokenize_document

        total = 0
        for doc in self.documents():
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
        done, the windows no exemplar refers to are pruned before the iteration ends. The hooks are registered
        only while a batch runs, so between steps the model is the caller's (the benchmark times a bare forward
        pass there).

        A state loaded from a checkpoint (``batches_done > 0``) continues after its batches; the windows of those
        batches are read again and their fingerprint must equal the state's, else the corpus changed since the
        interruption and the scan is refused (:class:`RunDirError`, nothing merged)."""
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
        replay = ScanState({})  # fingerprint of the batches a resumed scan skips
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        prune_every = 16
        batches = iter_batches(self.windows(), batch_size=cfg.batch_size, pad_token_id=pad,
                               has_bos=self.bos is not None,
                               n_categories=len(self.categories) if self.labeller is not None else None)
        for index, (batch, wins) in enumerate(batches):
            if index < skip:  # resuming: these batches are already in the state
                for w in wins:
                    replay.add_window(w.source, w.start, w.ids)
                continue
            if index == skip and skip:
                _check_replay(state, replay)
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
                save_state(state, checkpoint, checkpoint_extra, codec="lz4")  # (read back only on resume)
            yield state
        if skip and state.batches_done == skip:  # the corpus ended at (or before) the interruption point
            _check_replay(state, replay)
        state.prune_windows()

    @staticmethod
    def _store(state: ScanState, wins: list[Window]) -> None:
        for w in wins:
            bits = None
            if w.labels is not None:
                bits = label_bits(torch.from_numpy(np.ascontiguousarray(w.labels))).tolist()
            state.windows[w.window_id] = StoredWindow(w.doc_id, w.start, list(w.ids), w.source, bits)
            state.add_window(w.source, w.start, w.ids)


def _check_replay(state: ScanState, replay: ScanState) -> None:
    if replay.corpus_fp != state.corpus_fp:
        raise RunDirError("cannot resume: the corpus differs from the one the interrupted scan read (its first "
                          f"{state.n_windows:,} windows changed); start again with --overwrite")


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
    folder: RunFolder | None = None,
) -> ScanResult:
    """Scan with ``cfg`` and write the run folder ``cfg.out`` (see :mod:`neuronhunter.runfolder` for the rules).

    The run is written into a working folder beside ``cfg.out`` and swapped into place when complete, so a
    complete run already in ``cfg.out`` stays readable until then.

    Args:
        model: an already loaded model (else ``cfg.model`` is loaded).
        labeller: concept labeller (else built from ``cfg.concepts`` when set).
        progress: called with ``(tokens_done, total_tokens)`` after each batch.
        overwrite: replace a complete run in ``cfg.out`` (only a neuronhunter run folder is ever replaced).
        resume: continue the interrupted scan of ``cfg.out``; refused when its config, corpus or model differ,
            or when there is nothing to resume.
        write: write the run folder (False: just return the result).
        write_manifest: complete the run (manifest last, then the swap); callers that add files to the run
            afterwards (the hunt) pass False, write into ``result.run_dir`` and call ``result.folder.commit``.
        folder: the :class:`RunFolder` to write (default: one for ``cfg.out``).
    """
    from .models.loading import load_model
    from .results import ScanResult

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if labeller is None and cfg.concepts is not None:
        from .data.concepts import ConceptLabeller

        labeller = ConceptLabeller(cfg.concepts, case_sensitive=cfg.case_sensitive,
                                   last_token_only=cfg.label_last_token_only)
    Corpus(cfg.corpus, text_field=cfg.text_field, on_error=cfg.on_bad_document).check()  # type: ignore[arg-type]  # fail early, before loading the model
    if cfg.engine == "ray":  # the same scan as shards of the corpus on Ray actors, merged (neuronhunter.distributed)
        from .distributed import run_distributed_scan

        return run_distributed_scan(cfg, model=model, labeller=labeller, progress=progress, overwrite=overwrite,
                                    resume=resume, write=write, write_manifest=write_manifest, folder=folder)
    if write and folder is None:
        folder = RunFolder(cfg.out, kind="scan")
    if folder is not None:
        folder.check(overwrite=overwrite, resume=resume)
    if model is None:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    timings["load_s"] = time.perf_counter() - t0
    scanner = Scanner(model, cfg, labeller)  # checks layers and context length
    key = resume_key(cfg)
    state = None
    ckpt = None
    if folder is not None:
        ckpt = folder.begin(overwrite=overwrite, resume=resume) / CHECKPOINT
        if folder.resumed and not ckpt.exists() and (folder.work / "shards" / "index.json").exists():
            raise RunDirError("the interrupted scan ran on Ray (--engine ray); resume it with --engine ray")
        if folder.resumed and ckpt.exists():
            state = _resumable_state(ckpt, key, scanner)
            log.info("Resuming from batch %d (%d tokens)", state.batches_done, state.tokens)
    t1 = time.perf_counter()
    try:
        state = scanner.run(state, progress=progress, checkpoint=ckpt, checkpoint_extra={"config": key})
    except NeuronHunterError:
        if folder is not None and not (ckpt is not None and ckpt.exists()):
            folder.discard()  # bad input and nothing worth resuming
        raise
    if not any(ls.moments.count for ls in state.layers.values()):
        if folder is not None:
            folder.discard()
        first = "" if scanner.bos is not None else " (without BOS each window's first token is not counted)"
        raise CorpusError(f"the scan counted no tokens{first}: the corpus is too short")
    timings["scan_s"] = time.perf_counter() - t1
    timings["tokens_per_s"] = state.tokens / max(timings["scan_s"], 1e-9)
    result = ScanResult(model=model, config=cfg, state=state, categories=scanner.categories,
                        bos_token_id=scanner.bos, timings=timings,
                        environment=environment(cfg.compile_stats, model.device),
                        skipped_documents=getattr(scanner.corpus, "n_skipped", 0))
    if folder is not None:
        t2 = time.perf_counter()
        result.write(folder.work)
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
        timings["write_s"] = time.perf_counter() - t2
        result.folder = folder
        if write_manifest:
            folder.commit(result.manifest())
    return result


def _resumable_state(ckpt: Path, key: dict[str, Any], scanner: Scanner) -> ScanState:
    """The checkpoint's state, if it was written by the same configuration and model (else a one-line error)."""
    state, extra = load_state(ckpt)
    old = extra.get("config") or {}
    if old != key:
        changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        raise RunDirError(f"cannot resume: the interrupted scan used a different configuration "
                          f"({', '.join(changed)}); start again with --overwrite")
    if state.model_fp is not None and state.model_fp != scanner.model_fp:
        raise RunDirError("cannot resume: the model's weights differ from those of the interrupted scan; "
                          "start again with --overwrite")
    return state
