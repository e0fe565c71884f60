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

    def __init__(self, layer: int, d: int, spec: StatsSpec) -> None:
        self.layer, self.d, self.spec = layer, d, spec
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
        self.positions.update(acts, mask)
        start = 0 if self.spec.include_first else 1
        keep = mask.bool()
        if start:
            keep = keep.clone()
            keep[:, 0] = False
        lengths = keep[:, start:].sum(1)  # counted tokens per window (right padding)
        if int(lengths.sum()) == 0:
            return
        keep_flat = keep.view(-1)
        body = acts[:, start:]  # [b, t', d] view
        full = bool((lengths == body.shape[1]).all())
        if full:
            # the common case (only position 0 excluded, no padding): one contiguous copy of the counted rows
            # (reductions over the strided view are ~20x slower than over contiguous memory)
            x, n_excluded = body.contiguous().view(-1, d), 0
        else:
            # zero the excluded rows in a copy: exact sums without subtracting (possibly huge) BOS values
            x = acts.reshape(b * t, d).clone()
            x[~keep_flat] = 0
            n_excluded = b * t - int(lengths.sum())
        x2 = x * x

        # per-window max and min over the counted positions: feeds min/max and the top-k
        wmax, wmin = body.amax(1), body.amin(1)  # [b, d]
        if not full:
            for i in torch.nonzero(lengths < body.shape[1]).view(-1).tolist():
                n = int(lengths[i])
                if n == 0:
                    wmax[i], wmin[i] = float("-inf"), float("inf")
                else:
                    wmax[i], wmin[i] = body[i, :n].amax(0), body[i, :n].amin(0)

        self.moments.update(x, x2, zero_rows=n_excluded, minmax=(wmin.amin(0), wmax.amax(0)))
        self.hist.update(x, zero_rows=n_excluded)
        if self.concepts is not None and labels is not None:
            lab = labels.reshape(b * t, -1)
            if full:
                flat = acts.reshape(b * t, d)
                self.concepts.update(flat, lab, flat * flat, keep=keep_flat)
            else:
                self.concepts.update(x, lab, x2, keep=keep_flat)

        def locate(rows: Tensor, neurons: Tensor) -> Tensor:
            rows, neurons = rows.to(acts.device), neurons.to(acts.device)
            vals = body[rows, :, neurons]  # [m, t']
            pos_idx = torch.arange(body.shape[1], device=acts.device)
            vals = vals.masked_fill(pos_idx.unsqueeze(0) >= lengths.to(acts.device)[rows].unsqueeze(1), float("-inf"))
            return vals.argmax(1) + start

        self.topk.update(wmax, locate, window_ids)

    def merge(self, other: LayerStats) -> LayerStats:
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
