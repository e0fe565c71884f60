"""What the judgement reads from a scan, seen from either direction of a neuron.

A gated-MLP neuron's sign is arbitrary: negating row ``n`` of ``up_proj`` and column ``n`` of ``down_proj`` leaves
the model unchanged and turns activation ``a`` into ``-a``. So every score is computed for both *directions*:
``+`` reads ``a``, ``-`` reads ``-a``. :class:`LayerFeatures` collects one layer's statistics from the scan
state; :meth:`LayerFeatures.view` returns a :class:`DirectionView` in which the activation is ``s * a``, with every
statistic re-expressed in that convention:

* histogram bins ordered from the extreme of the direction inwards (``+``: overflow bin first; ``-``: underflow
  bin first), each with its *inner edge*, the smallest value of ``s * a`` the bin can hold. The inner edges of a
  direction are ``top - width * j / n_bins`` with ``top = hi`` (``+``) or ``-lo`` (``-``), so a neuron and its
  flipped twin (whose calibrated range is ``[-hi, -lo]``) get bit-identical edges;
* per-category histograms in the same order, category means ``s * mean``;
* the top-k windows by maximum (``+``) or the bottom-k by minimum (``-``), both stored as values of ``s * a``,
  with the token id and concept labels of each window's peak token (from the windows the scan kept);
* the position-0 value ``s * first_mean`` (with a prepended BOS every window's position 0 is the same token in the
  same context, so the mean is its value) and the range of the neuron over all tokens.

Measurement never imports judgement; this module only reads a :class:`~neuronhunter.stats.state.ScanState`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..stats.layer import LayerStats
    from ..stats.state import ScanState

DIRECTIONS = ("+", "-")


def word_type(token: str) -> str:
    """The word type of a token string: surrounding white space dropped, lower-cased (`` By`` and ``by`` are one
    type; BPE pieces stay as they are); a white-space token is shown with ``\\n``, ``\\t`` and ``␣``."""
    return token.strip().lower() or token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣")


@dataclass
class DirectionView:
    """One layer's statistics in the convention ``s * a`` of a direction ``s`` (see the module docstring).

    Shapes: ``d`` neurons, ``B`` histogram bins (under/overflow included), ``C`` categories (+1 row: unlabelled),
    ``k`` top-k entries.
    """

    direction: str
    counts: np.ndarray  # [d, B] extreme bin first
    edges: np.ndarray  # [d, B] inner edge of each bin (decreasing; -inf for the far end)
    cat_counts: np.ndarray  # [C+1, d, B]
    cat_mean: np.ndarray  # [C+1, d]
    cat_std: np.ndarray  # [C+1, d]
    top_values: np.ndarray  # [k, d] descending (NaN for empty slots)
    top_pos: np.ndarray  # [k, d] window position of each peak
    top_type: np.ndarray  # [k, d] word-type index of each peak token (-1 for empty slots)
    top_bits: np.ndarray  # [k, d] int64 label bits of each peak token (0 for empty slots)
    first: np.ndarray  # [d] the position-0 value (NaN when position 0 was never seen)
    extreme: np.ndarray  # [d] the largest value of s * a on counted tokens


@dataclass
class LayerFeatures:
    """One layer's statistics as the judgement needs them (direction-free; see :meth:`view`).

    Attributes:
        layer, d: the layer and its number of neurons.
        categories: the lexicon's categories (rows of the per-category arrays; a last row is "unlabelled").
        n_tokens: counted tokens (the same for every neuron).
        hist: ``[d, B]`` counts; ``lo``, ``hi``: ``[d]`` the histogram range; ``n_bins``: inner bins.
        cat_hist: ``[C+1, d, B]``; ``cat_count``: ``[C+1]`` labelled tokens per category.
        cat_mean, cat_std: ``[C+1, d]``.
        mean, std, max, min: ``[d]`` over counted tokens.
        first_mean, first_max, first_min: ``[d]`` at position 0 (NaN when never seen).
        top, bottom: ``(values [k, d], pos [k, d], type [k, d], bits [k, d])`` of the top-k windows by maximum
            (values ``a``) and the bottom-k by minimum (values ``-a``).
        types: the word types indexed by the ``type`` arrays.
    """

    layer: int
    d: int
    categories: list[str]
    n_tokens: int
    hist: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n_bins: int
    cat_hist: np.ndarray
    cat_count: np.ndarray
    cat_mean: np.ndarray
    cat_std: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    max: np.ndarray
    min: np.ndarray
    first_mean: np.ndarray
    first_max: np.ndarray
    first_min: np.ndarray
    top: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    bottom: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    types: list[str]

    @property
    def scale(self) -> float:
        """The layer's activation scale: the median over its neurons of each neuron's standard deviation (the
        same in both directions). Floors are multiples of it, so that noise cannot score."""
        std = self.std[np.isfinite(self.std)]
        return float(np.median(std)) if std.size else 0.0

    @property
    def range(self) -> np.ndarray:
        """``[d]`` max - min of the activation over counted tokens and position 0 (direction-free)."""
        hi = np.fmax(self.max, np.nan_to_num(self.first_max, nan=-np.inf))
        lo = np.fmin(self.min, np.nan_to_num(self.first_min, nan=np.inf))
        out = hi - lo
        return np.where(np.isfinite(out), out, 0.0)

    def view(self, direction: str) -> DirectionView:
        """The statistics in the convention ``s * a`` of ``direction`` (``"+"`` or ``"-"``)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be '+' or '-', not {direction!r}")
        nb = self.n_bins
        width = self.hi - self.lo
        steps = np.arange(nb + 1, dtype=np.float64) / nb
        if direction == "+":
            top = self.hi
            counts, cat_counts = self.hist[:, ::-1], self.cat_hist[:, :, ::-1]
            values, pos, typ, bits = self.top
            sign = 1.0
            first, extreme = self.first_mean, self.max
        else:
            top = -self.lo
            counts, cat_counts = self.hist, self.cat_hist
            values, pos, typ, bits = self.bottom
            sign = -1.0
            first, extreme = -self.first_mean, -self.min
        inner = top[:, None] - width[:, None] * steps[None, :]  # [d, nb+1]: the extreme bin's edge first
        edges = np.concatenate([inner, np.full((self.d, 1), -np.inf)], axis=1)
        return DirectionView(direction=direction, counts=np.ascontiguousarray(counts),
                             edges=edges, cat_counts=np.ascontiguousarray(cat_counts),
                             cat_mean=sign * self.cat_mean, cat_std=self.cat_std, top_values=values, top_pos=pos,
                             top_type=typ, top_bits=bits, first=first, extreme=extreme)


def _peaks(values: np.ndarray, window: np.ndarray, pos: np.ndarray, state: ScanState,
           type_of: Callable[[int], int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peak token word types and label bits of top-k entries ``[k, d]`` (from the windows the scan kept)."""
    valid = window >= 0
    vals = np.where(valid, values.astype(np.float64), np.nan)
    typ = np.full(window.shape, -1, dtype=np.int64)
    bits = np.zeros(window.shape, dtype=np.int64)
    wids = np.unique(window[valid])
    wins = [state.windows.get(int(w)) for w in wids]
    length = max((len(w.ids) for w in wins if w is not None), default=0)
    ids = np.full((len(wids), length + 1), -1, dtype=np.int64)  # a last column of -1 for missing windows
    labels = np.zeros((len(wids), length + 1), dtype=np.int64)
    for row, win in enumerate(wins):
        if win is not None:
            ids[row, : len(win.ids)] = win.ids
            if win.labels is not None:
                labels[row, : len(win.labels)] = win.labels
    rows = np.searchsorted(wids, window[valid])
    cols = np.minimum(pos[valid].astype(np.int64), length)
    tok = ids[rows, cols]
    found = tok >= 0
    uniq, inverse = np.unique(tok[found], return_inverse=True)
    mapped = np.array([type_of(int(t)) for t in uniq], dtype=np.int64)
    t_valid = np.full(tok.shape, -1, dtype=np.int64)
    t_valid[found] = mapped[inverse.reshape(-1)] if len(uniq) else []
    typ[valid] = t_valid
    bits[valid] = np.where(found, labels[rows, cols], 0)
    return vals, pos.astype(np.int64), typ, bits


def layer_features(state: ScanState, layer: int, categories: list[str], decode: Callable[[int], str],
                   types: dict[str, int] | None = None, type_names: list[str] | None = None) -> LayerFeatures:
    """Collect :class:`LayerFeatures` of one layer of a scan state.

    Args:
        state: the scan state (a hunt's, or a run's ``stats.pt``).
        layer: the layer.
        categories: the lexicon's categories (must equal the scan's).
        decode: token id -> token string (for word types).
        types, type_names: a shared word-type index (filled in place), so types are comparable across layers.
    """
    ls: LayerStats = state.layers[layer]
    cs = ls.concepts
    if cs is None:
        raise ValueError(f"layer {layer} has no concept statistics (scan without a lexicon)")
    if list(cs.categories) != list(categories):
        raise ValueError("the scan's categories differ from the requested ones")
    types = {} if types is None else types
    type_names = [] if type_names is None else type_names
    cache: dict[int, int] = {}

    def type_of(token_id: int) -> int:
        t = cache.get(token_id)
        if t is None:
            name = word_type(decode(token_id))
            t = types.get(name)
            if t is None:
                t = types[name] = len(type_names)
                type_names.append(name)
            cache[token_id] = t
        return t

    summary = ls.moments.summary()
    pos = ls.positions
    seen0 = int(pos.count[0]) > 0
    first_mean = pos.means()[0].numpy() if seen0 else np.full(ls.d, np.nan)
    top = _peaks(ls.topk.values.numpy(), ls.topk.window.numpy(), ls.topk.pos.numpy(), state, type_of)
    bottom = _peaks(ls.bottomk.values.numpy(), ls.bottomk.window.numpy(), ls.bottomk.pos.numpy(), state, type_of)
    if cs.hist is None:
        from ..errors import RunDirError

        raise RunDirError("the scan has no per-category histograms (an older version scanned it); hunt it again")
    return LayerFeatures(
        layer=layer, d=ls.d, categories=list(categories), n_tokens=int(ls.moments.count),
        hist=ls.hist.counts.numpy().astype(np.int64), lo=ls.hist.lo.numpy().astype(np.float64),
        hi=ls.hist.hi.numpy().astype(np.float64), n_bins=ls.hist.n_bins,
        cat_hist=cs.hist.numpy().astype(np.int64), cat_count=cs.count.numpy().astype(np.int64),
        cat_mean=np.nan_to_num(cs.means().numpy(), nan=0.0), cat_std=cs.stds().numpy(),
        mean=summary["mean"].numpy(), std=summary["std"].numpy(),
        max=ls.moments.max.double().numpy(), min=ls.moments.min.double().numpy(),
        first_mean=first_mean,
        first_max=pos.first_max.double().numpy() if seen0 else np.full(ls.d, np.nan),
        first_min=pos.first_min.double().numpy() if seen0 else np.full(ls.d, np.nan),
        top=top, bottom=bottom, types=type_names,
    )
