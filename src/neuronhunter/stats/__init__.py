"""Mergeable streaming statistics: moments, histograms, top-k windows, concept and position stats (torch, with a
fused compiled kernel and a native histogram loop on the scan's hot path)."""

from .accumulators import ConceptStats, Histogram, Moments, PositionStats, TopK
from .layer import LayerStats, StatsSpec

__all__ = ["ConceptStats", "Histogram", "LayerStats", "Moments", "PositionStats", "StatsSpec", "TopK"]
