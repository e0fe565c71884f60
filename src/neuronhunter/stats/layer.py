"""``LayerStats``: every statistic of one layer's neurons, updated from one batch of activations.

It decides which tokens count (:mod:`neuronhunter.stats.tokens`): padding never does; position 0 (the BOS token or
the window's first token) is excluded from the moments, histograms, concept statistics and exemplars unless
``include_first=True``, and is always tracked separately by :class:`PositionStats` (the "sequence-starter trap").

Both tails are kept: the top-k windows by maximum and the bottom-k by minimum, band samples of window peaks in
each direction, per-neuron histogram bins that cover both tails, per-category minima and maxima. In a gated MLP
the sign of a neuron is arbitrary (negating row ``n`` of ``up_proj`` and column ``n`` of ``down_proj`` leaves the
model unchanged and negates neuron ``n``), so everything the judgement needs exists for either direction.

**Calibration.** The per-neuron histogram range and the scale of the exemplar bands are fixed before the scan
from its first windows (:class:`Calibration`, computed by the scan and recorded in the state), so that every batch,
shard and resumed run uses the same bins and the statistics stay mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import native as _native
from .accumulators import Histogram, Moments, PositionStats, add_group_bins
from .concepts import ConceptStats, label_bits
from .exemplars import BandSamples, TopK
from .kernels import reduce_batch
from .native import usable as native_histogram_usable
from .tokens import counted_tokens

BAND_FRACTIONS = (0.0, 0.1, 0.3, 0.5, 0.7)


@dataclass(frozen=True)
class StatsSpec:
    """What to accumulate (shared by all layers of a scan). ``hist_lo``/``hist_hi`` give one histogram range for
    every neuron; None (the scan's default) means per-neuron ranges from the calibration."""

    top_k: int = 20
    threshold: float = 0.0
    hist_lo: float | None = -2.0
    hist_hi: float | None = 4.0
    hist_bins: int = 60
    n_positions: int = 128
    include_first: bool = False
    categories: tuple[str, ...] = ()
    band_fractions: tuple[float, ...] = BAND_FRACTIONS
    band_samples: int = 3
    seed: int = 0


@dataclass
class Calibration:
    """Per-neuron ranges fixed before a scan (``[d]`` tensors): the histogram's ``lo``/``hi`` and the scale of the
    band samples in each direction (``scale_pos``: the largest activation seen, ``scale_neg``: the largest
    ``-activation``)."""

    lo: Tensor
    hi: Tensor
    scale_pos: Tensor
    scale_neg: Tensor
    windows: int = 0  # how many windows it was computed from
    tokens: int = 0

    @classmethod
    def from_extremes(cls, vmin: Tensor, vmax: Tensor, *, margin: float = 0.25, windows: int = 0,
                      tokens: int = 0) -> Calibration:
        """From each neuron's minimum and maximum on calibration tokens: the histogram spans them widened by
        ``margin`` of the width on each side (so both tails are resolved; values beyond go to the under/overflow
        bins), the band scales are the extremes themselves."""
        vmin, vmax = vmin.double(), vmax.double()
        finite = torch.isfinite(vmin) & torch.isfinite(vmax)
        vmin = torch.where(finite, vmin, torch.zeros_like(vmin))
        vmax = torch.where(finite, vmax, torch.zeros_like(vmax))
        width = (vmax - vmin).clamp(min=1e-6)
        return cls(lo=vmin - margin * width, hi=vmax + margin * width,
                   scale_pos=vmax.clamp(min=1e-6).float(), scale_neg=(-vmin).clamp(min=1e-6).float(),
                   windows=windows, tokens=tokens)

    @classmethod
    def fixed(cls, d: int, lo: float, hi: float) -> Calibration:
        """One range for every neuron (``--hist-range``): bands scaled by its ends."""
        return cls(lo=torch.full((d,), float(lo), dtype=torch.float64), hi=torch.full((d,), float(hi), dtype=torch.float64),
                   scale_pos=torch.full((d,), max(float(hi), 1e-6)), scale_neg=torch.full((d,), max(-float(lo), 1e-6)))

    def state_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "scale_pos": self.scale_pos, "scale_neg": self.scale_neg,
                "windows": self.windows, "tokens": self.tokens}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Calibration:
        return cls(**{k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()})


class LayerStats:
    """All accumulators of one layer (``d`` neurons).

    Args:
        calibration: the per-neuron ranges (default: the spec's fixed ``hist_lo``/``hist_hi`` for every neuron).
    """

    def __init__(self, layer: int, d: int, spec: StatsSpec, *, calibration: Calibration | None = None,
                 compile: bool = True, full_batch: tuple[int, int] | None = None) -> None:
        self.layer, self.d, self.spec, self.compile = layer, d, spec, compile
        self.full_batch = full_batch  # (windows, positions) of the batches most updates have (a scan's full ones)
        self._thr: Tensor | None = None
        if calibration is None:
            lo = -2.0 if spec.hist_lo is None else spec.hist_lo
            hi = 4.0 if spec.hist_hi is None else spec.hist_hi
            calibration = Calibration.fixed(d, lo, hi)
        self.calibration = calibration
        self.moments = Moments(d, spec.threshold)
        self.hist = Histogram(d, calibration.lo, calibration.hi, spec.hist_bins)
        self.topk = TopK(d, spec.top_k)
        self.bottomk = TopK(d, spec.top_k)  # over -activation: the windows with the most negative minimum
        self.bands_pos = BandSamples(d, calibration.scale_pos, spec.band_fractions, spec.band_samples, spec.seed)
        self.bands_neg = BandSamples(d, calibration.scale_neg, spec.band_fractions, spec.band_samples, spec.seed)
        self.positions = PositionStats(d, spec.n_positions, spec.threshold)
        self.concepts = ConceptStats(d, list(spec.categories), spec.hist_bins + 2) if spec.categories else None

    def update(self, acts: Tensor, mask: Tensor, window_ids: Tensor, labels: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            acts: ``[batch, pos, d]`` activations (not modified).
            mask: ``[batch, pos]`` 1 for real tokens, 0 for padding (right padding).
            window_ids: ``[batch]`` global window ids.
            labels: ``[batch, pos, C]`` bool concept labels, if categories are tracked.
        """
        b, t, d = acts.shape
        real = mask.to(acts.device).bool()
        keep = counted_tokens(real, include_first=self.spec.include_first)
        n = int(keep.sum())
        # compiled statistics on CPU: the histograms come from the native loop, which reads the activations
        # itself, so the fused kernel need not write a bin index for every activation
        native = self.compile and native_histogram_usable(acts)
        r = reduce_batch(acts, keep, (self._threshold(acts.device), *self.hist.constants(acts.device)),
                         self.hist.trash, compile=self.compile, with_bins=not native,
                         specialise=(b, t) == self.full_batch)
        first = acts[:, 0][real[:, 0]].float()  # the sequence starters, tracked whether counted or not
        self.positions.add(r.pos_sums, real, first, counted_first=self.spec.include_first)
        if n == 0:
            return
        self.moments.add(n, r.pos_sums.sum(0), r.s2, r.s3, r.s4, r.vmin, r.wmax.amax(0), r.active, r.active_neg)
        concepts = self.concepts if labels is not None else None
        groups = label_bits(labels).reshape(-1) if concepts is not None else None
        group_counts = concepts.hist if concepts is not None else None
        if native:
            self.hist.add_masked(acts, keep, groups=groups, group_counts=group_counts)
        else:
            self.hist.add_bins(r.bins)
            if groups is not None and group_counts is not None:
                add_group_bins(group_counts, r.bins.view(b * t, d), groups, self.hist.trash)
        # the exemplar loops of exemplars.c go with the compiled statistics (``--no-compile`` turns them off)
        ex = self.compile and _native.library() is not None
        self.topk.update(r.wmax, r.wpos, window_ids, native=ex)
        self.bottomk.update(-r.wmin, r.wminpos, window_ids, native=ex)
        self.bands_pos.update(r.wmax, r.wpos, window_ids, native=ex)
        self.bands_neg.update(-r.wmin, r.wminpos, window_ids, native=ex)
        if concepts is not None:
            concepts.update(acts.reshape(b * t, d).float(), labels.reshape(b * t, -1).to(acts.device),
                            keep=keep.view(-1))

    def _threshold(self, device: torch.device) -> Tensor:
        if self._thr is None or self._thr.device != device:
            self._thr = torch.tensor(self.spec.threshold, device=device)
        return self._thr

    def window_tensors(self) -> list[Tensor]:
        """The exemplars' window-id tensors (-1: an empty slot)."""
        return [self.topk.window, self.bottomk.window, self.bands_pos.window, self.bands_neg.window]


    def check_mergeable(self, other: LayerStats) -> None:
        """Raise a one-line error when ``other`` was accumulated differently (neurons, thresholds, bins, k, ...)."""
        from ..errors import RunDirError

        if other.d != self.d:
            raise RunDirError(f"layer {self.layer}: cannot merge statistics of {self.d} and {other.d} neurons")
        mine, theirs = self.spec.__dict__, other.spec.__dict__
        for key in mine:
            if mine[key] != theirs[key]:
                raise RunDirError(f"layer {self.layer}: cannot merge statistics accumulated with different {key} "
                                  f"({mine[key]!r} vs {theirs[key]!r})")
        if not (self.hist.same_bins(other.hist) and self.bands_pos.same_bands(other.bands_pos)
                and self.bands_neg.same_bands(other.bands_neg)):
            raise RunDirError(f"layer {self.layer}: cannot merge statistics calibrated differently (histogram bins "
                              "or band scales differ)")

    def merge(self, other: LayerStats) -> LayerStats:
        self.check_mergeable(other)
        self.moments.merge(other.moments)
        self.hist.merge(other.hist)
        self.topk.merge(other.topk)
        self.bottomk.merge(other.bottomk)
        self.bands_pos.merge(other.bands_pos)
        self.bands_neg.merge(other.bands_neg)
        self.positions.merge(other.positions)
        if self.concepts is not None and other.concepts is not None:
            self.concepts.merge(other.concepts)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "d": self.d,
            "spec": self.spec.__dict__ | {"categories": list(self.spec.categories),
                                          "band_fractions": list(self.spec.band_fractions)},
            "calibration": self.calibration.state_dict(),
            "moments": self.moments.state_dict(), "hist": self.hist.state_dict(), "topk": self.topk.state_dict(),
            "bottomk": self.bottomk.state_dict(), "bands_pos": self.bands_pos.state_dict(),
            "bands_neg": self.bands_neg.state_dict(), "positions": self.positions.state_dict(),
            "concepts": self.concepts.state_dict() if self.concepts is not None else None,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LayerStats:
        raw = dict(state["spec"])
        raw["categories"] = tuple(raw["categories"])
        if "band_fractions" in raw:
            raw["band_fractions"] = tuple(raw["band_fractions"])
        spec = StatsSpec(**raw)
        cal = Calibration.from_state_dict(state["calibration"]) if "calibration" in state else None
        obj = cls(state["layer"], state["d"], spec, calibration=cal)
        obj.moments = Moments.from_state_dict(state["moments"])
        obj.hist = Histogram.from_state_dict(state["hist"])
        obj.topk = TopK.from_state_dict(state["topk"])
        if "bottomk" in state:
            obj.bottomk = TopK.from_state_dict(state["bottomk"])
            obj.bands_pos = BandSamples.from_state_dict(state["bands_pos"])
            obj.bands_neg = BandSamples.from_state_dict(state["bands_neg"])
        obj.positions = PositionStats.from_state_dict(state["positions"])
        if state["concepts"] is not None:
            obj.concepts = ConceptStats.from_state_dict(state["concepts"])
        return obj
