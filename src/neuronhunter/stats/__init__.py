"""Mergeable streaming statistics (pure torch): moments, histograms, top-k windows, concept and position stats."""

from .accumulators import ConceptStats, Histogram, Moments, PositionStats, TopK
from .layer import LayerStats, StatsSpec

__all__ = ["ConceptStats", "Histogram", "LayerStats", "Moments", "PositionStats", "StatsSpec", "TopK"]
