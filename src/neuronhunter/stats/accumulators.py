"""Mergeable streaming statistics for every neuron of a layer at once.

Each accumulator has ``update(...)`` (one batch), ``merge(other)`` (combine two shards), ``state_dict()`` and
``from_state_dict()`` (checkpoint/resume). Merging two halves of a corpus gives the same result as one pass over
all of it (up to float rounding), which is what makes resume and multi-machine scans nearly free.

Each also has a method that adds per-batch quantities computed elsewhere (``Moments.add``,
``Histogram.add_bins``, ``PositionStats.add``): the scan computes them for all its statistics at once in one fused
reduction (:mod:`neuronhunter.stats.kernels`), and ``update`` here is the plain version of the same arithmetic.

Shapes (for ``x: [tokens, d]``, the activations of the tokens that count):

* moments: ``x.sum(0)`` and power sums of ``x*x`` reduced per batch in float32, accumulated in float64;
* fraction active: ``(x > threshold).sum(0)``;
* histogram of every neuron at once: bin index ``floor((x - lo) / width)`` clamped to under/overflow bins, then
  one ``bincount`` over ``bin + (n_bins + 2) * neuron`` (no loop over neurons); on CPU the scan counts with the
  native loop of :mod:`~neuronhunter.stats.native` instead (``add_masked``), with identical counts;
* per-category sums: ``labels.T @ x`` (``[categories, d]``) in one matmul, plus label counts;
* top-k windows: each window is reduced to its maximum first (``[windows, d]``), then, for the neurons where some
  window beats the current k-th, merged with the running top-k by one ``topk`` over the concatenation; only
  (value, window id, position) is kept.

No Python loop runs over neurons; memory depends on ``d``, ``k``, bins and categories, never on the token count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import native as _native
from .kernels import bin_index

F64 = torch.float64


def _rows(t: Tensor) -> tuple[int, ...]:
    """The leading dims of ``t`` (every dim but the last, the neuron dim): what statistics reduce over."""
    return tuple(range(t.ndim - 1))


def _n_rows(t: Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


class Moments:
    """Count, power sums (for mean, std, skewness, kurtosis), min, max, and the count above a threshold."""

    def __init__(self, d: int, threshold: float = 0.0) -> None:
        self.d = d
        self.threshold = float(threshold)
        self.count = 0
        self.s1 = torch.zeros(d, dtype=F64)
        self.s2 = torch.zeros(d, dtype=F64)
        self.s3 = torch.zeros(d, dtype=F64)
        self.s4 = torch.zeros(d, dtype=F64)
        self.min = torch.full((d,), float("inf"))
        self.max = torch.full((d,), float("-inf"))
        self.active = torch.zeros(d, dtype=torch.long)

    def update(self, x: Tensor) -> None:
        """Add a batch ``x: [..., d]`` (any leading dims are tokens)."""
        dims = _rows(x)
        x2 = x * x
        self.add(_n_rows(x), x.sum(dims), x2.sum(dims), (x2 * x).sum(dims), (x2 * x2).sum(dims),
                 x.amin(dims), x.amax(dims), (x > self.threshold).sum(dims))

    def add(self, n: int, s1: Tensor, s2: Tensor, s3: Tensor, s4: Tensor, vmin: Tensor, vmax: Tensor,
            active: Tensor) -> None:
        """Add ``n`` tokens summarised by their power sums, extremes and count above the threshold (``[d]`` each)."""
        if n <= 0:
            return
        self.count += n
        self.s1 += s1.to(F64).cpu()
        self.s2 += s2.to(F64).cpu()
        self.s3 += s3.to(F64).cpu()
        self.s4 += s4.to(F64).cpu()
        torch.minimum(self.min, vmin.float().cpu(), out=self.min)
        torch.maximum(self.max, vmax.float().cpu(), out=self.max)
        self.active += active.to(torch.int64).cpu()

    def merge(self, other: Moments) -> Moments:
        if (other.d, other.threshold) != (self.d, self.threshold):
            raise ValueError("cannot merge moments of different neurons or 'active' thresholds")
        self.count += other.count
        for name in ("s1", "s2", "s3", "s4", "active"):
            getattr(self, name).add_(getattr(other, name))
        torch.minimum(self.min, other.min, out=self.min)
        torch.maximum(self.max, other.max, out=self.max)
        return self

    def summary(self) -> dict[str, Tensor]:
        """mean, std (population), skewness, excess kurtosis and fraction active per neuron."""
        n = max(self.count, 1)
        mean = self.s1 / n
        ex2, ex3, ex4 = self.s2 / n, self.s3 / n, self.s4 / n
        var = (ex2 - mean**2).clamp(min=0)
        m3 = ex3 - 3 * mean * ex2 + 2 * mean**3
        m4 = ex4 - 4 * mean * ex3 + 6 * mean**2 * ex2 - 3 * mean**4
        safe = var > 1e-20
        skew = torch.where(safe, m3 / var.clamp(min=1e-20) ** 1.5, torch.zeros_like(var))
        kurt = torch.where(safe, m4 / var.clamp(min=1e-20) ** 2 - 3.0, torch.zeros_like(var))
        return {"mean": mean, "std": var.sqrt(), "skew": skew, "kurtosis": kurt, "frac_active": self.active / n}

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "threshold": self.threshold, "count": self.count, "s1": self.s1, "s2": self.s2,
                "s3": self.s3, "s4": self.s4, "min": self.min, "max": self.max, "active": self.active}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Moments:
        obj = cls(state["d"], state["threshold"])
        obj.count = int(state["count"])
        for name in ("s1", "s2", "s3", "s4", "min", "max", "active"):
            setattr(obj, name, state[name].clone())
        return obj


class Histogram:
    """Fixed-bin histogram per neuron: ``n_bins`` equal bins on ``[lo, hi)`` plus an underflow and an overflow bin.

    ``counts[:, 0]`` counts values below ``lo``, ``counts[:, -1]`` values at or above ``hi``.
    """

    def __init__(self, d: int, lo: float = -2.0, hi: float = 4.0, n_bins: int = 60) -> None:
        if not hi > lo or n_bins < 1:
            raise ValueError("histogram needs hi > lo and n_bins >= 1")
        self.d, self.lo, self.hi, self.n_bins = d, float(lo), float(hi), int(n_bins)
        self.counts = torch.zeros((d, n_bins + 2), dtype=torch.long)
        self._constants: tuple[Tensor, ...] | None = None

    @property
    def edges(self) -> Tensor:
        return torch.linspace(self.lo, self.hi, self.n_bins + 1, dtype=F64)

    def bin_of(self, value: float) -> int:
        """Index (0 = underflow, n_bins + 1 = overflow) of the bin holding ``value``."""
        raw = int(torch.floor(torch.tensor((value - self.lo) * self.n_bins / (self.hi - self.lo)))) + 1
        return min(max(raw, 0), self.n_bins + 1)

    @property
    def trash(self) -> int:
        """Flat index that :meth:`add_bins` ignores (for tokens that do not count)."""
        return self.d * (self.n_bins + 2)

    def scalars(self) -> tuple[float, float, float]:
        """``(scale, shift, top)``: the bin of ``v`` is ``floor(clamp(v * scale + shift, 0, top))`` (in float32)."""
        scale = self.n_bins / (self.hi - self.lo)
        return scale, 1.0 - self.lo * scale, self.n_bins + 1.5

    def constants(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(scale, shift, top, offsets)`` for :func:`~neuronhunter.stats.kernels.bin_index` on ``device``."""
        if self._constants is None or self._constants[0].device != device:
            wide = self.trash >= 2**31
            self._constants = (
                *(torch.tensor(c, device=device) for c in self.scalars()),
                torch.arange(self.d, device=device, dtype=torch.int64 if wide else torch.int32) * (self.n_bins + 2),
            )
        return self._constants

    def update(self, x: Tensor) -> None:
        """Add ``x: [..., d]``."""
        self.add_bins(bin_index(x, *self.constants(x.device)).reshape(-1))

    def add_masked(self, x: Tensor, keep: Tensor, *, native: bool = True) -> None:
        """Add the rows of ``x [..., d]`` where ``keep [...]`` is True: on CPU by the native loop of
        :mod:`~neuronhunter.stats.native` when it is available and ``native`` is set (no index tensor, neurons
        split over torch's threads), else by :func:`bin_index` and one ``bincount``. Both count identically."""
        if native and _native.usable(x):
            _native.add_histogram(self.counts, x, keep, *self.scalars())
            return
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # bins computed in float32, as natively
        bins = torch.where(keep.unsqueeze(-1), bin_index(x, *self.constants(x.device)), self.trash)
        self.add_bins(bins.reshape(-1))

    def add_bins(self, bins: Tensor) -> None:
        """Add flat indices ``bin + (n_bins + 2) * neuron``; entries equal to :attr:`trash` are not counted."""
        counts = torch.bincount(bins, minlength=self.trash + 1)[: self.trash]
        self.counts += counts.view(self.d, self.n_bins + 2).cpu()

    def merge(self, other: Histogram) -> Histogram:
        if (other.lo, other.hi, other.n_bins) != (self.lo, self.hi, self.n_bins):
            raise ValueError("cannot merge histograms with different bins")
        self.counts += other.counts
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "lo": self.lo, "hi": self.hi, "n_bins": self.n_bins, "counts": self.counts}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Histogram:
        obj = cls(state["d"], state["lo"], state["hi"], state["n_bins"])
        obj.counts = state["counts"].clone()
        return obj


def _best(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of each column and their rows; ties go to the earlier row (a stable sort, where ``topk``
    leaves the order of ties to the memory layout). Held entries come before new ones, and new windows in order,
    so the earlier window wins a tie however the windows were batched."""
    top, idx = values.T.contiguous().sort(dim=1, descending=True, stable=True)  # along rows: ~30% faster
    return top[:, :k].T.contiguous(), idx[:, :k].T.contiguous()


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

    def update(self, wmax: Tensor, wpos: Tensor, window_ids: Tensor) -> None:
        """Merge per-window maxima ``wmax [windows, d]`` found at positions ``wpos [windows, d]``."""
        wmax = wmax.float().cpu()
        # only neurons with a window better than their current k-th enter the merge (once the top-k is full and
        # many windows have been seen, a small fraction of them)
        better = (wmax > self.values[-1]).any(0)
        n = int(better.sum())
        if n == 0:
            return
        if 2 * n > self.d:  # most neurons (the first batches): merging all of them is cheaper than selecting
            self._merge_rows(wmax, window_ids.view(-1, 1).cpu().expand(-1, self.d), wpos.cpu())
            return
        cols = torch.nonzero(better).view(-1)
        ids = window_ids.view(-1, 1).cpu().expand(-1, n)
        top, idx = _best(torch.cat([self.values[:, cols], wmax[:, cols]]), self.k)
        new_pos = wpos.cpu()[:, cols].to(torch.int32)
        self.window[:, cols] = torch.cat([self.window[:, cols], ids]).gather(0, idx)
        self.pos[:, cols] = torch.cat([self.pos[:, cols], new_pos]).gather(0, idx)
        self.values[:, cols] = top

    def merge(self, other: TopK) -> TopK:
        self._merge_rows(other.values, other.window, other.pos)
        return self

    def _merge_rows(self, values: Tensor, window: Tensor, pos: Tensor) -> None:
        top, idx = _best(torch.cat([self.values, values]), self.k)
        self.window = torch.cat([self.window, window]).gather(0, idx)
        self.pos = torch.cat([self.pos, pos.to(torch.int32)]).gather(0, idx)
        self.values = top

    def referenced_windows(self) -> Tensor:
        """Window ids currently held (for pruning stored window tokens)."""
        return torch.unique(self.window[self.window >= 0])

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "k": self.k, "values": self.values, "window": self.window, "pos": self.pos}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TopK:
        obj = cls(state["d"], state["k"])
        obj.values, obj.window, obj.pos = state["values"].clone(), state["window"].clone(), state["pos"].clone()
        return obj


class ConceptStats:
    """Per-category sums, sums of squares, maxima and token counts per neuron, plus the unlabelled baseline.

    Rows ``0..C-1`` are the categories; row ``C`` is "unlabelled" (tokens with no category). A token with several
    labels counts in each of its categories.
    """

    def __init__(self, d: int, categories: list[str]) -> None:
        self.d, self.categories = d, list(categories)
        rows = len(categories) + 1
        self.sum = torch.zeros((rows, d), dtype=F64)
        self.sumsq = torch.zeros((rows, d), dtype=F64)
        self.max = torch.full((rows, d), float("-inf"))
        self.count = torch.zeros(rows, dtype=torch.long)

    def update(self, x: Tensor, labels: Tensor, x2: Tensor | None = None, keep: Tensor | None = None) -> None:
        """``x: [tokens, d]`` activations, ``labels: [tokens, C]`` bool; ``keep: [tokens]`` bool rows that count."""
        if x.shape[0] == 0:
            return
        x2 = x * x if x2 is None else x2
        onehot = torch.cat([labels, ~labels.any(1, keepdim=True)], dim=1).to(x.dtype)  # [tokens, C+1]
        if keep is not None:
            onehot *= keep.to(x.dtype).unsqueeze(1)
        self.sum += (onehot.T @ x).to(F64).cpu()
        self.sumsq += (onehot.T @ x2).to(F64).cpu()
        counts = onehot.sum(0).long().cpu()
        self.count += counts
        for c in torch.nonzero(counts).view(-1).tolist():
            rows = x[onehot[:, c].bool()]
            torch.maximum(self.max[c], rows.amax(0).float().cpu(), out=self.max[c])

    def merge(self, other: ConceptStats) -> ConceptStats:
        if other.categories != self.categories:
            raise ValueError("cannot merge concept statistics over different categories")
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.count += other.count
        torch.maximum(self.max, other.max, out=self.max)
        return self

    def means(self) -> Tensor:
        """``[C+1, d]`` mean activation per category (NaN where a category has no tokens)."""
        n = self.count.to(F64).unsqueeze(1)
        return torch.where(n > 0, self.sum / n.clamp(min=1), torch.full_like(self.sum, float("nan")))

    def stds(self) -> Tensor:
        n = self.count.to(F64).unsqueeze(1).clamp(min=1)
        mean = self.sum / n
        return (self.sumsq / n - mean**2).clamp(min=0).sqrt()

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "categories": self.categories, "sum": self.sum, "sumsq": self.sumsq, "max": self.max,
                "count": self.count}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ConceptStats:
        obj = cls(state["d"], state["categories"])
        for name in ("sum", "sumsq", "max", "count"):
            setattr(obj, name, state[name].clone())
        return obj


class PositionStats:
    """Mean activation per position in the window (position 0 included), and the maximum and active count at
    position 0.

    This is where the "sequence-starter trap" is seen: a neuron whose mean at position 0 dwarfs its mean elsewhere.
    """

    def __init__(self, d: int, n_positions: int, threshold: float = 0.0) -> None:
        self.d, self.n_positions, self.threshold = d, int(n_positions), float(threshold)
        self.sum = torch.zeros((n_positions, d), dtype=F64)
        self.count = torch.zeros(n_positions, dtype=torch.long)
        self.first_max = torch.full((d,), float("-inf"))
        self.first_active = torch.zeros(d, dtype=torch.long)

    def update(self, acts: Tensor, mask: Tensor) -> None:
        """``acts: [batch, pos, d]``, ``mask: [batch, pos]`` (1 for real tokens, right padding)."""
        real = mask.to(acts.device).bool()
        sums = torch.where(real.unsqueeze(-1), acts, torch.zeros((), dtype=acts.dtype, device=acts.device)).sum(0)
        self.add(sums, real, acts[:, 0][real[:, 0]], counted_first=True)

    def add(self, sums: Tensor, real: Tensor, first: Tensor, *, counted_first: bool) -> None:
        """Add per-position sums computed by the caller.

        Args:
            sums: ``[pos, d]`` sums over the batch of the real tokens at each position.
            real: ``[batch, pos]`` bool, the real (non-padding) tokens.
            first: ``[windows, d]`` the activations at position 0 of the windows.
            counted_first: whether ``sums[0]`` already holds position 0 (else ``first`` is added to it).
        """
        t = sums.shape[0]
        self.sum[:t] += sums.to(F64).cpu()
        self.count[:t] += real.sum(0).long().cpu()
        if first.shape[0]:
            if not counted_first:
                self.sum[0] += first.sum(0).to(F64).cpu()
            torch.maximum(self.first_max, first.amax(0).float().cpu(), out=self.first_max)
            self.first_active += (first > self.threshold).sum(0).cpu()

    def merge(self, other: PositionStats) -> PositionStats:
        if (other.d, other.n_positions, other.threshold) != (self.d, self.n_positions, self.threshold):
            raise ValueError("cannot merge position statistics of different shapes or thresholds")
        self.sum += other.sum
        self.count += other.count
        self.first_active += other.first_active
        torch.maximum(self.first_max, other.first_max, out=self.first_max)
        return self

    def means(self) -> Tensor:
        """``[positions, d]`` mean activation per position (NaN where no token was seen)."""
        n = self.count.to(F64).unsqueeze(1)
        return torch.where(n > 0, self.sum / n.clamp(min=1), torch.full_like(self.sum, float("nan")))

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "n_positions": self.n_positions, "threshold": self.threshold, "sum": self.sum,
                "count": self.count, "first_max": self.first_max, "first_active": self.first_active}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PositionStats:
        obj = cls(state["d"], state["n_positions"], state["threshold"])
        for name in ("sum", "count", "first_max", "first_active"):
            setattr(obj, name, state[name].clone())
        return obj
