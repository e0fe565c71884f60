"""The held-out pass: one streaming forward over held-out text scores every explanation of every neuron.

Every rule-based explanation of a neuron ``n`` in direction ``s`` (+1 for ``+``, -1 for ``-``) is a set of
features ``j`` (:mod:`.features`) with weights ``w_j``; it predicts ``x_t = w_j`` on a token where feature ``j``
holds and ``0`` elsewhere. Everything its scores need is a sum over held-out tokens, so one pass accumulates, per
document fold ``k`` (two halves of the held-out documents, :func:`doc_fold`):

* per neuron: the sufficient statistics of Pearson's r (tokens, sum of ``a``, sum of ``a²``), the number of *high*
  tokens ``s a > high_s`` and of *hard negatives* per direction;
* per (neuron, direction, feature) *pair*: the sum of ``a`` over the tokens where the feature holds, and how many
  of them are high / hard negatives;
* per feature: how many tokens it holds on (the same for every neuron).

**High** means above ``high_fraction`` of the neuron's typical top activation in that direction on the *train*
side (the median of its top-k window peaks); a **hard negative** is a token of the neuron's own top-token set
(its ``tokens`` explanation, :mod:`.candidates`) on which the neuron is *silent* (below ``silent_fraction`` of
that scale): the same tokens in contexts where the neuron does not fire. Both thresholds are fixed before the
held-out pass, from train statistics only.

Hot path per layer and batch (``T`` counted tokens, ``d`` neurons), no Python loop over neurons:

1. ``Y [T, 3, d]``: per token and neuron ``a`` and, per direction, a code ``high + BASE * hard negative`` (the two
   never hold together, so one float32 sum gives both counts exactly); the top-token-set membership of every
   token and neuron is one gather from a ``[tokens in batch, d]`` table;
2. *row path*, for features that many pairs of the layer share (``HEAVY``: frequent tokens such as "," or "the"
   sit in hundreds of token sets, "function word" in hundreds of category explanations): one sparse
   ``[2 * features, T]`` by ``Y`` product sums ``Y`` over each feature's tokens once, and every pair reads its
   values from the result;
3. *join path*, for the other features: the batch's feature occurrences are joined with the layer's pairs sorted
   by feature (``searchsorted`` + ``repeat_interleave``), then one gather of the pairs' values from ``Y`` and one
   ``index_add_`` into the pair accumulators: the work grows with the number of (token, pair) matches, not with
   ``T * d``. (On the embedded model a token of the row path costs about as much as ~40 matches: hence the
   split by the number of pairs per feature.)
4. per-fold totals: ``[2, T] @ Y`` and ``[2, T] @ a²``.

Everything is a sum, so two passes over disjoint documents merge by adding (:meth:`LayerScorer.merge`; tested
against one pass over both), which is what shards and resumption need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .features import BatchFeatures, FeatureSpace

F64 = torch.float64
MAX_CHUNK = 4000  # tokens per chunk: keeps the packed counts of a chunk exact in float32 (see LayerScorer._update)
BASE = float(MAX_CHUNK + 1)
HEAVY = 32  # a feature shared by this many pairs of a layer is summed once per batch (row path)


@dataclass
class Pairs:
    """The (neuron, direction, feature) pairs of one layer that some explanation uses.

    ``direction`` is 0 for ``+`` and 1 for ``-``; ``n_dense``: features below it are dense (:mod:`.features`).
    """

    neuron: np.ndarray
    direction: np.ndarray
    feature: np.ndarray
    n_dense: int

    def __len__(self) -> int:
        return len(self.neuron)


def decode(code: Tensor) -> tuple[Tensor, Tensor]:
    """``(high count, hard-negative count)`` from a sum of codes ``high + BASE * hard negative``."""
    hard = torch.floor(code / BASE)
    return code - hard * BASE, hard


class LayerScorer:
    """The held-out sufficient statistics of one layer (see the module docstring).

    Args:
        layer: the layer index; ``d``: its neurons.
        pairs: the pairs to accumulate.
        high, silent: ``[2, d]`` thresholds per direction (in the direction's units, i.e. on ``s a``).
        tokset: ``(neuron, direction, tok feature id)`` arrays: each neuron's top-token set per direction (for the
            hard negatives).
        space: the feature space (for the number of dense features).
    """

    def __init__(self, layer: int, d: int, pairs: Pairs, high: Tensor, silent: Tensor,
                 tokset: tuple[np.ndarray, np.ndarray, np.ndarray], space: FeatureSpace) -> None:
        self.layer, self.d = layer, d
        self.compile, self.full_batch = False, None  # set by the scanner; unused here
        self.high, self.silent = high.float(), silent.float()
        self.n_pairs = len(pairs)
        self.pair_neuron = torch.from_numpy(pairs.neuron.astype(np.int64))
        self.pair_dir = torch.from_numpy(pairs.direction.astype(np.int64))
        feature = torch.from_numpy(pairs.feature.astype(np.int64))
        # row path: features many pairs share; join path: the rest (see the module docstring). The accumulators
        # hold the row-path pairs first, then the join-path pairs sorted by feature ("slots"); ``slot_pair`` maps
        # a slot to its pair.
        uniq, inverse, per_feature = torch.unique(feature, return_inverse=True, return_counts=True)
        row = per_feature >= HEAVY
        self.row_features = uniq[row].contiguous()
        by_row = row[inverse]
        row_pairs = torch.nonzero(by_row).view(-1)
        local = torch.searchsorted(self.row_features, feature[row_pairs])
        n, s = self.pair_neuron[row_pairs], self.pair_dir[row_pairs]
        self.row_a = local * (3 * d) + n  # where each row pair's values sit in the row path's [R, 3 * d] sums
        self.row_code = self.row_a + (1 + s) * d
        join = torch.nonzero(~by_row).view(-1)
        join = join[torch.argsort(feature[join], stable=True)]
        self.join_feature = feature[join].contiguous()
        self.join_a = self.pair_neuron[join]  # offset of a pair's a / code in a token's row of Y
        self.join_code = self.join_a + (1 + self.pair_dir[join]) * d
        self.n_row = len(row_pairs)
        self.slot_pair = torch.cat([row_pairs, join])
        tn, td, tf = (torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in tokset)
        order = torch.argsort(tf, stable=True)
        self.tok_neuron, self.tok_dir, self.tok_feature = tn[order], td[order], tf[order]
        self.slots = torch.zeros((2, self.n_pairs, 2), dtype=F64)  # per fold and slot: sum of a, sum of codes
        self.count = torch.zeros(2, dtype=F64)  # tokens per fold
        self.sumsq = torch.zeros((2, d), dtype=F64)  # per fold: sum of a^2
        self.totals = torch.zeros((2, 3, d), dtype=F64)  # per fold and neuron: sum of a, sum of codes (+, -)
        self.features: Any = None  # set by the state: a callable (wids, mask, labels) -> BatchFeatures

    @property
    def acc(self) -> Tensor:
        """``[2, pairs, 2]``: per fold and pair, the sum of ``a`` and of the codes (pair order)."""
        out = torch.empty_like(self.slots)
        out[:, self.slot_pair] = self.slots
        return out

    @property
    def sum(self) -> Tensor:
        """``[2, pairs]`` sum of ``a`` over the tokens where the pair's feature holds, per fold."""
        return self.acc[..., 0]

    @property
    def high_count(self) -> Tensor:
        return decode(self.acc[..., 1])[0]

    @property
    def hard_count(self) -> Tensor:
        return decode(self.acc[..., 1])[1]

    def neuron_totals(self, folds: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(sum of a [d], high tokens [2, d], hard negatives [2, d])`` over the given folds (per direction)."""
        tot = self.totals[folds].sum(0)
        high, hard = decode(tot[1:])
        return tot[0], high, hard

    # ------------------------------------------------------------------------------------------- hot path
    def update(self, act: Tensor, mask: Tensor, wids: Tensor, labels: Tensor | None) -> None:
        whole: BatchFeatures = self.features(wids, mask, labels)
        acts = act.reshape(-1, act.shape[-1])
        for lo in range(0, whole.n_tokens, MAX_CHUNK):
            bf = whole.tokens(lo, lo + MAX_CHUNK)
            self._update(acts[bf.flat.to(act.device)].float().cpu(), bf)

    def _update(self, a: Tensor, bf: BatchFeatures) -> None:
        """One chunk: ``a [T, d]`` activations of the chunk's tokens (``T <= MAX_CHUNK``)."""
        t, d = a.shape
        member = self._membership(bf)  # [2, T, d] bool
        # Y[t] = (a, code of direction +, code of direction -) per neuron, code = high + BASE * hard negative (never
        # both): sums of codes over at most MAX_CHUNK tokens are exact in float32 (< 2**24) and over any number of
        # chunks in float64; both counts are decoded at the end (:func:`decode`)
        y = torch.empty((t, 3, d), dtype=torch.float32)
        y[:, 0] = a
        for s, v in ((0, a), (1, a.neg())):
            hard = torch.le(v, self.silent[s]).logical_and_(member[s])
            y[:, 1 + s].copy_(hard).mul_(BASE).add_(torch.gt(v, self.high[s]))
        flat = y.view(t, 3 * d)
        self.count += bf.fold_onehot.sum(1).double()
        self.sumsq += (bf.fold_onehot @ (a * a)).double()
        self.totals += (bf.fold_onehot @ flat).view(2, 3, d).double()
        if len(bf.occ_feature):
            if self.n_row:
                self._rows(bf, flat)
            if len(self.join_feature):
                self._join(bf, y.view(-1))

    def _membership(self, bf: BatchFeatures) -> Tensor:
        """``[2, T, d]``: token ``t`` is in neuron ``n``'s top-token set of direction ``s``."""
        t = bf.n_tokens
        out = torch.zeros((2, t, self.d), dtype=torch.bool)
        tf = bf.tok_feature
        present = tf >= 0
        if not len(self.tok_feature) or not bool(present.any()):
            return out
        uniq, local = torch.unique(tf[present], return_inverse=True)
        at = torch.searchsorted(uniq, self.tok_feature).clamp(max=len(uniq) - 1)
        hit = uniq[at] == self.tok_feature
        table = torch.zeros((2, len(uniq), self.d), dtype=torch.bool)
        table[self.tok_dir[hit], at[hit], self.tok_neuron[hit]] = True
        rows = torch.nonzero(present).view(-1)
        out[:, rows] = table[:, local]
        return out

    def _rows(self, bf: BatchFeatures, flat: Tensor) -> None:
        """Row path: per (fold, row feature) the sum of ``Y`` over its tokens (a sparse ``[2R, T]`` matrix times
        ``Y``), then each pair takes its two values."""
        nr = len(self.row_features)
        local = torch.searchsorted(self.row_features, bf.occ_feature).clamp(max=nr - 1)
        hit = self.row_features[local] == bf.occ_feature
        token = bf.occ_token[hit]
        index = torch.stack([bf.fold[token] * nr + local[hit], token])
        ones = torch.ones(index.shape[1], dtype=torch.float32)
        mat = torch.sparse_coo_tensor(index, ones, (2 * nr, bf.n_tokens), check_invariants=False)
        sums = torch.sparse.mm(mat, flat).view(2, -1)  # [fold, row feature * 3 * d]
        for k in (0, 1):
            self.slots[k, : self.n_row, 0] += sums[k][self.row_a]
            self.slots[k, : self.n_row, 1] += sums[k][self.row_code]

    def _join(self, bf: BatchFeatures, flat: Tensor) -> None:
        """Join path: the batch's feature occurrences joined with the join pairs (sorted by feature); ``flat``:
        ``Y`` flattened."""
        keys = self.join_feature
        lo = torch.searchsorted(keys, bf.occ_feature, right=False)
        cnt = torch.searchsorted(keys, bf.occ_feature, right=True) - lo
        total = int(cnt.sum())
        if total == 0:
            return
        token = bf.occ_token.repeat_interleave(cnt)
        first = torch.cumsum(cnt, 0) - cnt
        slot = torch.arange(total) + (lo - first).repeat_interleave(cnt)
        row = token * (3 * self.d)
        values = torch.stack([flat[row + self.join_a[slot]], flat[row + self.join_code[slot]]], 1)
        nj = len(keys)
        buf = torch.zeros((2 * nj, 2), dtype=torch.float32)  # exact per chunk (see _update)
        buf.index_add_(0, bf.fold[token] * nj + slot, values)
        self.slots[:, self.n_row:] += buf.view(2, nj, 2).double()

    # ------------------------------------------------------------------------------------------- state
    def check_mergeable(self, other: LayerScorer) -> None:
        if (other.layer, other.d, other.n_pairs) != (self.layer, self.d, self.n_pairs) or not (
                torch.equal(other.pair_neuron, self.pair_neuron) and torch.equal(other.high, self.high)):
            raise ValueError(f"cannot merge held-out statistics of layer {self.layer}: different explanations "
                             "or thresholds")

    STATE = ("slots", "count", "sumsq", "totals")

    def merge(self, other: LayerScorer) -> LayerScorer:
        self.check_mergeable(other)
        for name in self.STATE:
            getattr(self, name).add_(getattr(other, name))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, **{name: getattr(self, name) for name in self.STATE}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["slots"].shape != self.slots.shape:
            raise ValueError(f"held-out statistics of layer {self.layer} do not match these explanations")
        for name in self.STATE:
            setattr(self, name, state[name].clone())
