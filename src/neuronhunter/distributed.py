"""The scan on Ray: document shards scanned by actors, each shard's state saved, then merged into one run.

A scan's statistics are mergeable accumulators (:mod:`neuronhunter.stats`), its windows carry global ids (the
document's place in the corpus and the window's place in the document, :func:`~neuronhunter.scan.window_key`) and
ties between exemplars go to the smaller id. So the corpus can be cut into shards, each shard scanned anywhere, in
any order, and the shards' states merged into exactly the state of one pass. This module does that on Ray::

    driver                                         Ray actors (one per worker; each loads the model once)
      check the run folder and the config
      start or join Ray, start the actors  ----->  check layers, context length; model fingerprint
      plan (once, on actor 0): every document's ----> token count; the max_tokens cut (document, tokens);
        tokens per shard; a digest of the corpus      shard of a document = BLAKE2b(document id) mod shards
      calibrate (once, on actor 0): each neuron's ---> range on the scan's first windows (the single-process
        histogram range and band scales                scan's calibration, shared by every shard)
      hand out shards, largest first  --------------> scan one shard (Scanner(shard=(i, n), stop=cut)), write
      record each finished shard in the index <------- shards/shard-000i.pt atomically, then its .json record
      all done: stop the actors; tree-merge the shard states in shard order (ScanState.merge); write the run

**Same tables as one process.** Counts, minima, maxima, histograms and exemplar windows are exactly those of the
single-process scan; float64 moments differ by rounding only (per-batch float32 sums of other batch mixes), far
below 1e-6 relative. The shard of a document depends only on its id and the number of shards, never on the number
of workers or which one finishes first; the merge order is fixed (shard order), so 1, 2 or 3 workers give
identical files.

**Resume.** The run folder's ``shards/index.json`` holds the plan (configuration, model fingerprint, corpus
digest, max_tokens cut, tokens per shard) and a run id; ``shards/calibration.pt`` the calibration. A shard is done
when its state and then its ``.json`` record (same run id) are in the shard store. ``--resume`` plans again, refuses
a changed configuration, model or corpus, and scans only the shards that are not done. A worker that dies (SIGKILL,
out of memory) is restarted by Ray and its shard retried (actor ``max_restarts``, ``max_task_retries``); a shard
whose worker died three times stops the scan with one line, and ``--resume`` continues it.

**Where shards live.** By default in the run folder (``<out>/shards``; on a cluster ``--out`` must then be a
shared filesystem path). ``shard_store`` may name another folder or an fsspec URI (``s3://bucket/scan``,
``gs://...``): states are written there with one atomic put (a temporary name, then a move). The driver reads
them back for the merge.

Reading: each shard streams the corpus and keeps its own documents (tokenising and running the model on them
only); for a many-file corpus every shard still lists and validates every file, which costs a small fraction of
the scan (see ``docs/scale.md``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
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
from .stats.layer import Calibration
from .stats.state import ScanState, dump_state, read_state, save_state

if TYPE_CHECKING:
    from .models.hooked import HookedModel
    from .results import ScanResult

log = logging.getLogger(__name__)

__all__ = ["CountOnce", "Plan", "ShardStore", "ShardWorker", "compare_runs", "run_distributed_scan", "shard_ranges",
           "tree_merge"]

SHARDS = "shards"  # the run folder's sub-folder (always holds the index and the calibration)
INDEX = "index.json"
CALIBRATION = "calibration.pt"
MAX_ATTEMPTS = 3  # a shard whose worker died this many times stops the scan (resume continues it)
POLL_S = 1.0  # how often the driver asks the workers how far they are


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


# ------------------------------------------------------------------------------------------------ shard store
class ShardStore:
    """Where shard states are written: a local folder (atomic rename) or an fsspec URI (one put, then a move).

    Files: ``shard-000ii.pt`` (the state, :func:`~neuronhunter.stats.state.save_state` format) and then
    ``shard-000ii.json`` (the shard's record); a shard counts as done only once its record exists.
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = str(location)
        self.location = text
        self.local = "://" not in text or text.startswith("file://")
        self.root = Path(text.removeprefix("file://")).expanduser() if self.local else None

    def __repr__(self) -> str:
        return f"ShardStore({self.location!r})"

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.location)
        return fs, path.rstrip("/")

    def put_state(self, shard: int, state: ScanState, extra: dict[str, Any]) -> None:
        """Write a shard's state, then its record (``extra`` must be JSON-able)."""
        name = shard_name(shard)
        if self.root is not None:
            save_state(state, self.root / f"{name}.pt", extra)
            write_json(self.root / f"{name}.json", extra)
            return
        import io
        import json

        buf = io.BytesIO()
        dump_state(state, buf, extra)
        self._put(f"{name}.pt", buf.getvalue())
        self._put(f"{name}.json", json.dumps(extra, indent=1).encode())

    def _put(self, name: str, data: bytes) -> None:
        fs, root = self._fs()
        fs.makedirs(root, exist_ok=True)
        tmp = f"{root}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, f"{root}/{name}")

    def records(self) -> dict[int, dict[str, Any]]:
        """The records of the finished shards in the store, by shard."""
        out: dict[int, dict[str, Any]] = {}
        if self.root is not None:
            if not self.root.is_dir():
                return out
            paths = [(p.name, p) for p in self.root.glob("shard-*.json")]
            for name, p in paths:
                if (self.root / name.replace(".json", ".pt")).is_file():
                    out[int(name[6:11])] = read_json(p)
            return out
        import json

        fs, root = self._fs()
        if not fs.exists(root):
            return out
        names = {Path(p).name for p in fs.ls(root, detail=False)}
        for name in names:
            if name.startswith("shard-") and name.endswith(".json") and name.replace(".json", ".pt") in names:
                with fs.open(f"{root}/{name}", "rb") as fh:
                    out[int(name[6:11])] = json.loads(fh.read())
        return out

    def load_state(self, shard: int) -> tuple[ScanState, dict[str, Any]]:
        from .stats.state import load_state

        name = f"{shard_name(shard)}.pt"
        if self.root is not None:
            return load_state(self.root / name)
        import io

        fs, root = self._fs()
        with fs.open(f"{root}/{name}", "rb") as fh:
            return read_state(io.BytesIO(fh.read()))

    def remove(self, shards: list[int] | None = None) -> None:
        """Delete shard files of this store (all of them by default); nothing else is touched."""
        records = self.records()
        ids = sorted(records) if shards is None else shards
        if self.root is not None:
            for shard in ids:
                for suffix in (".json", ".pt"):  # the record first: a half-removed shard is not done
                    (self.root / f"{shard_name(shard)}{suffix}").unlink(missing_ok=True)
            return
        fs, root = self._fs()
        for shard in ids:
            for suffix in (".json", ".pt"):
                path = f"{root}/{shard_name(shard)}{suffix}"
                if fs.exists(path):
                    fs.rm(path)


# ------------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """What every shard of one scan shares (recorded in ``shards/index.json``; resume recomputes and compares it).

    Attributes:
        shards: the number of shards.
        config: the scan's resume key (:func:`~neuronhunter.scan.resume_key`).
        model_fp, settings: the model's weight fingerprint and the merge settings digest.
        corpus: ``documents`` (read), ``skipped``, ``tokens`` and ``digest`` (BLAKE2b of every read document's id,
            source, token count and text).
        stop: the max_tokens cut ``(document id, tokens of it)``, or None when the scan reads the whole corpus.
        ranges: one :class:`ShardRange` per shard (as dicts).
    """

    shards: int
    config: dict[str, Any]
    model_fp: str
    settings: str
    corpus: dict[str, Any]
    stop: tuple[int, int] | None
    ranges: list[dict[str, int]]

    @property
    def tokens(self) -> list[int]:
        """Planned tokens per shard."""
        return [int(r["tokens"]) for r in self.ranges]

    def to_json(self) -> dict[str, Any]:
        return {"shards": self.shards, "config": self.config, "model_fp": self.model_fp, "settings": self.settings,
                "corpus": self.corpus, "stop": list(self.stop) if self.stop else None, "ranges": self.ranges}

    def digest(self) -> str:
        from .stats.state import settings_digest

        return settings_digest(self.to_json())

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        stop = data.get("stop")
        return cls(shards=int(data["shards"]), config=data["config"], model_fp=data["model_fp"],
                   settings=data["settings"], corpus=data["corpus"], stop=tuple(stop) if stop else None,
                   ranges=[{k: int(v) for k, v in r.items()} for r in data["ranges"]])

    def difference(self, other: Plan) -> str | None:
        """What differs from ``other`` (a one-line reason), or None."""
        if self.config != other.config:
            changed = sorted(k for k in set(self.config) | set(other.config)
                             if self.config.get(k) != other.config.get(k))
            return f"a different configuration ({', '.join(changed)})"
        if self.shards != other.shards:
            return f"a different number of shards ({other.shards} vs {self.shards})"
        if self.model_fp != other.model_fp:
            return "different model weights"
        if self.settings != other.settings or self.stop != other.stop or self.ranges != other.ranges \
                or self.corpus != other.corpus:
            return "a different corpus (its documents or their tokens changed)"
        return None


def shard_ranges(docs: list[tuple[int, int, int]], *, shards: int, batch_size: int, step: int) -> list[dict[str, int]]:
    """Cut the scan's windows into ``shards`` contiguous ranges of whole batches (as even as batches allow).

    Args:
        docs: ``(document id, tokens read, tokens in the document)`` of every document the scan reads, in order.
        batch_size: windows per batch; ``step``: real tokens per full window.

    Returns:
        per shard: ``doc`` (the document of its first window), ``skip`` (that window's index in the document),
        ``windows``, ``tokens`` (real tokens read) and ``doc_tokens`` (all tokens of its first document); an empty
        shard has ``windows == 0``.
    """
    n_windows = [(n + step - 1) // step for _, n, _ in docs]
    total = sum(n_windows)
    n_batches = (total + batch_size - 1) // batch_size
    starts = [min(k * n_batches // shards * batch_size, total) for k in range(shards + 1)]
    starts[-1] = total
    out: list[dict[str, int]] = []
    d = 0  # current document, and the global index of its first window
    offset = 0
    for k in range(shards):
        g0, g1 = starts[k], starts[k + 1]
        if g1 <= g0:
            out.append({"doc": -1, "skip": 0, "windows": 0, "tokens": 0, "doc_tokens": 0})
            continue
        while offset + n_windows[d] <= g0:  # the document holding window g0
            offset += n_windows[d]
            d += 1
        first, skip = docs[d][0], g0 - offset
        tokens, i, off, g = 0, d, offset, g0
        while g < g1:  # tokens of windows g..g1-1: per document, the tokens from window a to window b
            a, b = g - off, min(g1 - off, n_windows[i])
            tokens += min(b * step, docs[i][1]) - a * step
            g += b - a
            if b == n_windows[i]:
                off += n_windows[i]
                i += 1
        out.append({"doc": first, "skip": skip, "windows": g1 - g0, "tokens": tokens, "doc_tokens": docs[d][2]})
    return out


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

        self.current: tuple[int, int] = (-1, 0)  # (shard, tokens done) while a shard is scanned
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
            if names and (at < 0 or not _in_file(doc.source, names[at])):
                at += 1
                while at < len(names) and not _in_file(doc.source, names[at]):
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

    def progress(self) -> tuple[int, int]:
        """``(shard, tokens done)`` of the shard being scanned (``(-1, 0)`` between shards)."""
        return self.current

    def scan(self, shard: int, span: dict[str, int], stop: list[int] | None,
             calibration: dict[int, dict[str, Any]], store: str, record: dict[str, Any],
             start: list[Any] | None = None) -> dict[str, Any]:
        """Scan one shard (its window range ``span``, see :func:`shard_ranges`; ``start``: the file of a many-file
        corpus to start reading at, and its first document's id) and write its state (then its record) to
        ``store``; returns the record."""
        from .data.corpus import Corpus
        from .scan import Scanner

        t0 = time.perf_counter()
        labeller = self.labeller
        counts = getattr(labeller, "cooccurrence", None)  # a labeller's own mergeable counts (the hunt's)
        if labeller is not None and isinstance(counts, np.ndarray):
            counts = labeller.cooccurrence = np.zeros_like(counts)  # (what Ray handed over is read-only)
            step = self.cfg.context_length - (1 if self.scanner.bos is not None else 0)
            labeller = CountOnce(labeller, skip=span["skip"] * step, first=span["doc_tokens"])
        sc = Scanner(self.model, self.cfg, labeller, window_range=(span["doc"], span["skip"], span["windows"]),
                     stop=tuple(stop) if stop else None)
        sc._model_fp = self.scanner.model_fp
        if start is not None:
            sc.corpus = Corpus(self.cfg.corpus, text_field=self.cfg.text_field, on_error=self.cfg.on_bad_document,  # type: ignore[arg-type]
                               start=(str(start[0]), int(start[1])))
        cal = {int(k): Calibration.from_state_dict(v) for k, v in calibration.items()}
        state = sc.new_state(cal)
        self.current = (shard, 0)
        t1 = time.perf_counter()
        for _ in sc.steps(state):
            self.current = (shard, state.tokens)
        scan_s = time.perf_counter() - t1
        self.current = (-1, 0)
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


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (0 where the platform does not say)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return 0.0


def _in_file(source: str, rel: str) -> bool:
    """Whether a document's source (``rel``, ``rel:line`` or ``rel#row``) is in the file ``rel``."""
    return source == rel or (source.startswith(rel) and source[len(rel):len(rel) + 1] in (":", "#"))


class CountOnce:
    """A labeller wrapper for a shard whose first document began in an earlier shard: the wrapped labeller's own
    counts (``cooccurrence``, the hunt's) then skip the blocks of text the earlier shard labelled, so that every
    block is counted once, as in one pass.

    The shard tokenises (and labels) its first document from the start, block by block, to find its first window;
    the earlier shard labelled every block that starts before that window's first token. ``skip`` is that token's
    index, ``first`` the first document's token count.
    """

    def __init__(self, inner: TokenLabeller, *, skip: int, first: int) -> None:
        self.inner, self.skip, self.first, self.pos = inner, skip, first, 0
        self.categories = inner.categories

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        counts = self.inner.cooccurrence  # type: ignore[attr-defined]
        saved = counts.copy() if self.pos < min(self.skip, self.first) else None
        labels = self.inner.label(text, offsets)
        if saved is not None:
            counts[...] = saved
        self.pos += len(offsets)
        return labels


# ----------------------------------------------------------------------------------------------------- merge
def tree_merge(states: Iterator[ScanState]) -> ScanState | None:
    """Merge states pairwise in a fixed tree over their order: ``((s0+s1)+(s2+s3))+...``, holding at most
    log2(n) + 1 states in memory (a binary counter). The order, not the arrival time, fixes the float rounding."""
    stack: list[tuple[int, ScanState]] = []
    for state in states:
        level = 0
        while stack and stack[-1][0] == level:
            _, left = stack.pop()
            state = left.merge(state)
            level += 1
        stack.append((level, state))
    if not stack:
        return None
    _, out = stack.pop()
    while stack:
        _, left = stack.pop()
        out = left.merge(out)
    return out


# ------------------------------------------------------------------------------------------------ comparing
EXACT_SUFFIXES = ("count", "max", "min", "activation", "hist_lo", "hist_hi")


def compare_runs(a: str | os.PathLike[str], b: str | os.PathLike[str], *, rtol: float = 1e-6) -> list[str]:
    """What differs between the tables of two scan runs (empty: the same scan), e.g. a Ray run and a local one.

    Counts, minima, maxima, histograms and every exemplar row must be equal; moments (mean, std, skew,
    kurtosis, fractions, position means) equal within ``rtol`` relative (plus 1e-9 absolute, for values near 0);
    so must the manifests' corpus fingerprint, tokens, windows and documents.
    """
    import pandas as pd

    from .io import read_json, read_table

    a, b = Path(a), Path(b)
    out: list[str] = []
    ma, mb = read_json(a / "manifest.json"), read_json(b / "manifest.json")
    for key in ("tokens", "windows", "layers", "neurons_per_layer"):
        if ma.get(key) != mb.get(key):
            out.append(f"manifest {key}: {ma.get(key)} vs {mb.get(key)}")
    for key in ("fingerprint", "documents", "tokens", "skipped_documents"):
        if ma["corpus"].get(key) != mb["corpus"].get(key):
            out.append(f"manifest corpus.{key}: {ma['corpus'].get(key)} vs {mb['corpus'].get(key)}")
    for table in ("neurons", "examples", "concepts"):
        pa, pb = a / f"{table}.parquet", b / f"{table}.parquet"
        if not pa.exists() and not pb.exists():
            continue
        if pa.exists() != pb.exists():
            out.append(f"{table}: only in {'the first' if pa.exists() else 'the second'} run")
            continue
        x, y = read_table(pa), read_table(pb)
        if list(x.columns) != list(y.columns) or len(x) != len(y):
            out.append(f"{table}: columns or rows differ ({x.shape} vs {y.shape})")
            continue
        for col in x.columns:
            u, v = x[col], y[col]
            if col == "hist":
                same = all(np.array_equal(p, q) for p, q in zip(u, v, strict=True))
            elif pd.api.types.is_float_dtype(u) and not col.endswith(EXACT_SUFFIXES) and table != "examples":
                same = bool(np.isclose(u.to_numpy(), v.to_numpy(), rtol=rtol, atol=1e-9, equal_nan=True).all())
            else:
                try:
                    same = bool(((u == v) | (u.isna() & v.isna())).all())
                except (TypeError, ValueError):  # (list-like cells)
                    same = [str(t) for t in u] == [str(t) for t in v]
            if not same:
                out.append(f"{table}.{col} differs")
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
    """Tokens done: finished shards plus what the workers report of the shards they scan."""

    def __init__(self, fn: Callable[[int, int | None], None] | None, total: int) -> None:
        self.fn, self.total, self.done, self.running = fn, total, 0, {}

    def report(self) -> None:
        if self.fn is not None:
            self.fn(self.done + sum(self.running.values()), self.total)


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
    ray = _require_ray()
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
        n_workers, cpus, gpus = worker_layout(cfg)
        actor = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=MAX_ATTEMPTS,
                                                max_task_retries=MAX_ATTEMPTS, max_concurrency=2)
        model_ref = ray.put(model) if model is not None else None
        threads = None if gpus else max(1, int(cpus))

        def new_worker() -> Any:
            return actor.remote(cfg, model_ref, labeller, threads)

        session.workers = [new_worker() for _ in range(n_workers)]
        infos = [_get(w.describe.remote()) for w in session.workers]  # model checks fail here, before any write
        if len({i["model_fp"] for i in infos}) > 1:
            raise RunDirError("the workers loaded different model weights (is the model the same on every node?)")
        timings["load_s"] = time.perf_counter() - t0
        from .scan import resume_key

        work = folder.begin(overwrite=overwrite, resume=resume) if folder is not None else \
            Path(tmp := tempfile.mkdtemp(prefix="neuronhunter-shards-"))
        created = folder is not None and not folder.resumed
        if folder is not None and folder.resumed and (work / CHECKPOINT).exists():
            raise RunDirError("the interrupted scan ran in one process (--engine local); resume it without "
                              "--engine ray, or start again with --overwrite")
        meta_dir = work / SHARDS
        store = ShardStore(cfg.shard_store if cfg.shard_store else meta_dir)
        t1 = time.perf_counter()
        planned = _get(session.workers[0].plan.remote(cfg.shards))
        plan = Plan(shards=cfg.shards, config=resume_key(cfg) | {"engine": "ray"}, model_fp=infos[0]["model_fp"],
                    settings=infos[0]["settings"], corpus=planned["corpus"],
                    stop=tuple(planned["stop"]) if planned["stop"] else None, ranges=planned["ranges"])
        index, resumed = _open_index(meta_dir, plan, resumed=folder is not None and folder.resumed)
        if not resumed:
            store.remove()  # a fresh run: shards left in the store by an earlier run are not this run's
        calibration = _calibration(meta_dir, session.workers[0], index, resumed)
        timings["plan_s"] = time.perf_counter() - t1
        record = {"run": index["run"], "plan": index["digest"]}
        done = {s: r for s, r in store.records().items()
                if r.get("run") == index["run"] and r.get("plan") == index["digest"]}
        for shard, rec in done.items():  # (a driver killed after a shard's record, before the index was updated)
            index.setdefault("shards", {}).setdefault(str(shard), _summary(rec))
        todo = [s for s in range(plan.shards) if s not in done and plan.ranges[s]["windows"] > 0]
        todo.sort(key=lambda s: (-plan.tokens[s], s))  # largest first: the last shards to finish are short
        log.info("Ray scan: %d shards (%d done, %d to scan, %d empty) on %d workers", plan.shards, len(done),
                 len(todo), plan.shards - len(done) - len(todo), n_workers)
        index["workers"] = [{"host": i["host"], "pid": i["pid"], "threads": i["threads"], "device": i["device"]}
                            for i in infos]
        index["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        starts = index["starts"] = planned.get("starts") or [None] * plan.shards
        write_json(meta_dir / INDEX, index)
        bar = _Progress(progress, sum(plan.tokens))
        bar.done = sum(int(r["tokens"]) for r in done.values())
        t2 = time.perf_counter()
        scanned = _schedule(session, new_worker, todo, plan, calibration, store, record, bar, index, meta_dir,
                            starts)
        timings["scan_s"] = time.perf_counter() - t2
        session.shutdown()  # free the workers' memory before the merge
        done.update(scanned)
        t3 = time.perf_counter()
        state = _merge(store, plan, index, sorted(done))
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
    reason = old.difference(new)
    if reason is not None:
        raise RunDirError(f"cannot resume: the interrupted scan used {reason}; start again with --overwrite")


def _open_index(meta_dir: Path, plan: Plan, *, resumed: bool) -> tuple[dict[str, Any], bool]:
    """The index of this run and whether it continues an earlier one: the stored index when resuming (after
    comparing plans), else a new one."""
    path = meta_dir / INDEX
    if resumed and path.is_file():
        index = read_json(path)
        old = Plan.from_json(index["plan"])
        reason = old.difference(plan)
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
              index: dict[str, Any], meta_dir: Path, starts: list[Any]) -> dict[int, dict[str, Any]]:
    """Hand the shards out to the workers (one at a time each) until all are scanned; returns their records."""
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

    last_poll = 0.0
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
            bar.running.pop(slot, None)
            index.setdefault("shards", {})[str(shard)] = {**_summary(rec), "session": index.get("resumes", 0)}
            write_json(meta_dir / INDEX, index)
            idle.append(slot)
        now = time.perf_counter()
        if running and now - last_poll >= POLL_S:
            last_poll = now
            slots = {slot for _, slot in running.values()}
            refs = {slot: session.workers[slot].progress.remote() for slot in slots}
            for slot, ref in refs.items():
                try:
                    _, tokens = ray.get(ref, timeout=POLL_S)
                    bar.running[slot] = int(tokens)
                except Exception:  # noqa: BLE001 - a worker restarting or busy: keep its last figure
                    pass
        bar.report()
    return out


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the index keeps of a shard's record."""
    keys = ("tokens", "windows", "documents", "scan_s", "total_s", "host", "pid", "peak_rss_mb")
    return {k: record[k] for k in keys if k in record}


def _merge(store: ShardStore, plan: Plan, index: dict[str, Any], shards: list[int]) -> ScanState | None:
    """Load the finished shards in shard order and tree-merge them (each checked against the plan first)."""

    def states() -> Iterator[ScanState]:
        for shard in shards:
            state, extra = store.load_state(shard)
            if extra.get("run") != index["run"] or extra.get("plan") != index["digest"]:
                raise RunDirError(f"shard {shard} in {store.location} belongs to another scan; start again with "
                                  "--overwrite")
            if state.model_fp != plan.model_fp or state.settings != plan.settings:
                raise RunDirError(f"shard {shard} was scanned with other model weights or settings")
            if state.tokens != plan.tokens[shard]:
                raise RunDirError(f"shard {shard} counted {state.tokens:,} tokens, its plan {plan.tokens[shard]:,}: "
                                  "the corpus changed during the scan; start again with --overwrite")
            yield state

    return tree_merge(states())


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
