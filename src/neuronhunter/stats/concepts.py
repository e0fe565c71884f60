"""Per-category statistics of every neuron: moments, extremes, counts and per-category histograms.

Rows ``0..C-1`` are the lexicon's categories; row ``C`` is "unlabelled" (tokens with no category). A token with
several labels counts in each of its categories. The per-category histograms use the neuron's own bins (those of
:class:`~neuronhunter.stats.accumulators.Histogram`), so the judgement can ask, for any threshold on a bin edge,
how many tokens of each category lie above it: precision, recall and precision-recall curves of "this neuron fires
on category c", in either direction, from one pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

F64 = torch.float64
MAX_GROUPS = 63  # category bit masks are int64 (one bit per category, one for "unlabelled")


def label_bits(labels: Tensor) -> Tensor:
    """``[..., C]`` bool labels -> ``[...]`` int64 bit masks with bit ``c`` per category and bit ``C`` for tokens
    without any label (the "unlabelled" row)."""
    c = labels.shape[-1]
    if c + 1 > MAX_GROUPS:
        raise ValueError(f"at most {MAX_GROUPS - 1} categories can be tracked, the lexicon has {c}")
    weights = (1 << torch.arange(c, dtype=torch.int64, device=labels.device))
    bits = (labels.to(torch.int64) * weights).sum(-1)
    return torch.where(bits == 0, torch.tensor(1 << c, dtype=torch.int64, device=labels.device), bits)


class ConceptStats:
    """Per-category sums, sums of squares, maxima, minima and token counts per neuron, plus the unlabelled baseline,
    and (when ``n_bins`` is given) per-category histograms ``hist [C+1, d, n_bins]`` (int32) on the neuron's bins.
    """

    def __init__(self, d: int, categories: list[str], n_bins: int | None = None) -> None:
        self.d, self.categories = d, list(categories)
        rows = len(categories) + 1
        self.sum = torch.zeros((rows, d), dtype=F64)
        self.sumsq = torch.zeros((rows, d), dtype=F64)
        self.max = torch.full((rows, d), float("-inf"))
        self.min = torch.full((rows, d), float("inf"))
        self.count = torch.zeros(rows, dtype=torch.long)
        self.hist = torch.zeros((rows, d, n_bins), dtype=torch.int32) if n_bins else None

    def update(self, x: Tensor, labels: Tensor, x2: Tensor | None = None, keep: Tensor | None = None) -> None:
        """``x: [tokens, d]`` activations, ``labels: [tokens, C]`` bool; ``keep: [tokens]`` bool rows that count.
        (The histograms are filled by the layer's histogram pass, :meth:`Histogram.add_masked` with groups.)"""
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
            rows = x[onehot[:, c].to(x.device).bool()]
            torch.maximum(self.max[c], rows.amax(0).float().cpu(), out=self.max[c])
            torch.minimum(self.min[c], rows.amin(0).float().cpu(), out=self.min[c])

    def merge(self, other: ConceptStats) -> ConceptStats:
        if other.categories != self.categories:
            raise ValueError("cannot merge concept statistics over different categories")
        if (self.hist is None) != (other.hist is None) or (self.hist is not None and self.hist.shape != other.hist.shape):
            raise ValueError("cannot merge concept histograms of different bins")
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.count += other.count
        torch.maximum(self.max, other.max, out=self.max)
        torch.minimum(self.min, other.min, out=self.min)
        if self.hist is not None:
            self.hist += other.hist
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
                "min": self.min, "count": self.count, "hist": self.hist}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ConceptStats:
        hist = state.get("hist")
        obj = cls(state["d"], state["categories"], None if hist is None else hist.shape[-1])
        for name in ("sum", "sumsq", "max", "count"):
            setattr(obj, name, state[name].clone())
        if "min" in state:
            obj.min = state["min"].clone()
        if hist is not None:
            obj.hist = hist.clone()
        return obj
