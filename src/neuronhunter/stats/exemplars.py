"""Exemplar windows per neuron: the top-k (and, on negated activations, bottom-k) windows, and quantile-band samples.

Both keep only ``(value, window id, position)`` per entry; the tokens of the windows they refer to are kept by the
scan state as long as some entry refers to them.

* :class:`TopK`: the ``k`` windows with the highest per-window maximum of each neuron. The bottom-k windows (most
  negative minimum) are a ``TopK`` over ``-activation``. Ties are broken by the smaller (global) window id, so the
  result is the same however windows were batched, sharded or merged.
* :class:`BandSamples`: top-k examples alone give narrow explanations (delphi, Neuronpedia show exemplars from the
  whole activation range). For each neuron and each *band* of the window's peak activation (fractions of a scale
  fixed before the scan, e.g. the neuron's maximum on calibration windows), it keeps ``r`` windows: those with the
  smallest value of a seeded hash of the window id. Every neuron sees the same random order of windows, so its
  sample of a band is a uniform random sample of the windows in that band; merging two shards (keep the ``r``
  smallest hashes) gives exactly the sample of the whole corpus, in any order; and because the order is shared,
  neurons tend to pick the same windows, which keeps the stored window tokens few.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import native as _native

HASH_EMPTY = np.iinfo(np.int64).max


def _best(values: Tensor, window: Tensor, k: int) -> Tensor:
    """Row indices of the ``k`` best entries of each column: highest value first, ties to the smaller window id
    (empty slots have window -1 and value -inf and sort last). ``values, window: [rows, d]``; returns ``[k, d]``."""
    w = torch.where(window < 0, torch.iinfo(torch.int64).max, window)
    by_window = w.T.contiguous().argsort(dim=1, stable=True)  # [d, rows], ascending window id
    vals = values.T.contiguous().gather(1, by_window)
    order = vals.argsort(dim=1, descending=True, stable=True)  # stable: equal values keep window order
    return by_window.gather(1, order[:, :k]).T.contiguous()


class TopK:
    """The ``k`` windows with the highest per-window maximum, per neuron.

    State: ``values [k, d]`` (descending), ``window [k, d]`` (global window ids, -1 = empty), ``pos [k, d]``
    (position of the maximum inside the window).
    """

    def __init__(self, d: int, k: int = 20) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        self.d, self.k = d, int(k)
        self.values = torch.full((k, d), float("-inf"))
        self.window = torch.full((k, d), -1, dtype=torch.long)
        self.pos = torch.zeros((k, d), dtype=torch.int32)

    def update(self, wmax: Tensor, wpos: Tensor, window_ids: Tensor, *, native: bool = False) -> None:
        """Merge per-window maxima ``wmax [windows, d]`` found at positions ``wpos [windows, d]``; a maximum that is
        -inf or NaN (no counted token) offers nothing. ``native``: by the loop of ``exemplars.c`` where it is built
        (the same result, tested)."""
        wmax = wmax.float().cpu()
        if native and _native.library() is not None:
            _native.topk_update(self.values, self.window, self.pos, wmax, wpos, window_ids)
            return
        wmax = torch.where(torch.isnan(wmax), float("-inf"), wmax)
        # only neurons with a window better than their current k-th enter the merge (once the top-k is full and
        # many windows have been seen, a small fraction of them). New windows have larger ids than held ones, so
        # a tie with the k-th never enters (the earlier window keeps it); merges compare ties by window id.
        better = (wmax > self.values[-1]).any(0)
        n = int(better.sum())
        if n == 0:
            return
        # a window without a counted token (peak -inf) is an empty slot
        ids = torch.where(wmax > float("-inf"), window_ids.view(-1, 1).cpu().to(torch.long), -1)
        if 2 * n > self.d:  # most neurons (the first batches): merging all of them is cheaper than selecting
            self._merge_rows(wmax, ids, wpos.cpu())
            return
        cols = torch.nonzero(better).view(-1)
        values = torch.cat([self.values[:, cols], wmax[:, cols]])
        window = torch.cat([self.window[:, cols], ids[:, cols]])
        idx = _best(values, window, self.k)
        self.window[:, cols] = window.gather(0, idx)
        self.pos[:, cols] = torch.cat([self.pos[:, cols], wpos.cpu()[:, cols].to(torch.int32)]).gather(0, idx)
        self.values[:, cols] = values.gather(0, idx)

    def merge(self, other: TopK) -> TopK:
        if (other.d, other.k) != (self.d, self.k):
            raise ValueError("cannot merge top-k lists of different sizes")
        self._merge_rows(other.values, other.window, other.pos)
        return self

    def _merge_rows(self, values: Tensor, window: Tensor, pos: Tensor) -> None:
        values = torch.cat([self.values, values.float()])
        window = torch.cat([self.window, window.to(torch.long)])
        idx = _best(values, window, self.k)
        self.window = window.gather(0, idx)
        self.pos = torch.cat([self.pos, pos.to(torch.int32)]).gather(0, idx)
        self.values = values.gather(0, idx)

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "k": self.k, "values": self.values, "window": self.window, "pos": self.pos}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TopK:
        obj = cls(state["d"], state["k"])
        obj.values, obj.window, obj.pos = state["values"].clone(), state["window"].clone(), state["pos"].clone()
        return obj


def window_hash(window_ids: Tensor | Sequence[int], seed: int = 0) -> Tensor:
    """A seeded pseudo-random, non-negative int64 per window id (splitmix64), the same in every process."""
    z = np.asarray(window_ids, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(1)).astype(np.int64))


class BandSamples:
    """Per neuron and band of the window peak, the ``r`` windows with the smallest seeded hash (module docstring).

    Bands: the peak ``p`` of a window (its maximum over counted tokens) falls in band ``b`` when
    ``edges[b] <= p / scale < edges[b + 1]`` with ``edges = (-inf, *fractions[1:], inf)``; ``fractions`` are the
    lower band edges as fractions of ``scale`` (per neuron), e.g. ``(0, 0.1, 0.3, 0.5, 0.7)``: band 0 holds windows
    where the neuron stays below a tenth of its scale (near-silent contexts, the hard negatives), band 4 the ones
    above 70%.

    State: ``hash, window [B, r, d]`` (int64; empty slots have hash ``HASH_EMPTY`` and window -1), ``pos [B, r, d]``
    and ``value [B, r, d]`` (the peak).
    """

    def __init__(self, d: int, scale: Tensor, fractions: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7), r: int = 3,
                 seed: int = 0) -> None:
        if r < 1 or len(fractions) < 1:
            raise ValueError("band samples need r >= 1 and at least one band")
        self.d, self.r, self.seed = d, int(r), int(seed)
        self.fractions = tuple(float(f) for f in fractions)
        self.scale = torch.as_tensor(scale, dtype=torch.float32).expand(d).clone()
        b = len(self.fractions)
        self.hash = torch.full((b, r, d), HASH_EMPTY, dtype=torch.int64)
        self.window = torch.full((b, r, d), -1, dtype=torch.int64)
        self.pos = torch.zeros((b, r, d), dtype=torch.int32)
        self.value = torch.full((b, r, d), float("nan"))

    @property
    def n_bands(self) -> int:
        return len(self.fractions)

    def band_of(self, peak: Tensor) -> Tensor:
        """Band index ``[..., d]`` of window peaks ``[..., d]``."""
        inner = torch.tensor(self.fractions[1:], dtype=torch.float32)
        rel = peak.float().cpu() / self.scale.clamp(min=1e-30)
        return torch.bucketize(rel.contiguous(), inner, right=True)

    def update(self, peak: Tensor, pos: Tensor, window_ids: Tensor, *, native: bool = False) -> None:
        """Offer windows with peaks ``peak [windows, d]`` at positions ``pos [windows, d]`` (a peak that is not
        finite, e.g. -inf for a window without a counted token, offers nothing). ``native``: by the loop of
        ``exemplars.c`` where it is built (the same result, tested)."""
        peak = peak.float().cpu()
        n = peak.shape[0]
        if n == 0:
            return
        h = window_hash(window_ids.cpu().tolist(), self.seed)  # [n]
        if native and _native.library() is not None:
            _native.bands_update(self.hash, self.window, self.pos, self.value, self.scale.clamp(min=1e-30),
                                 torch.tensor(self.fractions[1:], dtype=torch.float32), peak, pos, window_ids, h)
            return
        band = self.band_of(peak)  # [n, d]
        # a window enters a neuron's band only if its hash beats the band's r-th (HASH_EMPTY while the band is not
        # full); once the bands fill up, few (window, neuron) pairs do, so only their neurons are merged
        enter = torch.isfinite(peak) & (h.view(-1, 1) < self.hash[:, -1, :].gather(0, band))  # [n, d]
        hit = enter.any(0)
        if not bool(hit.any()):
            return
        cols = torch.nonzero(hit).view(-1)
        band, enter = band[:, cols], enter[:, cols]
        c = cols.numel()
        b_idx = torch.arange(self.n_bands).view(-1, 1, 1)
        mine = (band.unsqueeze(0) == b_idx) & enter.unsqueeze(0)  # [B, n, c]
        shape = (self.n_bands, n, c)
        self._merge(torch.where(mine, h.view(1, -1, 1), HASH_EMPTY),
                    window_ids.cpu().to(torch.int64).view(1, -1, 1).expand(shape),
                    pos.cpu()[:, cols].to(torch.int32).unsqueeze(0).expand(shape),
                    peak[:, cols].unsqueeze(0).expand(shape), cols)

    def _merge(self, hash_: Tensor, window: Tensor, pos: Tensor, value: Tensor, cols: Tensor | None = None) -> None:
        """Keep, per band and neuron (all, or the neurons ``cols``), the ``r`` smallest hashes of the held and the
        offered entries (``[B, m, d or len(cols)]``)."""
        def held(t: Tensor) -> Tensor:
            return t if cols is None else t[:, :, cols]

        hashes = torch.cat([held(self.hash), hash_], dim=1)
        # sort along the last dimension (contiguous), equal hashes only for the same window
        order = hashes.transpose(1, 2).contiguous().argsort(dim=2, stable=True)[:, :, : self.r].transpose(1, 2)
        new_hash = hashes.gather(1, order)
        new_window = torch.where(new_hash == HASH_EMPTY, -1, torch.cat([held(self.window), window], dim=1).gather(1, order))
        new_pos = torch.cat([held(self.pos), pos], dim=1).gather(1, order)
        new_value = torch.cat([held(self.value), value], dim=1).gather(1, order)
        if cols is None:
            self.hash, self.window, self.pos, self.value = new_hash, new_window, new_pos, new_value
        else:
            self.hash[:, :, cols], self.window[:, :, cols] = new_hash, new_window
            self.pos[:, :, cols], self.value[:, :, cols] = new_pos, new_value

    def same_bands(self, other: BandSamples) -> bool:
        return (other.d, other.r, other.seed, other.fractions) == (self.d, self.r, self.seed, self.fractions) and \
            torch.equal(other.scale, self.scale)

    def merge(self, other: BandSamples) -> BandSamples:
        if not self.same_bands(other):
            raise ValueError("cannot merge band samples with different bands, scales or seeds")
        self._merge(other.hash, other.window, other.pos, other.value)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "r": self.r, "seed": self.seed, "fractions": list(self.fractions), "scale": self.scale,
                "hash": self.hash, "window": self.window, "pos": self.pos, "value": self.value}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BandSamples:
        obj = cls(state["d"], state["scale"], state["fractions"], state["r"], state["seed"])
        for name in ("hash", "window", "pos", "value"):
            setattr(obj, name, state[name].clone())
        return obj
