"""The scan on Ray: shards of the corpus scanned by actors, each shard's state saved, then merged into one run.

A scan's statistics are mergeable accumulators (:mod:`neuronhunter.stats`), its windows carry global ids (the
document's place in the corpus and the window's place in the document, :func:`~neuronhunter.scan.window_key`) and
ties between exemplars go to the smaller id. So the scan can be cut into shards, each shard scanned anywhere, in
any order, and the shards' states merged into exactly the state of one pass. This module does that on Ray::

    driver                                         Ray actors (one per worker; each loads the model once)
      check the run folder and the config
      start or join Ray, start the actors  ----->  check layers, context length; model fingerprint
      plan (once, on actor 0)  --------------------> tokenise every document (no model): the max_tokens cut,
                                                     the scan's windows and batches, N shards = N contiguous runs
                                                     of whole batches (shards.shard_ranges), a corpus digest
      calibrate (once, on actor 0)  ---------------> each neuron's range on the scan's first windows (the
                                                     single-process scan's calibration, shared by every shard)
      hand out shards, largest first  ------------> scan one shard (Scanner(window_range=..., stop=cut)), write
      record each finished shard in the index <---- shards/shard-000ii.pt atomically, then its .json record
      all done: stop the actors; tree-merge the shard states in shard order (ScanState.merge); write the run

**Same tables as one process.** Every batch a worker runs is a batch of the single-process scan (same windows,
same padding), so activations are bit-identical when the worker runs as many torch threads as that scan (CPU
matrix kernels may split sums by thread). Counts, minima, maxima, histograms and exemplars are then equal; float64
moments differ by the order of the merge only. The cut depends only on the corpus, the options and the number of
shards, never on the number of workers or which one finishes first; the merge order is fixed (shard order).

**Resume.** The run folder's ``shards/index.json`` holds the plan (configuration, model fingerprint, corpus
digest, max_tokens cut, each shard's window range) and a run id; ``shards/calibration.pt`` the calibration. A shard
is done when its state and then its ``.json`` record (same run id) are in the shard store. ``--resume`` plans again,
refuses a changed configuration, model or corpus, and scans only the shards that are not done. A worker that dies
(SIGKILL, out of memory) is restarted by Ray and its shard retried (actor ``max_restarts``, ``max_task_retries``);
a shard whose worker died three more times stops the scan with one line, and ``--resume`` continues it.

**Where shards live.** By default in the run folder (``<out>/shards``; on a cluster ``--out`` must then be on a
shared filesystem). ``shard_store`` may name another folder or an fsspec URI (``s3://bucket/scan``): states are
written there under a temporary name and then moved into place. The driver reads them back for the merge.

**Reading.** A shard of a many-file corpus starts reading at the file of its first document (earlier files are not
opened); a one-stream corpus (one file, ``master``, ``hf:``) is read from its start, the documents before the
shard's range skipped without tokenising them. See ``docs/scale.md``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import ScanConfig
from .data.batches import TokenLabeller
from .errors import ConfigError, CorpusError, NeuronHunterError, RunDirError
from .io import atomic_path, read_json, write_json
from .runfolder import CHECKPOINT, RunFolder
from .shards import (
    CountOnce,
    Plan,
    ShardStore,
    TreeMerge,
    compare_runs,
    in_file,
    peak_rss_mb,
    shard_ranges,
    tree_merge,
)
from .stats.layer import Calibration
from .stats.state import ScanState

if TYPE_CHECKING:
    from .models.hooked import HookedModel
    from .results import ScanResult

log = logging.getLogger(__name__)

__all__ = ["CountOnce", "Plan", "ShardStore", "ShardWorker", "compare_runs", "run_distributed_scan",
           "run_sharded_pass", "shard_ranges", "tree_merge"]

SHARDS = "shards"  # the run folder's sub-folder (always holds the index and the calibration)
INDEX = "index.json"
CALIBRATION = "calibration.pt"
MAX_ATTEMPTS = 3  # a shard whose worker died this many times stops the scan (resume continues it)
POLL_S = 1.0  # how often the driver looks for finished shards

# ---------------------------------------------------------------------------------------------------- worker
class ShardWorker:
    """One worker: loads the model once and scans shards (a plain class; the driver runs it as a Ray actor).

    Args:
        config: the scan configuration (a :class:`ScanConfig` or a subclass, e.g. the hunt's).
        model: an already loaded model (tests, the Python API), or None to load ``config["model"]``.
        labeller: the concept labeller, or None.
        threads: torch threads for this worker (its share of the node's CPUs).
    """

    def __init__(self, config: ScanConfig, model: HookedModel | None = None,
                 labeller: TokenLabeller | None = None, threads: int | None = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if threads:
            torch.set_num_threads(threads)
        from .scan import Scanner

        self.error: NeuronHunterError | None = None
        self.cfg = config
        try:
            if model is None:
                from .models.loading import load_model

                model = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype)
            self.model, self.labeller = model, labeller
            self.scanner = Scanner(model, self.cfg, labeller)  # checks layers and context length
        except NeuronHunterError as exc:  # reported by describe() as a task error (one line for the user)
            self.error = exc

    def describe(self) -> dict[str, Any]:
        """Who this worker is and what it scans (fingerprint, settings); raises the error that stopped the worker
        from loading the model or checking the configuration."""
        if self.error is not None:
            raise self.error
        sc = self.scanner
        from .scan import environment

        return {"host": socket.gethostname(), "pid": os.getpid(), "model_fp": sc.model_fp, "settings": sc.settings,
                "layers": sc.layers, "n_neurons": sc.n_neurons, "threads": torch.get_num_threads(),
                "device": str(self.model.device),
                "environment": environment(self.cfg.compile_stats, self.model.device)}

    def plan(self, shards: int) -> dict[str, Any]:
        """Count every document's tokens (in corpus order, on the configured side of the split): the max_tokens
        cut, the shards' window ranges (:func:`shard_ranges`) and a digest of the corpus read (what a resumed scan
        must find again)."""
        from .data.batches import count_document_tokens
        from .scan import Scanner

        sc = Scanner(self.model, self.cfg, None)
        docs: list[tuple[int, int, int]] = []
        stop = None
        seen = 0
        limit = self.cfg.max_tokens
        h = hashlib.blake2b(digest_size=32)
        names = sc.corpus.files() or []
        first_ids: dict[int, tuple[str, int]] = {}  # document -> (its file, that file's first document's id)
        at, here = -1, ("", 0)
        for doc in sc.corpus:
            if names and (at < 0 or not in_file(doc.source, names[at])):
                at += 1
                while at < len(names) and not in_file(doc.source, names[at]):
                    at += 1
                if at == len(names):  # (not expected) read such a corpus from its start in every shard
                    names, first_ids = [], {}
                here = (names[at], doc.doc_id) if names else here
            if not sc.split.keeps(doc.uid, self.cfg.split):
                continue
            if names:
                first_ids[doc.doc_id] = here
            full = n = count_document_tokens(self.model.tokenizer, doc)
            if limit is not None and seen + n >= limit:
                n = limit - seen
                stop = (doc.doc_id, n)
            seen += n
            docs.append((doc.doc_id, n, full))
            h.update(f"{doc.doc_id}\x00{doc.source}\x00{n}\x00".encode("utf-8", "surrogatepass"))
            for piece in doc.iter_text():
                h.update(piece.encode("utf-8", "surrogatepass"))
            if stop is not None:
                break
        step = self.cfg.context_length - (1 if sc.bos is not None else 0)
        ranges = shard_ranges(docs, shards=shards, batch_size=self.cfg.batch_size, step=step)
        corpus = {"documents": len(docs), "tokens": seen, "skipped": int(getattr(sc.corpus, "n_skipped", 0)),
                  "digest": h.hexdigest()}
        # where each shard starts reading a many-file corpus: the file of its first document (earlier files unread)
        starts = [list(first_ids[r["doc"]]) if r["windows"] and r["doc"] in first_ids else None for r in ranges]
        return {"stop": stop, "ranges": ranges, "corpus": corpus, "starts": starts}

    def calibrate(self) -> dict[int, dict[str, Any]]:
        """The single-process scan's calibration (its first windows over all shards); empty with a fixed range."""
        if self.cfg.hist_range is not None:
            return {}
        return {layer: cal.state_dict() for layer, cal in self.scanner.calibrate().items()}

    def shard_pass(self, labeller: TokenLabeller | None, window_range: tuple[int, int, int],
                   stop: tuple[int, int] | None, calibration: dict[int, dict[str, Any]]) -> tuple[Any, ScanState]:
        """The scanner of one shard and its fresh state (the held-out pass's worker scores explanations instead)."""
        from .scan import Scanner

        sc = Scanner(self.model, self.cfg, labeller, window_range=window_range, stop=stop)
        sc._model_fp = self.scanner.model_fp
        cal = {int(k): Calibration.from_state_dict(v) for k, v in calibration.items()}
        return sc, sc.new_state(cal)

    def scan(self, shard: int, span: dict[str, int], stop: list[int] | None,
             calibration: dict[int, dict[str, Any]], store: str, record: dict[str, Any],
             start: list[Any] | None = None) -> dict[str, Any]:
        """Scan one shard (its window range ``span``, see :func:`shard_ranges`; ``start``: the file of a many-file
        corpus to start reading at, and its first document's id) and write its state (then its record) to
        ``store``; returns the record."""
        from .data.corpus import Corpus

        t0 = time.perf_counter()
        labeller = self.labeller
        counts = getattr(labeller, "cooccurrence", None)  # a labeller's own mergeable counts (the hunt's)
        if labeller is not None and isinstance(counts, np.ndarray):
            counts = labeller.cooccurrence = np.zeros_like(counts)  # (what Ray handed over is read-only)
            step = self.cfg.context_length - (1 if self.scanner.bos is not None else 0)
            labeller = CountOnce(labeller, skip=span["skip"] * step, first=span["doc_tokens"])
        sc, state = self.shard_pass(labeller, (span["doc"], span["skip"], span["windows"]),
                                    tuple(stop) if stop else None, calibration)  # type: ignore[arg-type]
        if start is not None:
            sc.corpus = Corpus(self.cfg.corpus, text_field=self.cfg.text_field, on_error=self.cfg.on_bad_document,  # type: ignore[arg-type]
                               start=(str(start[0]), int(start[1])))
        t1 = time.perf_counter()
        for _ in sc.steps(state):
            pass
        scan_s = time.perf_counter() - t1
        out = {**record, "shard": shard, "tokens": state.tokens, "windows": state.n_windows,
               "documents": state.documents, "corpus_fp": state.corpus_fingerprint, "scan_s": scan_s,
               "host": socket.gethostname(), "pid": os.getpid()}
        if labeller is not None and isinstance(counts, np.ndarray):
            out["cooccurrence"] = counts.tolist()
        out["peak_rss_mb"] = peak_rss_mb()
        out["total_s"] = time.perf_counter() - t0
        ShardStore(store).put_state(shard, state, out)
        out["total_s"] = time.perf_counter() - t0  # (the stored record's excludes its own write)
        return out


# ---------------------------------------------------------------------------------------------------- driver
def _unwrap(exc: BaseException) -> BaseException:
    """The user error inside a Ray task error (so the CLI prints one line), else the error itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, NeuronHunterError) else exc


def _get(ref: Any, timeout: float | None = None) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        err = _unwrap(exc)
        if err is not exc:
            raise err from None
        raise


@dataclass
class _Ray:
    """The Ray session of one scan: started here (and shut down at the end) or joined."""

    started: bool = False
    workers: list[Any] = field(default_factory=list)

    def start(self, cfg: ScanConfig) -> None:
        ray = _require_ray()
        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                  "log_to_driver": False}
        if cfg.ray_address is None:
            kwargs["object_store_memory"] = 256 << 20  # shards travel as files, not objects
            # Ray lowers its workers' priority (nice 15) by default: on a busy machine a scan would then run
            # slower than the same scan in one process; the workers keep the driver's priority instead
            kwargs["_system_config"] = {"worker_niceness": 0}
        try:
            ray.init(address=cfg.ray_address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot start or join Ray at {cfg.ray_address or 'this machine'}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.started = True

    def start_workers(self, cfg: ScanConfig, cls: type[ShardWorker], model: HookedModel | None,
                      labeller: TokenLabeller | None, args: tuple[Any, ...] = ()) -> tuple[Callable[[], Any], list[dict[str, Any]]]:
        """Start the workers (actors of ``cls``, constructed with ``args`` after the usual arguments; a given
        ``model`` is handed over, else each loads ``cfg.model``) and check they loaded the same weights; returns a
        function that starts one more (a replacement) and each worker's :meth:`~ShardWorker.describe`."""
        import ray

        n_workers, cpus, gpus = worker_layout(cfg)
        # one method at a time, on the worker process's main thread: torch ran a shard 20-30% slower on the thread
        # pool of a threaded actor (max_concurrency > 1) than on the main thread (measured here, 2 threads)
        actor = ray.remote(cls).options(num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_ATTEMPTS,
                                        max_task_retries=MAX_ATTEMPTS)
        model_ref = ray.put(model) if model is not None else None
        threads = None if gpus else max(1, int(cpus))

        def new_worker() -> Any:
            return actor.remote(cfg, model_ref, labeller, threads, *args)

        self.workers = [new_worker() for _ in range(n_workers)]
        infos = [_get(w.describe.remote()) for w in self.workers]
        if len({i["model_fp"] for i in infos}) > 1:
            raise RunDirError("the workers loaded different model weights (is the model the same on every node?)")
        return new_worker, infos

    def stop_workers(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.workers = []

    def shutdown(self) -> None:
        self.stop_workers()
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


def _require_ray() -> Any:
    from .extras import require

    return require("ray")


def worker_layout(cfg: ScanConfig) -> tuple[int, float, float]:
    """``(workers, cpus per worker, gpus per worker)`` from the configuration and the Ray cluster's resources."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus > 0)
    if cfg.workers is not None:
        n = cfg.workers
    elif cuda:
        n = max(1, int(gpus))
    else:
        n = max(1, len([node for node in ray.nodes() if node.get("Alive")]))
    if cuda:
        if gpus < n:
            raise ConfigError(f"{n} workers need {n} GPUs; the Ray cluster has {gpus:g}")
        return n, 1.0, 1.0
    # each worker gets an equal share of the CPUs (whole CPUs when there are enough, else a fraction: more workers
    # than CPUs share them, which is slower than one worker per CPU but gives the same tables)
    per = float(int(cpus // n)) if cpus >= n else int(cpus / n * 1e4) / 1e4  # (rounded down: n of them fit)
    return n, per, 0.0


class _Progress:
    """Tokens done: those of the finished shards (a worker runs one method at a time, so it cannot be asked how
    far into a shard it is)."""

    def __init__(self, fn: Callable[[int, int | None], None] | None, total: int) -> None:
        self.fn, self.total, self.done = fn, total, 0

    def report(self) -> None:
        if self.fn is not None:
            self.fn(self.done, self.total)


def run_distributed_scan(
    cfg: ScanConfig,
    *,
    model: HookedModel | None = None,
    labeller: TokenLabeller | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    write: bool = True,
    write_manifest: bool = True,
    folder: RunFolder | None = None,
) -> ScanResult:
    """:func:`~neuronhunter.scan.run_scan` with ``engine="ray"`` (see the module docstring); same arguments.

    Without ``write`` the shards go to a temporary folder that is removed afterwards.
    """
    import tempfile

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _require_ray()  # (one line when the extra is missing)
    if write and folder is None:
        folder = RunFolder(cfg.out, kind="scan")
    if folder is not None:
        folder.check(overwrite=overwrite, resume=resume)
        if resume:
            _check_resumable(folder, cfg)  # before Ray starts: a changed configuration needs no workers to tell
    session = _Ray()
    tmp = None
    created = False  # this call made the working folder (so it may remove it after bad input)
    store: ShardStore | None = None
    try:
        session.start(cfg)
        new_worker, infos = session.start_workers(cfg, ShardWorker, model, labeller)  # model checks fail here
        n_workers = len(infos)
        timings["load_s"] = time.perf_counter() - t0
        from .scan import resume_key

        work = folder.begin(overwrite=overwrite, resume=resume) if folder is not None else \
            Path(tmp := tempfile.mkdtemp(prefix="neuronhunter-shards-"))
        created = folder is not None and not folder.resumed
        if folder is not None and folder.resumed and (work / CHECKPOINT).exists():
            raise RunDirError("the interrupted scan ran in one process (--engine local); resume it without "
                              "--engine ray, or start again with --overwrite")
        meta_dir = work / SHARDS
        t1 = time.perf_counter()
        planned = _get(session.workers[0].plan.remote(cfg.shards))
        plan = Plan(shards=cfg.shards, config=resume_key(cfg) | {"engine": "ray"}, model_fp=infos[0]["model_fp"],
                    settings=infos[0]["settings"], corpus=planned["corpus"],
                    stop=tuple(planned["stop"]) if planned["stop"] else None, ranges=planned["ranges"])
        index, resumed = _open_index(meta_dir, plan, config_defaults(cfg),
                                     resumed=folder is not None and folder.resumed)
        # another store holds each run's shards in a folder of its own (two runs may share a store)
        store = ShardStore(f"{cfg.shard_store.rstrip('/')}/{index['run']}" if cfg.shard_store else meta_dir)
        t_cal = time.perf_counter()
        calibration = _calibration(meta_dir, session.workers[0], index, resumed)
        timings["calibrate_s"] = time.perf_counter() - t_cal  # (part of plan_s)
        timings["plan_s"] = time.perf_counter() - t1
        record = {"run": index["run"], "plan": index["digest"]}
        done = {s: r for s, r in store.records().items()
                if r.get("run") == index["run"] and r.get("plan") == index["digest"]}
        for shard, rec in done.items():  # (a driver killed after a shard's record, before the index was updated)
            index.setdefault("shards", {}).setdefault(str(shard), _summary(rec))
        # in shard order (shards are about equal): they tend to finish in order, so the merge keeps up with them
        todo = [s for s in range(plan.shards) if s not in done and plan.ranges[s]["windows"] > 0]
        log.info("Ray scan: %d shards (%d done, %d to scan, %d empty) on %d workers", plan.shards, len(done),
                 len(todo), plan.shards - len(done) - len(todo), n_workers)
        index["workers"] = [{"host": i["host"], "pid": i["pid"], "threads": i["threads"], "device": i["device"]}
                            for i in infos]
        index["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        starts = index["starts"] = planned.get("starts") or [None] * plan.shards
        write_json(meta_dir / INDEX, index)
        bar = _Progress(progress, sum(plan.tokens))
        bar.done = sum(int(r["tokens"]) for r in done.values())
        merge = _OrderedMerge(store, plan, index, sorted([*done, *todo]), eager=cfg.ray_address is not None)
        for shard in sorted(done):
            merge.add(shard)
        t2 = time.perf_counter()
        scanned = _schedule(session, new_worker, todo, plan, calibration, store, record, bar, index, meta_dir,
                            starts, merge)
        timings["scan_s"] = time.perf_counter() - t2
        timings["merge_during_scan_s"] = merge.seconds
        session.shutdown()  # free the workers' memory before the rest of the merge
        done.update(scanned)
        t3 = time.perf_counter()
        state = merge.result()
        timings["merge_s"] = time.perf_counter() - t3
        if labeller is not None and isinstance(getattr(labeller, "cooccurrence", None), np.ndarray):
            for r in done.values():
                labeller.cooccurrence += np.asarray(r["cooccurrence"], dtype=np.int64)
        if state is None or not any(ls.moments.count for ls in state.layers.values()):
            if folder is not None and not done:
                folder.discard()
            raise CorpusError("the scan counted no tokens: the corpus is too short")
        if state.tokens != plan.corpus["tokens"]:
            raise RunDirError(f"the shards counted {state.tokens:,} tokens, the plan {plan.corpus['tokens']:,}: "
                              "the corpus changed during the scan; start again with --overwrite")
        timings["tokens_per_s"] = sum(int(r["tokens"]) for r in scanned.values()) / max(timings["scan_s"], 1e-9)
        timings["worker_scan_s"] = sum(float(r["scan_s"]) for r in scanned.values())
        timings["shards_scanned"] = float(len(scanned))
        timings["shards_resumed"] = float(len(done) - len(scanned))
        return _finish(cfg, model, labeller, state, plan, timings, folder, store, write_manifest, index,
                       infos[0]["environment"], n_workers)
    except BaseException as exc:
        err = _unwrap(exc)
        if created and isinstance(err, NeuronHunterError) and (store is None or not store.records()):
            folder.discard()  # bad input found before any shard was scanned: nothing worth resuming
        if err is not exc:
            raise err from None
        raise
    finally:
        session.shutdown()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def run_sharded_pass(cfg: ScanConfig, worker: type[ShardWorker], args: tuple[Any, ...],
                     build: Callable[[dict[str, Any]], ScanState], store: Path, *, model: HookedModel | None = None,
                     labeller: TokenLabeller | None = None,
                     progress: Callable[[int, int | None], None] | None = None) -> tuple[ScanState, dict[str, float]]:
    """One pass of another kind over ``cfg``'s corpus, cut into shards on Ray like the scan, without a run folder
    of its own (the held-out pass of ``explain``): actors of class ``worker`` (a :class:`ShardWorker` whose
    :meth:`~ShardWorker.shard_pass` makes that pass's scanner and state; ``args``, small and JSON-like, follow its
    usual constructor arguments), shard states written to the folder ``store`` (the caller's: every worker must
    reach it; its shard files are removed afterwards), merged in shard order (``build`` turns a stored state dict
    back into a state). Returns the merged state and timings."""
    _require_ray()  # (one line when the extra is missing)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    session = _Ray()
    shards = ShardStore(store)
    try:
        session.start(cfg)
        new_worker, infos = session.start_workers(cfg, worker, model, labeller, args)
        timings["load_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        planned = _get(session.workers[0].plan.remote(cfg.shards))
        plan = Plan(shards=cfg.shards, config={}, model_fp=infos[0]["model_fp"], settings=infos[0]["settings"],
                    corpus=planned["corpus"], stop=tuple(planned["stop"]) if planned["stop"] else None,
                    ranges=planned["ranges"])
        index = {"run": uuid.uuid4().hex, "digest": plan.digest()}
        timings["plan_s"] = time.perf_counter() - t1
        todo = [s for s in range(plan.shards) if plan.ranges[s]["windows"] > 0]
        merge = _OrderedMerge(shards, plan, index, todo, build, eager=cfg.ray_address is not None)
        bar = _Progress(progress, sum(plan.tokens))
        t2 = time.perf_counter()
        starts = planned.get("starts") or [None] * plan.shards
        _schedule(session, new_worker, todo, plan, {}, shards, {"run": index["run"], "plan": index["digest"]}, bar,
                  index, store, starts, merge)
        timings["scan_s"] = time.perf_counter() - t2
        timings["merge_during_scan_s"] = merge.seconds
        session.shutdown()
        t3 = time.perf_counter()
        state = merge.result()
        timings["merge_s"] = time.perf_counter() - t3
        if state is None:
            raise CorpusError("the pass read no tokens: the corpus is too short")
        return state, timings
    except BaseException as exc:
        err = _unwrap(exc)
        if err is not exc:
            raise err from None
        raise
    finally:
        session.shutdown()
        shards.remove()
        (store / INDEX).unlink(missing_ok=True)  # (_schedule's record of the shards)


def _check_resumable(folder: RunFolder, cfg: ScanConfig) -> None:
    """Refuse to resume an interrupted Ray scan with another configuration or number of shards (the corpus and the
    model are compared once the workers have planned)."""
    from .scan import resume_key

    path = folder.work / SHARDS / INDEX
    if not path.is_file():
        return
    old = Plan.from_json(read_json(path)["plan"])
    new = Plan(shards=cfg.shards, config=resume_key(cfg) | {"engine": "ray"}, model_fp=old.model_fp,
               settings=old.settings, corpus=old.corpus, stop=old.stop, ranges=old.ranges)
    reason = old.difference(new, config_defaults(cfg))
    if reason is not None:
        raise RunDirError(f"cannot resume: the interrupted scan used {reason}; start again with --overwrite")


def config_defaults(cfg: ScanConfig) -> dict[str, Any]:
    """The default of every option of ``cfg``'s class (as JSON values)."""
    return type(cfg).model_construct().model_dump(mode="json")


def _open_index(meta_dir: Path, plan: Plan, defaults: dict[str, Any], *,
                resumed: bool) -> tuple[dict[str, Any], bool]:
    """The index of this run and whether it continues an earlier one: the stored index when resuming (after
    comparing plans), else a new one."""
    path = meta_dir / INDEX
    if resumed and path.is_file():
        index = read_json(path)
        old = Plan.from_json(index["plan"])
        reason = old.difference(plan, defaults)
        if reason is not None:
            raise RunDirError(f"cannot resume: the interrupted scan used {reason}; start again with --overwrite")
        index["resumes"] = int(index.get("resumes", 0)) + 1
        return index, True
    index = {"version": 1, "run": uuid.uuid4().hex, "digest": plan.digest(), "plan": plan.to_json()}
    meta_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, index)
    return index, False


def _calibration(meta_dir: Path, worker: Any, index: dict[str, Any], resumed: bool) -> dict[int, dict[str, Any]]:
    """The calibration of this run: stored (resume) or computed once by one worker and stored."""
    path = meta_dir / CALIBRATION
    if resumed and path.is_file():
        blob = torch.load(path, weights_only=True)
        if blob.get("run") == index["run"]:
            return {int(k): v for k, v in blob["calibration"].items()}
    calibration = _get(worker.calibrate.remote())
    with atomic_path(path) as tmp:
        torch.save({"run": index["run"], "calibration": calibration}, tmp)
    return calibration


def _schedule(session: _Ray, new_worker: Callable[[], Any], todo: list[int], plan: Plan,
              calibration: dict[int, dict[str, Any]], store: ShardStore, record: dict[str, Any], bar: _Progress,
              index: dict[str, Any], meta_dir: Path, starts: list[Any],
              merge: _OrderedMerge) -> dict[int, dict[str, Any]]:
    """Hand the shards out to the workers (one at a time each) until all are scanned, merging them as they come
    (:class:`_OrderedMerge`); returns their records."""
    import ray

    queue = list(todo)
    attempts: dict[int, int] = {}
    running: dict[Any, tuple[int, int]] = {}  # task ref -> (shard, worker slot)
    idle = list(range(len(session.workers)))
    out: dict[int, dict[str, Any]] = {}
    stop = list(plan.stop) if plan.stop else None

    def submit(slot: int, shard: int) -> None:
        ref = session.workers[slot].scan.remote(shard, plan.ranges[shard], stop, calibration, store.location, record,
                                                starts[shard])
        running[ref] = (shard, slot)

    while queue or running:
        while queue and idle:
            submit(idle.pop(0), queue.pop(0))
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        for ref in ready:
            shard, slot = running.pop(ref)
            try:
                rec = _get(ref)
            except ray.exceptions.RayActorError as exc:
                attempts[shard] = attempts.get(shard, 0) + 1
                if attempts[shard] >= MAX_ATTEMPTS:
                    raise RunDirError(f"shard {shard} failed {attempts[shard]} times (its worker died: "
                                      f"{str(exc).splitlines()[0]}); rerun with --resume to continue") from None
                log.warning("worker of shard %d died; starting a new worker and retrying the shard", shard)
                session.workers[slot] = new_worker()
                queue.insert(0, shard)
                idle.append(slot)
                continue
            out[shard] = rec
            log.info("shard %d done: %s tokens in %.0f s on %s:%s (%d of %d this session)", shard,
                     f"{int(rec['tokens']):,}", float(rec["total_s"]), rec["host"], rec["pid"], len(out), len(todo))
            bar.done += int(rec["tokens"])
            index.setdefault("shards", {})[str(shard)] = {**_summary(rec), "session": index.get("resumes", 0)}
            write_json(meta_dir / INDEX, index)
            idle.append(slot)
            if queue:  # keep the workers busy first
                submit(idle.pop(0), queue.pop(0))
            merge.add(shard)
        bar.report()
    return out


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the index keeps of a shard's record."""
    keys = ("tokens", "windows", "documents", "scan_s", "total_s", "host", "pid", "peak_rss_mb")
    return {k: record[k] for k in keys if k in record}


class _OrderedMerge:
    """Merges finished shards in shard order: shard ``i`` is loaded, checked against the plan and pushed into the
    :class:`TreeMerge` once shards ``0 .. i-1`` are in, so the result (and its float rounding) is the same whatever
    order the shards finish in.

    ``eager``: merge while the other shards are still being scanned (little is left after the last one), else all
    at the end. A driver on a cluster merges eagerly; a driver sharing its machine with the workers (a local Ray)
    waits: merging would take cycles from workers whose torch threads fill every core (a preempted thread stalls
    the others at the next barrier), and the merge after the last shard costs about what it would have taken from
    them (~0.7 s a shard for the embedded model's 30 layers)."""

    def __init__(self, store: ShardStore, plan: Plan, index: dict[str, Any], shards: list[int],
                 build: Callable[[dict[str, Any]], ScanState] | None = None, *, eager: bool = True) -> None:
        self.store, self.plan, self.index, self.build, self.eager = store, plan, index, build, eager
        self.order = sorted(shards)  # every shard with windows
        self.ready: set[int] = set()
        self.at = 0
        self.tree = TreeMerge()
        self.seconds = 0.0

    def add(self, shard: int) -> None:
        """Shard ``shard`` is finished: merge it and any later ones now next in order (when eager)."""
        self.ready.add(shard)
        if self.eager:
            self._advance()

    def _advance(self) -> None:
        t = time.perf_counter()
        while self.at < len(self.order) and self.order[self.at] in self.ready:
            self.tree.push(self._load(self.order[self.at]))
            self.at += 1
        self.seconds += time.perf_counter() - t

    def result(self) -> ScanState | None:
        self._advance()
        if self.at < len(self.order):
            raise RunDirError(f"shard {self.order[self.at]} is missing from {self.store.location}")
        return self.tree.result()

    def _load(self, shard: int) -> ScanState:
        state, extra = self.store.load_state(shard, self.build)
        if extra.get("run") != self.index["run"] or extra.get("plan") != self.index["digest"]:
            raise RunDirError(f"shard {shard} in {self.store.location} belongs to another scan; start again with "
                              "--overwrite")
        if state.model_fp != self.plan.model_fp or state.settings != self.plan.settings:
            raise RunDirError(f"shard {shard} was scanned with other model weights or settings")
        if state.tokens != self.plan.tokens[shard]:
            raise RunDirError(f"shard {shard} counted {state.tokens:,} tokens, its plan {self.plan.tokens[shard]:,}: "
                              "the corpus changed during the scan; start again with --overwrite")
        return state


def _finish(cfg: ScanConfig, model: HookedModel | None, labeller: TokenLabeller | None, state: ScanState,
            plan: Plan, timings: dict[str, float], folder: RunFolder | None, store: ShardStore,
            write_manifest: bool, index: dict[str, Any], env: dict[str, str], n_workers: int) -> ScanResult:
    """Turn the merged state into the run folder, as the single-process scan does."""
    import ray

    from .models.loading import load_model
    from .results import ScanResult

    if model is None:  # loaded only now, after the workers are gone (for the tokenizer and the manifest)
        model = load_model(cfg.model, device="cpu", dtype=cfg.dtype)
    categories = list(labeller.categories) if labeller is not None else []
    bos = model.bos_token_id if cfg.prepend_bos else None
    env = {**env, "engine": f"ray {ray.__version__}: {n_workers} worker{'s' if n_workers > 1 else ''}, "
                            f"{plan.shards} shards"}
    result = ScanResult(model=model, config=cfg, state=state, categories=categories, bos_token_id=bos,
                        timings=timings, environment=env, skipped_documents=int(plan.corpus.get("skipped", 0)))
    if folder is None:
        return result
    t = time.perf_counter()
    result.write(folder.work)
    # stats.pt now holds the merged state: the shard states are no longer needed (a crash from here on costs a
    # rescan on --resume, never a wrong result); the index and the calibration stay as the record of the run
    store.remove()
    index["merged"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    index["timings"] = timings
    write_json(folder.work / SHARDS / INDEX, index)
    timings["write_s"] = time.perf_counter() - t
    timings["driver_peak_rss_mb"] = peak_rss_mb()
    result.folder = folder
    if write_manifest:
        folder.commit(result.manifest())
    return result
