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
        self.active_neg = torch.zeros(d, dtype=torch.long)  # tokens below -threshold (the negative direction)

    def update(self, x: Tensor) -> None:
        """Add a batch ``x: [..., d]`` (any leading dims are tokens)."""
        dims = _rows(x)
        x2 = x * x
        self.add(_n_rows(x), x.sum(dims), x2.sum(dims), (x2 * x).sum(dims), (x2 * x2).sum(dims),
                 x.amin(dims), x.amax(dims), (x > self.threshold).sum(dims), (x < -self.threshold).sum(dims))

    def add(self, n: int, s1: Tensor, s2: Tensor, s3: Tensor, s4: Tensor, vmin: Tensor, vmax: Tensor,
            active: Tensor, active_neg: Tensor | None = None) -> None:
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
        if active_neg is not None:
            self.active_neg += active_neg.to(torch.int64).cpu()

    def merge(self, other: Moments) -> Moments:
        if (other.d, other.threshold) != (self.d, self.threshold):
            raise ValueError("cannot merge moments of different neurons or 'active' thresholds")
        self.count += other.count
        for name in ("s1", "s2", "s3", "s4", "active", "active_neg"):
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
        return {"mean": mean, "std": var.sqrt(), "skew": skew, "kurtosis": kurt, "frac_active": self.active / n,
                "frac_active_neg": self.active_neg / n}

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "threshold": self.threshold, "count": self.count, "s1": self.s1, "s2": self.s2,
                "s3": self.s3, "s4": self.s4, "min": self.min, "max": self.max, "active": self.active,
                "active_neg": self.active_neg}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Moments:
        obj = cls(state["d"], state["threshold"])
        obj.count = int(state["count"])
        for name in ("s1", "s2", "s3", "s4", "min", "max", "active"):
            setattr(obj, name, state[name].clone())
        if "active_neg" in state:
            obj.active_neg = state["active_neg"].clone()
        return obj


class Histogram:
    """Fixed-bin histogram per neuron: ``n_bins`` equal bins on ``[lo_j, hi_j)`` for neuron ``j`` plus an underflow
    and an overflow bin. The range may be one for all neurons (floats) or one per neuron (``[d]`` tensors, e.g.
    calibrated on the first windows of a scan so that both tails of every neuron are resolved).

    ``counts[:, 0]`` counts values below ``lo``, ``counts[:, -1]`` values at or above ``hi``.
    """

    def __init__(self, d: int, lo: float | Tensor = -2.0, hi: float | Tensor = 4.0, n_bins: int = 60) -> None:
        lo_t = torch.as_tensor(lo, dtype=F64).expand(d).clone() if d else torch.zeros(0, dtype=F64)
        hi_t = torch.as_tensor(hi, dtype=F64).expand(d).clone() if d else torch.zeros(0, dtype=F64)
        if n_bins < 1 or not bool((hi_t > lo_t).all()):
            raise ValueError("histogram needs hi > lo and n_bins >= 1")
        self.d, self.lo, self.hi, self.n_bins = d, lo_t, hi_t, int(n_bins)
        self.counts = torch.zeros((d, n_bins + 2), dtype=torch.long)
        self._constants: tuple[Tensor, ...] | None = None

    @property
    def edges(self) -> Tensor:
        """``[d, n_bins + 1]`` bin edges of each neuron."""
        steps = torch.linspace(0.0, 1.0, self.n_bins + 1, dtype=F64)
        return self.lo[:, None] + (self.hi - self.lo)[:, None] * steps[None, :]

    @property
    def shared_range(self) -> tuple[float, float] | None:
        """``(lo, hi)`` when every neuron has the same range, else None."""
        if self.d and bool((self.lo == self.lo[0]).all() and (self.hi == self.hi[0]).all()):
            return float(self.lo[0]), float(self.hi[0])
        return None

    def bin_of(self, value: float, neuron: int = 0) -> int:
        """Index (0 = underflow, n_bins + 1 = overflow) of the bin of ``neuron`` holding ``value``."""
        scale, shift, top = (t[neuron] if t.ndim else t for t in self._scalars())
        return int(torch.clamp(torch.tensor(value, dtype=torch.float32) * scale + shift, 0.0, top))

    @property
    def trash(self) -> int:
        """Flat index that :meth:`add_bins` ignores (for tokens that do not count)."""
        return self.d * (self.n_bins + 2)

    def _scalars(self) -> tuple[Tensor, Tensor, Tensor]:
        scale = self.n_bins / (self.hi - self.lo)
        return scale.float(), (1.0 - self.lo * scale).float(), torch.tensor(self.n_bins + 1.5)

    def scalars(self) -> tuple[Tensor, Tensor, float]:
        """``(scale [d], shift [d], top)``: the bin of ``v`` for neuron ``j`` is
        ``floor(clamp(v * scale[j] + shift[j], 0, top))`` (in float32)."""
        scale, shift, top = self._scalars()
        return scale, shift, float(top)

    def constants(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(scale [d], shift [d], top, offsets [d])`` for :func:`~neuronhunter.stats.kernels.bin_index`."""
        if self._constants is None or self._constants[0].device != device:
            wide = self.trash >= 2**31
            scale, shift, top = self._scalars()
            self._constants = (
                scale.to(device), shift.to(device), top.to(device),
                torch.arange(self.d, device=device, dtype=torch.int64 if wide else torch.int32) * (self.n_bins + 2),
            )
        return self._constants

    def update(self, x: Tensor) -> None:
        """Add ``x: [..., d]``."""
        self.add_bins(bin_index(x, *self.constants(x.device)).reshape(-1))

    def add_masked(self, x: Tensor, keep: Tensor, *, native: bool = True, groups: Tensor | None = None,
                   group_counts: Tensor | None = None) -> None:
        """Add the rows of ``x [..., d]`` where ``keep [...]`` is True: on CPU by the native loop of
        :mod:`~neuronhunter.stats.native` when it is available and ``native`` is set (no index tensor, neurons
        split over torch's threads), else by :func:`bin_index` and one ``bincount``. Both count identically.

        With ``groups`` (an int64 bit mask per row, as ``keep``) each counted row is also added to
        ``group_counts [G, d, n_bins + 2]`` once for each of its bits (per-category histograms, same bins)."""
        if native and _native.usable(x):
            _native.add_histogram(self.counts, x, keep, *self.scalars(), groups=groups, group_counts=group_counts)
            return
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # bins computed in float32, as natively
        bins = torch.where(keep.unsqueeze(-1), bin_index(x, *self.constants(x.device)), self.trash)
        self.add_bins(bins.reshape(-1))
        if groups is not None and group_counts is not None:
            add_group_bins(group_counts, bins.reshape(-1, self.d), groups.reshape(-1), self.trash)

    def add_bins(self, bins: Tensor) -> None:
        """Add flat indices ``bin + (n_bins + 2) * neuron``; entries equal to :attr:`trash` are not counted."""
        counts = torch.bincount(bins, minlength=self.trash + 1)[: self.trash]
        self.counts += counts.view(self.d, self.n_bins + 2).cpu()

    def same_bins(self, other: Histogram) -> bool:
        return (other.d, other.n_bins) == (self.d, self.n_bins) and torch.equal(other.lo, self.lo) and \
            torch.equal(other.hi, self.hi)

    def merge(self, other: Histogram) -> Histogram:
        if not self.same_bins(other):
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


def add_group_bins(group_counts: Tensor, bins: Tensor, groups: Tensor, trash: int) -> None:
    """Add flat bin indices ``bins [rows, d]`` (``trash`` = not counted) to ``group_counts [G, d, nb]`` for every
    group bit of each row's mask ``groups [rows]`` (the fallback of the native loop's grouped counting)."""
    g, d, nb = group_counts.shape
    for bit in range(g):
        rows = ((groups >> bit) & 1).bool().to(bins.device)
        if not bool(rows.any()):
            continue
        sel = bins[rows].reshape(-1)
        counts = torch.bincount(sel, minlength=trash + 1)[:trash]
        group_counts[bit] += counts.view(d, nb).to(group_counts.dtype).cpu()


class PositionStats:
    """Mean activation per position in the window (position 0 included), and the maximum, minimum and active count
    at position 0.

    This is where the "sequence-starter trap" is seen: a neuron whose mean at position 0 dwarfs its mean elsewhere.
    """

    def __init__(self, d: int, n_positions: int, threshold: float = 0.0) -> None:
        self.d, self.n_positions, self.threshold = d, int(n_positions), float(threshold)
        self.sum = torch.zeros((n_positions, d), dtype=F64)
        self.count = torch.zeros(n_positions, dtype=torch.long)
        self.first_max = torch.full((d,), float("-inf"))
        self.first_min = torch.full((d,), float("inf"))
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
            torch.minimum(self.first_min, first.amin(0).float().cpu(), out=self.first_min)
            self.first_active += (first > self.threshold).sum(0).cpu()

    def merge(self, other: PositionStats) -> PositionStats:
        if (other.d, other.n_positions, other.threshold) != (self.d, self.n_positions, self.threshold):
            raise ValueError("cannot merge position statistics of different shapes or thresholds")
        self.sum += other.sum
        self.count += other.count
        self.first_active += other.first_active
        torch.maximum(self.first_max, other.first_max, out=self.first_max)
        torch.minimum(self.first_min, other.first_min, out=self.first_min)
        return self

    def means(self) -> Tensor:
        """``[positions, d]`` mean activation per position (NaN where no token was seen)."""
        n = self.count.to(F64).unsqueeze(1)
        return torch.where(n > 0, self.sum / n.clamp(min=1), torch.full_like(self.sum, float("nan")))

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "n_positions": self.n_positions, "threshold": self.threshold, "sum": self.sum,
                "count": self.count, "first_max": self.first_max, "first_min": self.first_min,
                "first_active": self.first_active}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PositionStats:
        obj = cls(state["d"], state["n_positions"], state["threshold"])
        for name in ("sum", "count", "first_max", "first_active"):
            setattr(obj, name, state[name].clone())
        if "first_min" in state:
            obj.first_min = state["first_min"].clone()
        return obj


# the exemplar and concept accumulators live in their own modules; imported here for one place to find them all
from .concepts import ConceptStats  # noqa: E402
from .exemplars import BandSamples, TopK  # noqa: E402

__all__ = ["BandSamples", "ConceptStats", "Histogram", "Moments", "PositionStats", "TopK", "add_group_bins"]
