"""Explain every neuron, and score each explanation on text it has not seen.

Candidates (tokens, context, category, position, domain, optional text) come from a run's train statistics
(:mod:`.candidates`); one streaming pass over held-out documents scores all of them for every neuron
(:mod:`.scoring`, :mod:`.heldout`, :mod:`.metrics`); :func:`explain_run` writes ``explanations.parquet`` and the
best explanation of every neuron into ``neurons.parquet``. Text explanations (an instruct model reading exemplars)
and their simulation live in :mod:`.text`. See ``docs/explain.md``.
"""

from __future__ import annotations

from .pipeline import EXPLANATIONS, ExplainConfig, ExplainResult, explain_run

__all__ = ["EXPLANATIONS", "ExplainConfig", "ExplainResult", "explain_run"]
