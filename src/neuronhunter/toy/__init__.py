"""The superposition lab: toy models where the ground truth is known.

* :func:`run_monopoly` / :class:`MonopolyConfig` — mono-to-poly weight dynamics of a small MLP on synthetic line
  images (orientation task, then XOR), with the hypotheses H1–H3 tested over several seeds
  (:mod:`neuronhunter.toy.monopoly`, data in :mod:`neuronhunter.toy.lines`).
* :func:`run_tms` / :class:`TMSConfig` — Toy Models of Superposition (Elhage et al. 2022), the ReLU output model on
  sparse features, with per-feature norm, interference and dimensionality (:mod:`neuronhunter.toy.tms`).

Toy neurons are scored with the same :func:`~neuronhunter.analysis.metrics.crs` as real ones.
"""

from __future__ import annotations

from .lines import LinesData, make_lines, save_png_samples
from .monopoly import (
    LineMLP,
    MonopolyConfig,
    evaluate_hypotheses,
    load_checkpoint,
    neuron_metrics,
    run_monopoly,
)
from .tms import PAPER_FRACTIONS, PRESETS, TMSConfig, feature_metrics, run_tms, train_tms

__all__ = [
    "PAPER_FRACTIONS",
    "PRESETS",
    "LineMLP",
    "LinesData",
    "MonopolyConfig",
    "TMSConfig",
    "evaluate_hypotheses",
    "feature_metrics",
    "load_checkpoint",
    "make_lines",
    "neuron_metrics",
    "run_monopoly",
    "run_tms",
    "save_png_samples",
    "train_tms",
]
