"""``ScanState``: everything a scan accumulates, mergeable, with the fingerprints of what it read.

A state holds one :class:`~neuronhunter.stats.layer.LayerStats` per scanned layer, the token ids of the windows
some top-k (or other exemplar) refers to, counters, and three fingerprints:

* **corpus fingerprint**: the sum, modulo 2**256, of a BLAKE2b digest of every window the scan read (its
  document's source, its start and its token ids). A sum does not depend on the order windows arrive in, so the
  fingerprint of two merged shards is the merge of their fingerprints, and a resumed scan can check that the
  windows it skips are those the interrupted scan read. It records *what was actually read*: the tokens and
  documents the scan counted, also when ``max_tokens`` stopped it early.
* **model fingerprint**: :func:`model_fingerprint`, a digest of every parameter's name, shape, dtype and bytes.
* **settings**: a digest of the configuration that must agree for two states to be merged (layers, neurons,
  statistics, context length, BOS, corpus options).

:meth:`ScanState.merge` refuses states that disagree on any of these, whose window ids overlap, or whose
statistics were accumulated with different thresholds or histogram bins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RunDirError
from ..io import atomic_path
from .layer import LayerStats

FINGERPRINT_MOD = 1 << 256


@dataclass
class StoredWindow:
    """The tokens of a window an exemplar refers to; ``labels`` holds one concept bit mask per token (bit ``c`` for
    category ``c``, bit ``C`` for "unlabelled", see :func:`~neuronhunter.stats.concepts.label_bits`) when the scan
    labels tokens."""

    doc_id: int
    start: int
    ids: list[int]
    source: str
    labels: list[int] | None = None


def window_digest(source: str, start: int, ids: list[int]) -> int:
    """BLAKE2b-256 of one window (its document's source, start and token ids) as an integer."""
    h = hashlib.blake2b(digest_size=32)
    h.update(source.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(int(start).to_bytes(8, "little", signed=True))
    h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def model_fingerprint(model: torch.nn.Module) -> str:
    """BLAKE2b-256 of every parameter and buffer (name, shape, dtype, bytes), in the module's order.

    Reads the weights once (about half a second per 100M fp32 parameters); tied weights are hashed once.
    """
    h = hashlib.blake2b(digest_size=32)
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        t = tensor.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    """A short digest of a JSON-able mapping (sorted keys)."""
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


@dataclass
class ScanState:
    """Everything a scan accumulates: per-layer statistics, referenced windows, counters and fingerprints.

    Attributes:
        layers: one :class:`LayerStats` per scanned layer.
        windows: token ids of the windows the exemplars refer to (pruned as exemplars change).
        batches_done, tokens, n_windows, documents: counters (tokens counted exclude a prepended BOS).
        corpus_fp: the corpus fingerprint (see the module docstring), an integer below 2**256.
        model_fp, settings: digests the merge and resume compare (None when unknown).
    """

    layers: dict[int, LayerStats]
    windows: dict[int, StoredWindow] = field(default_factory=dict)
    batches_done: int = 0
    tokens: int = 0
    n_windows: int = 0
    documents: int = 0
    corpus_fp: int = 0
    model_fp: str | None = None
    settings: str | None = None

    @property
    def corpus_fingerprint(self) -> str:
        return f"{self.corpus_fp:064x}"

    def add_window(self, source: str, start: int, ids: list[int]) -> None:
        """Count a window read into the corpus fingerprint (and its document, at the document's first window)."""
        self.corpus_fp = (self.corpus_fp + window_digest(source, start, ids)) % FINGERPRINT_MOD
        self.documents += start == 0

    def referenced_windows(self) -> set[int]:
        """Ids of the windows some exemplar of some layer refers to (one sort over all of them)."""
        parts = [ls.window_tensors() for ls in self.layers.values()]
        flat = torch.cat([t.reshape(-1) for group in parts for t in group]) if parts else torch.empty(0, dtype=torch.long)
        return set(torch.unique(flat[flat >= 0]).tolist())

    def prune_windows(self) -> None:
        """Forget the tokens of windows no exemplar refers to any more."""
        keep = self.referenced_windows()
        self.windows = {w: v for w, v in self.windows.items() if w in keep}

    def check_mergeable(self, other: ScanState) -> None:
        """Raise a one-line :class:`RunDirError` naming the first thing two states disagree on."""
        if set(self.layers) != set(other.layers):
            raise RunDirError(f"cannot merge scans of different layers ({sorted(self.layers)} vs {sorted(other.layers)})")
        for name, what in (("model_fp", "model weights"), ("settings", "settings")):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                raise RunDirError(f"cannot merge scans with different {what}")
        for layer, ls in self.layers.items():
            ls.check_mergeable(other.layers[layer])
        # a state stores every window its exemplars refer to (a scan stores each window it reads, then prunes the
        # unreferenced ones), so overlapping windows show in the stored ones
        overlap = self.windows.keys() & other.windows.keys()
        if overlap:
            raise RunDirError(f"cannot merge scans whose window ids overlap (e.g. window {min(overlap)}); "
                              "shards must number their windows globally")

    def merge(self, other: ScanState) -> ScanState:
        """Merge another shard of the same scan (checked by :meth:`check_mergeable` first)."""
        self.check_mergeable(other)
        for layer, ls in self.layers.items():
            ls.merge(other.layers[layer])
        self.windows.update(other.windows)
        self.batches_done += other.batches_done
        self.tokens += other.tokens
        self.n_windows += other.n_windows
        self.documents += other.documents
        self.corpus_fp = (self.corpus_fp + other.corpus_fp) % FINGERPRINT_MOD
        self.model_fp = self.model_fp or other.model_fp
        self.settings = self.settings or other.settings
        self.prune_windows()
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {layer: ls.state_dict() for layer, ls in self.layers.items()},
            "windows": {w: [v.doc_id, v.start, v.ids, v.source, v.labels] for w, v in self.windows.items()},
            "batches_done": self.batches_done, "tokens": self.tokens, "n_windows": self.n_windows,
            "documents": self.documents, "corpus_fp": self.corpus_fingerprint, "model_fp": self.model_fp,
            "settings": self.settings,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ScanState:
        return cls(
            layers={int(k): LayerStats.from_state_dict(v) for k, v in state["layers"].items()},
            windows={int(w): StoredWindow(*v) for w, v in state["windows"].items()},
            batches_done=state["batches_done"], tokens=state["tokens"], n_windows=state["n_windows"],
            documents=int(state.get("documents", 0)), corpus_fp=int(state.get("corpus_fp", "0"), 16),
            model_fp=state.get("model_fp"), settings=state.get("settings"),
        )


PACKED = "__zstd__"  # marks a tensor stored compressed by :func:`pack_tensors` (whatever its codec)
PACK_MIN_BYTES = 1 << 16
CODECS = ("zstd", "lz4")


def pack_tensors(obj: Any, codec: str = "zstd") -> Any:
    """``obj`` with every tensor of at least 64 KiB replaced by its compressed bytes (lossless).

    The big accumulators (per-category histograms, bin counts, exemplar ids) are mostly zeros and small integers:
    compressed they take several times less disk (a default hunt's ``stats.pt``: 286 MB -> 85 MB). The result still
    loads with ``torch.load(weights_only=True)``; :func:`unpack_tensors` restores the tensors bit for bit.
    ``codec``: ``zstd`` (smaller; a run's ``stats.pt``) or ``lz4`` (about twice as fast both ways, a third larger:
    the states a scan writes only to read them back, checkpoints and Ray shards).
    """
    if isinstance(obj, torch.Tensor):
        if obj.numel() * obj.element_size() < PACK_MIN_BYTES or obj.dtype not in _PACKABLE:
            return obj
        import pyarrow as pa

        raw = obj.detach().cpu().contiguous().numpy().tobytes()
        data = pa.compress(raw, codec=codec, asbytes=True)
        out = {PACKED: str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape), "size": len(raw),
               "data": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
        if codec != "zstd":  # (states written before the codec was recorded are zstd)
            out["codec"] = codec
        return out
    if isinstance(obj, dict):
        return {k: pack_tensors(v, codec) for k, v in obj.items()}
    if isinstance(obj, list):
        return [pack_tensors(v, codec) for v in obj]
    return obj


def unpack_tensors(obj: Any) -> Any:
    """The inverse of :func:`pack_tensors` (objects without packed tensors pass through unchanged)."""
    if isinstance(obj, dict):
        if PACKED in obj:
            import pyarrow as pa

            raw = pa.decompress(obj["data"].numpy().tobytes(), decompressed_size=int(obj["size"]),
                                codec=str(obj.get("codec", "zstd")),
                                asbytes=True)
            dtype = getattr(torch, obj[PACKED])
            return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(obj["shape"]).clone()
        return {k: unpack_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_tensors(v) for v in obj]
    return obj


_PACKABLE = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64}


def dump_state(state: ScanState, fh: Any, extra: dict[str, Any] | None = None, codec: str = "zstd") -> None:
    """Write a state (and JSON-able ``extra``) to a path or binary file object, big tensors compressed
    (:func:`pack_tensors` with ``codec``). Not atomic by itself: :func:`save_state` is."""
    torch.save({"state": pack_tensors(state.state_dict(), codec), **(extra or {})}, fh)


def read_state_dict(fh: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict (tensors unpacked) and ``extra`` that :func:`dump_state` wrote (or an older run's bare
    ``stats.pt``), from a path or a binary file object."""
    blob = torch.load(fh, weights_only=True)
    if "state" not in blob:  # older runs' stats.pt held the state dict itself
        return unpack_tensors(blob), {}
    return unpack_tensors(blob.pop("state")), blob


def read_state(fh: Any) -> tuple[ScanState, dict[str, Any]]:
    """Read what :func:`dump_state` wrote (or an older run's ``stats.pt``, the bare state dict) from a path or a
    binary file object; returns ``(state, extra)``."""
    state, extra = read_state_dict(fh)
    return ScanState.from_state_dict(state), extra


def save_state(state: ScanState, path: Path, extra: dict[str, Any] | None = None, codec: str = "zstd") -> None:
    """Write a state (and JSON-able ``extra``) atomically (a checkpoint, a shard or a run's ``stats.pt``)."""
    with atomic_path(path) as tmp:
        dump_state(state, tmp, extra, codec)


def load_state(path: Path) -> tuple[ScanState, dict[str, Any]]:
    """Read a state written by :func:`save_state` (a checkpoint, a shard or a run's ``stats.pt``)."""
    return read_state(path)
