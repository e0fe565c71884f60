"""The pieces of a sharded scan that need no Ray: shard plans, the shard store, merging, comparing runs.

* :func:`shard_ranges` cuts a scan's windows into contiguous runs of whole batches (a shard), so that every batch a
  worker runs is a batch of the single-process scan (bit-identical activations, see ``docs/scale.md``).
* :class:`Plan` is what all shards of one scan share (configuration, model fingerprint, corpus digest, max_tokens
  cut, window ranges); a resumed scan recomputes it and refuses to continue when anything differs.
* :class:`ShardStore` writes a finished shard's state and then its record, each atomically, to a folder or an fsspec
  URI (object storage); a shard counts as done only once its record exists.
* :class:`CountOnce` keeps a labeller's own counts (the hunt's label co-occurrence) from counting twice the text of a
  document that spans two shards.
* :func:`tree_merge` merges states in a fixed, balanced order; :func:`compare_runs` lists what differs between the
  tables of two runs (empty: the same scan).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.batches import TokenLabeller
from .io import read_json, write_json
from .stats.state import ScanState, dump_state, read_state_dict, save_state

__all__ = ["CountOnce", "Plan", "ShardStore", "TreeMerge", "compare_runs", "in_file", "peak_rss_mb", "shard_name",
           "shard_ranges", "tree_merge"]

SHARD_CODEC = "lz4"  # shard states are written once and read once: the faster codec (pack_tensors)


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
            save_state(state, self.root / f"{name}.pt", extra, codec=SHARD_CODEC)
            write_json(self.root / f"{name}.json", extra)
            return
        import io
        import json

        buf = io.BytesIO()
        dump_state(state, buf, extra, codec=SHARD_CODEC)
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

    def load_state(self, shard: int, build: Callable[[dict[str, Any]], Any] | None = None
                   ) -> tuple[ScanState, dict[str, Any]]:
        """A shard's state and record; ``build`` turns the stored state dict into the state (default:
        :meth:`ScanState.from_state_dict`; the held-out pass stores other states)."""
        name = f"{shard_name(shard)}.pt"
        if self.root is not None:
            state, extra = read_state_dict(self.root / name)
        else:
            import io

            fs, root = self._fs()
            with fs.open(f"{root}/{name}", "rb") as fh:
                state, extra = read_state_dict(io.BytesIO(fh.read()))
        return (build or ScanState.from_state_dict)(state), extra

    def remove(self, shards: list[int] | None = None) -> None:
        """Delete shard files of this store (all of them by default); nothing else is touched."""
        records = self.records()
        ids = sorted(records) if shards is None else shards
        if self.root is not None:
            for shard in ids:
                for suffix in (".json", ".pt"):  # the record first: a half-removed shard is not done
                    (self.root / f"{shard_name(shard)}{suffix}").unlink(missing_ok=True)
            if shards is None and self.root.is_dir() and not any(self.root.iterdir()):
                self.root.rmdir()  # (a run's own folder in a shared store)
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

    def difference(self, other: Plan, defaults: dict[str, Any] | None = None) -> str | None:
        """What differs from ``other`` (a one-line reason), or None. A configuration key only one side has (an
        option a newer version added) counts as equal when the other side's value is its default (``defaults``)."""
        missing = object()
        defaults = defaults or {}

        def value(config: dict[str, Any], key: str) -> Any:
            return config.get(key, defaults.get(key, missing))

        changed = sorted(k for k in set(self.config) | set(other.config)
                         if value(self.config, k) != value(other.config, k))
        if changed:
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


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (0 where the platform does not say)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return 0.0


def in_file(source: str, rel: str) -> bool:
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
class TreeMerge:
    """Merge states pairwise in a fixed tree over the order they are pushed in: ``((s0+s1)+(s2+s3))+...``, holding
    at most log2(n) + 1 states in memory (a binary counter). The order, not the arrival time, fixes the float
    rounding of the merged moments."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, ScanState]] = []
        self.count = 0

    def push(self, state: ScanState) -> None:
        level = 0
        while self.stack and self.stack[-1][0] == level:
            _, left = self.stack.pop()
            state = left.merge(state)
            level += 1
        self.stack.append((level, state))
        self.count += 1

    def result(self) -> ScanState | None:
        """The merge of everything pushed (None when nothing was)."""
        if not self.stack:
            return None
        _, out = self.stack.pop()
        while self.stack:
            _, left = self.stack.pop()
            out = left.merge(out)
        self.stack = [(0, out)]
        return out


def tree_merge(states: Iterator[ScanState]) -> ScanState | None:
    """:class:`TreeMerge` of ``states`` in their order."""
    tree = TreeMerge()
    for state in states:
        tree.push(state)
    return tree.result()


# ------------------------------------------------------------------------------------------------ comparing
EXACT_SUFFIXES = ("count", "max", "min", "activation", "hist_lo", "hist_hi")


def compare_runs(a: str | os.PathLike[str], b: str | os.PathLike[str], *, rtol: float = 1e-6) -> list[str]:
    """What differs between the tables of two scan runs (empty: the same scan), e.g. a Ray run and a local one.

    Counts, minima, maxima, histograms and every exemplar row must be equal; moments (mean, std, skew,
    kurtosis, fractions, position means) equal within ``rtol`` relative (plus 1e-9 absolute, for values near 0);
    so must the manifests' corpus fingerprint, tokens, windows and documents.
    """
    import pandas as pd

    from .io import read_table

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
