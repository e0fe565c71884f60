"""``LayerStats``: every statistic of one layer's neurons, updated from one batch of activations.

It decides which tokens count: padding never does; position 0 (the BOS token or the window's first token) is
excluded from the moments, histogram, concept statistics and top-k unless ``include_first=True``, and is always
tracked separately by :class:`PositionStats` (the "sequence-starter trap").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .accumulators import ConceptStats, Histogram, Moments, PositionStats, TopK
from .kernels import reduce_batch
from .native import usable as native_histogram_usable
from .tokens import counted_tokens


@dataclass(frozen=True)
class StatsSpec:
    """What to accumulate (shared by all layers of a scan)."""

    top_k: int = 20
    threshold: float = 0.0
    hist_lo: float = -2.0
    hist_hi: float = 4.0
    hist_bins: int = 60
    n_positions: int = 128
    include_first: bool = False
    categories: tuple[str, ...] = ()


class LayerStats:
    """All accumulators of one layer (``d`` neurons)."""

    def __init__(self, layer: int, d: int, spec: StatsSpec, *, compile: bool = True,
                 full_batch: tuple[int, int] | None = None) -> None:
        self.layer, self.d, self.spec, self.compile = layer, d, spec, compile
        self.full_batch = full_batch  # (windows, positions) of the batches most updates have (a scan's full ones)
        self._thr: Tensor | None = None
        self.moments = Moments(d, spec.threshold)
        self.hist = Histogram(d, spec.hist_lo, spec.hist_hi, spec.hist_bins)
        self.topk = TopK(d, spec.top_k)
        self.positions = PositionStats(d, spec.n_positions, spec.threshold)
        self.concepts = ConceptStats(d, list(spec.categories)) if spec.categories else None

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
        self.moments.add(n, r.pos_sums.sum(0), r.s2, r.s3, r.s4, r.vmin, r.wmax.amax(0), r.active)
        if native:
            self.hist.add_masked(acts, keep)
        else:
            self.hist.add_bins(r.bins)
        self.topk.update(r.wmax, r.wpos, window_ids)
        if self.concepts is not None and labels is not None:
            self.concepts.update(acts.reshape(b * t, d).float(), labels.reshape(b * t, -1).to(acts.device),
                                 keep=keep.view(-1))

    def _threshold(self, device: torch.device) -> Tensor:
        if self._thr is None or self._thr.device != device:
            self._thr = torch.tensor(self.spec.threshold, device=device)
        return self._thr

    def referenced_windows(self) -> Tensor:
        """Ids of the windows this layer's exemplars refer to (unique, sorted)."""
        return self.topk.referenced_windows()

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

    def merge(self, other: LayerStats) -> LayerStats:
        self.check_mergeable(other)
        self.moments.merge(other.moments)
        self.hist.merge(other.hist)
        self.topk.merge(other.topk)
        self.positions.merge(other.positions)
        if self.concepts is not None and other.concepts is not None:
            self.concepts.merge(other.concepts)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "d": self.d, "spec": self.spec.__dict__ | {"categories": list(self.spec.categories)},
            "moments": self.moments.state_dict(), "hist": self.hist.state_dict(), "topk": self.topk.state_dict(),
            "positions": self.positions.state_dict(),
            "concepts": self.concepts.state_dict() if self.concepts is not None else None,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LayerStats:
        spec = StatsSpec(**{**state["spec"], "categories": tuple(state["spec"]["categories"])})
        obj = cls(state["layer"], state["d"], spec)
        obj.moments = Moments.from_state_dict(state["moments"])
        obj.hist = Histogram.from_state_dict(state["hist"])
        obj.topk = TopK.from_state_dict(state["topk"])
        obj.positions = PositionStats.from_state_dict(state["positions"])
        if state["concepts"] is not None:
            obj.concepts = ConceptStats.from_state_dict(state["concepts"])
        return obj
