"""The held-out pass: one streaming forward over held-out text scores every explanation of every neuron.

Every rule-based explanation of a neuron ``n`` in direction ``s`` (+1 for ``+``, -1 for ``-``) is a set of
features ``j`` (:mod:`.features`) with weights ``w_j``; it predicts ``x_t = w_j`` on a token where feature ``j``
holds and ``0`` elsewhere. Everything its scores need is a sum over held-out tokens, so one pass accumulates, per
document fold ``k`` (two halves of the held-out documents, :func:`doc_fold`):

* per neuron: the moments of ``a`` (count, sum, sum of squares: :class:`~neuronhunter.stats.accumulators.Moments`),
  the number of *high* tokens ``s a > high_s`` and of *hard negatives* per direction;
* per (neuron, direction, feature) *pair*: the sum of ``a`` over the tokens where the feature holds, and how many
  of them are high / hard negatives;
* per feature: how many tokens it holds on (the same for every neuron).

**High** means above ``high_fraction`` of the neuron's typical top activation in that direction on the *train*
side (the median of its top-k window peaks); a **hard negative** is a token of the neuron's own top-token set
(its ``tokens`` explanation, :mod:`.candidates`) on which the neuron is *silent* (below ``silent_fraction`` of
that scale): the same tokens in contexts where the neuron does not fire. Both thresholds are fixed before the
held-out pass, from train statistics only.

Hot path per layer and batch (``T`` counted tokens, ``d`` neurons), no Python loop over neurons:

1. ``X = [a, high+, high-, hardneg+, hardneg-]``: ``[T, 5d]`` (the top-token-set membership of every token and
   neuron is one gather from a ``[tokens in batch, d]`` table);
2. dense features (categories, document start, domains): one product ``[2 * features, T] @ X``;
3. sparse features (tokens, neighbours, bigrams, positions): a join of the batch's feature occurrences with the
   layer's pairs sorted by feature (``searchsorted`` + ``repeat_interleave``), then gathers from ``X`` and
   ``index_add_`` into the pair accumulators: the work grows with the number of (token, pair) matches, not with
   ``T * d``;
4. per-fold totals: ``[2, T] @ X`` and the moments.

Everything is a sum, so two passes over disjoint documents merge by adding (:meth:`LayerScorer.merge`; tested
against one pass over both), which is what shards and resumption need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...stats.accumulators import Moments
from .features import BatchFeatures, FeatureSpace

F64 = torch.float64
CHANNELS = 5  # a, high+, high-, hardneg+, hardneg-


@dataclass
class Pairs:
    """The (neuron, direction, feature) pairs of one layer that some explanation uses.

    ``direction`` is 0 for ``+`` and 1 for ``-``; ``dense`` marks pairs of dense features.
    """

    neuron: np.ndarray
    direction: np.ndarray
    feature: np.ndarray
    n_dense: int

    def __len__(self) -> int:
        return len(self.neuron)


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
        self.n_dense = space.n_dense
        self.pair_neuron = torch.from_numpy(pairs.neuron.astype(np.int64))
        self.pair_dir = torch.from_numpy(pairs.direction.astype(np.int64))
        feature = torch.from_numpy(pairs.feature.astype(np.int64))
        dense = feature < space.n_dense
        self.dense_idx = torch.nonzero(dense).view(-1)
        sparse_idx = torch.nonzero(~dense).view(-1)
        order = torch.argsort(feature[sparse_idx], stable=True)
        self.sparse_pair = sparse_idx[order]
        self.sparse_feature = feature[self.sparse_pair].contiguous()
        self.dense_feature = feature[self.dense_idx]
        tn, td, tf = (torch.from_numpy(np.asarray(x, dtype=np.int64)) for x in tokset)
        order = torch.argsort(tf, stable=True)
        self.tok_neuron, self.tok_dir, self.tok_feature = tn[order], td[order], tf[order]
        self.sum = torch.zeros((2, self.n_pairs), dtype=F64)
        self.high_count = torch.zeros((2, self.n_pairs), dtype=torch.long)
        self.hard_count = torch.zeros((2, self.n_pairs), dtype=torch.long)
        self.moments = [Moments(d), Moments(d)]
        self.totals = torch.zeros((2, CHANNELS, d), dtype=F64)  # per fold: sum a, n high+-, n hardneg+-
        self.features: Any = None  # set by the state: a callable (wids, mask, labels) -> BatchFeatures

    # ------------------------------------------------------------------------------------------- hot path
    def update(self, act: Tensor, mask: Tensor, wids: Tensor, labels: Tensor | None) -> None:
        bf: BatchFeatures = self.features(wids, mask, labels)
        if bf.n_tokens == 0:
            return
        d = self.d
        a = act.reshape(-1, act.shape[-1])[bf.flat.to(act.device)].float().cpu()  # [T, d]
        for k in (0, 1):
            rows = a[bf.fold == k]
            if rows.shape[0]:
                self.moments[k].update(rows)
        member = self._membership(bf)  # [2, T, d] bool
        x = torch.empty((a.shape[0], CHANNELS * d), dtype=torch.float32)
        x[:, :d] = a
        x[:, d:2 * d] = a > self.high[0]
        x[:, 2 * d:3 * d] = -a > self.high[1]
        x[:, 3 * d:4 * d] = member[0] & (a <= self.silent[0])
        x[:, 4 * d:] = member[1] & (-a <= self.silent[1])
        self.totals += (bf.fold_onehot @ x).view(2, CHANNELS, d).double()
        if len(self.dense_idx) and bf.dense is not None:
            self._dense(bf, x)
        if len(self.sparse_pair) and len(bf.occ_feature):
            self._sparse(bf, x)

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

    def _dense(self, bf: BatchFeatures, x: Tensor) -> None:
        d, nd = self.d, self.n_dense
        sums = (bf.dense @ x).view(2, nd, CHANNELS, d)  # [fold, feature, channel, neuron]
        f, n, s = self.dense_feature, self.pair_neuron[self.dense_idx], self.pair_dir[self.dense_idx]
        for k in (0, 1):
            blk = sums[k]
            self.sum[k, self.dense_idx] += blk[f, 0, n].double()
            self.high_count[k, self.dense_idx] += blk[f, 1 + s, n].round().long()
            self.hard_count[k, self.dense_idx] += blk[f, 3 + s, n].round().long()

    def _sparse(self, bf: BatchFeatures, x: Tensor) -> None:
        d = self.d
        keys = self.sparse_feature
        lo = torch.searchsorted(keys, bf.occ_feature, right=False)
        hi = torch.searchsorted(keys, bf.occ_feature, right=True)
        cnt = hi - lo
        total = int(cnt.sum())
        if total == 0:
            return
        token = bf.occ_token.repeat_interleave(cnt)
        first = torch.cumsum(cnt, 0) - cnt
        slot = lo.repeat_interleave(cnt) + (torch.arange(total) - first.repeat_interleave(cnt))
        pair = self.sparse_pair[slot]
        neuron, direction = self.pair_neuron[pair], self.pair_dir[pair]
        flat = x.view(-1)
        base = token * (CHANNELS * d) + neuron
        index = bf.fold[token] * self.n_pairs + pair
        self.sum.view(-1).index_add_(0, index, flat[base].double())
        self.high_count.view(-1).index_add_(0, index, flat[base + (1 + direction) * d].long())
        self.hard_count.view(-1).index_add_(0, index, flat[base + (3 + direction) * d].long())

    # ------------------------------------------------------------------------------------------- state
    def referenced_windows(self) -> Tensor:  # the scanner prunes stored windows by this: none are kept
        return torch.zeros(0, dtype=torch.long)

    def check_mergeable(self, other: LayerScorer) -> None:
        if (other.layer, other.d, other.n_pairs) != (self.layer, self.d, self.n_pairs) or not (
                torch.equal(other.pair_neuron, self.pair_neuron) and torch.equal(other.high, self.high)):
            raise ValueError(f"cannot merge held-out statistics of layer {self.layer}: different explanations "
                             "or thresholds")

    def merge(self, other: LayerScorer) -> LayerScorer:
        self.check_mergeable(other)
        self.sum += other.sum
        self.high_count += other.high_count
        self.hard_count += other.hard_count
        self.totals += other.totals
        for mine, theirs in zip(self.moments, other.moments, strict=True):
            mine.merge(theirs)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "sum": self.sum, "high_count": self.high_count, "hard_count": self.hard_count,
                "totals": self.totals, "moments": [m.state_dict() for m in self.moments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sum"].shape != self.sum.shape:
            raise ValueError(f"held-out statistics of layer {self.layer} do not match these explanations")
        self.sum, self.high_count, self.hard_count = state["sum"], state["high_count"], state["hard_count"]
        self.totals = state["totals"]
        self.moments = [Moments.from_state_dict(m) for m in state["moments"]]
