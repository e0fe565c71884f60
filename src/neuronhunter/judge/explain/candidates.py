"""Candidate explanations of every neuron and direction, derived from a run's *train* statistics only.

Inputs are what the scan kept (``stats.pt``): each neuron's exemplar windows in each direction (top-k / bottom-k
windows and the band samples, with the tokens of those windows and their concept labels), its per-position means,
its per-category histograms, and the scan's document sources (for domains). Nothing here reads held-out text.

**Evidence.** For neuron ``n`` and direction ``s`` the *high exemplars* are the exemplar peaks whose activation
``s a`` reaches ``high_fraction`` of the neuron's *scale* in that direction (the median of its top-k window peaks);
each carries its token, the tokens around it, their categories, its window position, its document position and
its document's domain, and is weighted by its activation.

**Candidates** (each a set of features of one family, :mod:`.features`, with a weight per feature):

* ``tokens``: the fewest normalised tokens that carry ``coverage`` (80%) of the high exemplars' activation mass,
  at most ``max_elements`` (8); weight = their mean exemplar activation. Always proposed when there is evidence.
* ``context``: the same greedy choice over the previous token, the next token and the (previous, current) bigram,
  proposed when the chosen keys carry at least half the mass; and "after / before a <category> word" when one
  category covers >= 30% of the mass of the neighbouring tokens and is >= 2x its train rate.
* ``category``: the two lexicon categories with the best train F1 for "this token is high", from the per-category
  histograms of *all* train tokens (not only exemplars).
* ``position``: window positions whose train mean activation in that direction is at least half the largest such
  mean and half the high threshold (from the per-position means); "the first 1 / 16 tokens of a document" when the
  high exemplars sit there (>= 30% / 50% of the mass).
* ``domain``: the document domains carrying 80% of the mass (at most 4, covering at most 90% of the train
  windows), when the corpus has more than one domain.
* baselines (never chosen as best): ``baseline_random``, random tokens of the same number, each drawn from the
  tokens of similar train frequency (same power of two), seeded by the neuron and the token set (so a relabelled
  neuron gets the same draw); ``baseline_top_token``, the single top token; ``baseline_category``, the lexicon
  category with the highest train mean in that direction (the label a category-mean method would give).

Everything is symmetric in the direction: a gated-MLP neuron with its sign relabelled gets the same candidates with
``+`` and ``-`` swapped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...stats.state import ScanState
from .features import DOCSTART, FeatureSpace, Vocabulary
from .scoring import Pairs

KINDS = ("tokens", "context", "category", "position", "domain", "text")
BASELINES = ("baseline_random", "baseline_top_token", "baseline_category")
DIRECTIONS = ("+", "-")


@dataclass(frozen=True)
class CandidateSettings:
    """Knobs of the derivation (recorded in the manifest)."""

    high_fraction: float = 0.5
    silent_fraction: float = 0.1
    coverage: float = 0.8
    max_elements: int = 8
    min_context_cover: float = 0.5
    neighbour_share: float = 0.3
    neighbour_lift: float = 2.0
    max_domains: int = 4
    seed: int = 0


@dataclass
class Block:
    """Candidates of one kind and family: ``keys [N, K]`` (-1 = no element), ``weights [N, K]`` (descending)."""

    kind: str
    family: str
    layer: np.ndarray
    neuron: np.ndarray
    direction: np.ndarray
    keys: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.layer)


@dataclass
class LayerCandidates:
    """The candidates of one layer with their features resolved to the layer's pairs."""

    pairs: Pairs
    neuron: np.ndarray
    direction: np.ndarray
    kind: np.ndarray  # object
    family: np.ndarray  # object
    keys: np.ndarray  # [N, K] family keys (-1 pad)
    feature: np.ndarray  # [N, K] feature ids (-1 pad)
    pair: np.ndarray  # [N, K] pair index (-1 pad)
    weight: np.ndarray  # [N, K]
    scale: np.ndarray  # [2, d]
    tokset: tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class CandidateSet:
    space: FeatureSpace
    layers: dict[int, LayerCandidates]
    settings: CandidateSettings
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_candidates(self) -> int:
        return sum(len(lc.neuron) for lc in self.layers.values())


# ------------------------------------------------------------------------------------------------ exemplars
@dataclass
class Evidence:
    """High exemplars of every neuron of a layer (one row each): ``group = neuron * 2 + direction``."""

    group: np.ndarray
    value: np.ndarray
    tok: np.ndarray
    prev: np.ndarray
    next: np.ndarray
    bits: np.ndarray
    prev_bits: np.ndarray
    next_bits: np.ndarray
    docpos: np.ndarray
    domain: np.ndarray


class WindowTable:
    """The run's stored windows as flat arrays (token ids, label bits), addressable by (window id, position)."""

    def __init__(self, state: ScanState, vocab: Vocabulary, domain_of: dict[str, int], bos: bool) -> None:
        wids = np.array(sorted(state.windows), dtype=np.int64)
        wins = [state.windows[int(w)] for w in wids]
        lengths = np.array([len(w.ids) for w in wins], dtype=np.int64)
        self.wids = wids
        self.offset = np.concatenate([[0], np.cumsum(lengths)])[:-1] if len(wins) else np.zeros(0, np.int64)
        self.length = lengths
        ids = np.concatenate([np.asarray(w.ids, dtype=np.int64) for w in wins]) if wins else np.zeros(0, np.int64)
        self.norm = vocab.norm_of[ids] if len(ids) else ids
        has_bits = bool(wins) and all(w.labels is not None for w in wins)
        self.bits = (np.concatenate([np.asarray(w.labels, dtype=np.int64) for w in wins]) if has_bits
                     else np.zeros(len(ids), dtype=np.int64))
        self.start = np.array([w.start for w in wins], dtype=np.int64)
        self.domain = np.array([domain_of.get(w.source, -1) for w in wins], dtype=np.int64)
        self.bos = bos

    def locate(self, wid: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.wids, wid).clip(max=max(len(self.wids) - 1, 0))
        return np.where((len(self.wids) > 0) & (self.wids[at] == wid), at, -1)

    def token_counts(self, first: int) -> np.ndarray:
        """How often each normalised token occurs in the stored windows (counted positions only)."""
        keep = np.ones(len(self.norm), dtype=bool)
        for p in range(first):
            keep[self.offset + p] = False
        return np.bincount(self.norm[keep], minlength=0)


def layer_evidence(ls: Any, table: WindowTable, high: np.ndarray) -> Evidence:
    """The high exemplars of one layer (``high [2, d]``: thresholds per direction in the direction's units)."""
    parts = []
    for direction, (top, bands) in enumerate(((ls.topk, ls.bands_pos), (ls.bottomk, ls.bands_neg))):
        d = top.values.shape[1]
        nb = bands.window.shape[0] * bands.window.shape[1]
        value = torch.cat([top.values, bands.value.reshape(nb, d)]).numpy()
        window = torch.cat([top.window, bands.window.reshape(nb, d)]).numpy()
        pos = torch.cat([top.pos.long(), bands.pos.reshape(nb, d).long()]).numpy()
        neuron = np.broadcast_to(np.arange(d), value.shape)
        ok = (window >= 0) & np.isfinite(value) & (value >= high[direction][None, :]) & (high[direction] > 0)[None]
        parts.append((neuron[ok], np.full(int(ok.sum()), direction), value[ok], window[ok], pos[ok]))
    neuron, direction, value, window, pos = (np.concatenate(x) for x in zip(*parts, strict=True))
    # the same (window, position) may be a top exemplar and a band sample: count it once
    key = np.stack([neuron * 2 + direction, window, pos])
    _, first = np.unique(key, axis=1, return_index=True)
    first.sort()
    neuron, direction, value, window, pos = (x[first] for x in (neuron, direction, value, window, pos))
    w = table.locate(window)
    ok = w >= 0
    neuron, direction, value, pos, w = neuron[ok], direction[ok], value[ok], pos[ok], w[ok]
    at = table.offset[w] + pos
    length = table.length[w]
    has_prev = pos >= 1
    has_next = pos + 1 < length
    tok = table.norm[at]
    prev = np.where(has_prev, table.norm[np.maximum(at - 1, 0)], -1)
    nxt = np.where(has_next, table.norm[np.minimum(at + 1, len(table.norm) - 1)], -1)
    bits = table.bits[at]
    prev_bits = np.where(has_prev, table.bits[np.maximum(at - 1, 0)], 0)
    next_bits = np.where(has_next, table.bits[np.minimum(at + 1, len(table.bits) - 1)], 0)
    docpos = table.start[w] + pos - (1 if table.bos else 0)
    return Evidence(neuron * 2 + direction, value.astype(np.float64), tok, prev, nxt, bits, prev_bits, next_bits,
                    docpos, table.domain[w])


# ------------------------------------------------------------------------------------------------ greedy choice
def greedy_keys(group: np.ndarray, key: np.ndarray, value: np.ndarray, total: tuple[np.ndarray, np.ndarray], *,
                coverage: float, max_k: int, min_cover: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group, the keys with the largest activation mass until ``coverage`` of the group's mass is reached
    (at most ``max_k``); groups whose chosen keys carry less than ``min_cover`` of the mass are dropped.

    Args:
        group, key, value: one row per exemplar (key -1: the exemplar has no key in this family).
        total: ``(groups, mass)`` sorted: every group's mass over all its exemplars (:func:`group_mass`).

    Returns ``(groups [G], keys [G, max_k] (-1 pad), weights [G, max_k])``, weight = mean value of the key, keys in
    descending order of mass (ties: smaller key first).
    """
    ok = key >= 0
    group, key, value = group[ok], key[ok], value[ok]
    if not len(group):
        return np.zeros(0, np.int64), np.zeros((0, max_k), np.int64), np.zeros((0, max_k))
    order = np.lexsort((key, group))
    group, key, value = group[order], key[order], value[order]
    new = np.ones(len(group), dtype=bool)
    new[1:] = (group[1:] != group[:-1]) | (key[1:] != key[:-1])
    starts = np.nonzero(new)[0]
    ug, uk = group[starts], key[starts]
    mass = np.add.reduceat(value, starts)
    mean = mass / np.diff(np.append(starts, len(group)))
    order = np.lexsort((uk, -mass, ug))
    ug, uk, mass, mean = ug[order], uk[order], mass[order], mean[order]
    gstart = np.ones(len(ug), dtype=bool)
    gstart[1:] = ug[1:] != ug[:-1]
    gidx = np.cumsum(gstart) - 1
    first = np.nonzero(gstart)[0]
    rank = np.arange(len(ug)) - first[gidx]
    groups = ug[first]
    gm = total[1][np.searchsorted(total[0], groups)]
    cum = np.cumsum(mass)
    cum_before = cum - mass - (cum[first] - mass[first])[gidx]
    keep = (rank < max_k) & (cum_before < coverage * gm[gidx])
    keys = np.full((len(groups), max_k), -1, dtype=np.int64)
    weights = np.zeros((len(groups), max_k))
    keys[gidx[keep], rank[keep]] = uk[keep]
    weights[gidx[keep], rank[keep]] = mean[keep]
    covered = np.bincount(gidx[keep], weights=mass[keep], minlength=len(groups)) / np.maximum(gm, 1e-30)
    sel = covered >= min_cover
    return groups[sel], keys[sel], weights[sel]


def group_mass(group: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(groups, total value)`` with groups sorted."""
    ug, inverse = np.unique(group, return_inverse=True)
    return ug, np.bincount(inverse, weights=value, minlength=len(ug))


# ------------------------------------------------------------------------------------------------ derivation
def direction_scale(ls: Any) -> np.ndarray:
    """``[2, d]``: each neuron's scale per direction, the median of its top-k (bottom-k) window peaks on the train
    side, in the direction's units (NaN without exemplars)."""
    out = []
    for top in (ls.topk, ls.bottomk):
        v = torch.where((top.window >= 0) & torch.isfinite(top.values), top.values.double(),
                        torch.tensor(float("nan"), dtype=torch.float64))
        out.append(torch.nanmedian(v, dim=0).values.numpy() if v.shape[0] else np.full(v.shape[1], np.nan))
    return np.stack(out)


def _block(kind: str, family: str, layer: int, groups: np.ndarray, keys: np.ndarray, weights: np.ndarray) -> Block:
    return Block(kind, family, np.full(len(groups), layer, dtype=np.int64), groups // 2, groups % 2, keys, weights)


def _single(kind: str, family: str, layer: int, groups: np.ndarray, keys: np.ndarray, width: int) -> Block:
    k = np.full((len(groups), width), -1, dtype=np.int64)
    w = np.zeros((len(groups), width))
    k[:, 0], w[:, 0] = keys, 1.0
    return _block(kind, family, layer, groups, k, w)


def _neighbour_category(ev: Evidence, bits: np.ndarray, total: tuple[np.ndarray, np.ndarray], base: np.ndarray,
                        s: CandidateSettings) -> tuple[np.ndarray, np.ndarray]:
    """Groups and the category that covers the most mass of the neighbouring tokens (share and lift rules)."""
    if not len(ev.group) or not len(base):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    gi = np.searchsorted(total[0], ev.group)
    shares = np.stack([np.bincount(gi, weights=ev.value * ((bits >> c) & 1), minlength=len(total[0]))
                       for c in range(len(base))], axis=1) / np.maximum(total[1], 1e-30)[:, None]
    lift = shares / np.maximum(base, 1e-12)[None, :]
    score = np.where((shares >= s.neighbour_share) & (lift >= s.neighbour_lift), shares, -1.0)
    best = score.argmax(1)
    ok = score[np.arange(len(best)), best] > 0
    return total[0][ok], best[ok]


def _tail_masks(ls: Any, high: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``[d, bins + 2]`` bool: the histogram bins above ``high[0]`` and below ``-high[1]`` (bin resolution)."""
    h = ls.hist
    edges = h.edges.numpy()  # [d, n + 1]
    d = edges.shape[0]
    lower = np.concatenate([np.full((d, 1), -np.inf), edges[:, :-1], edges[:, -1:]], axis=1)  # [d, n + 2]
    upper = np.concatenate([edges[:, :1], edges[:, 1:], np.full((d, 1), np.inf)], axis=1)
    above = lower >= high[0][:, None]
    above[:, -1] = True  # the overflow bin (values >= hi) counts as high
    below = upper <= -high[1][:, None]
    below[:, 0] = True
    return torch.from_numpy(above), torch.from_numpy(below)


def _categories(ls: Any, high: np.ndarray, layer: int, n_best: int, width: int) -> list[Block]:
    """Token-category candidates by train F1 (from the per-category histograms of all train tokens) and the
    lexicon-category baseline (the category with the highest train mean in the direction)."""
    cs = ls.concepts
    if cs is None or cs.hist is None:
        return []
    c = len(cs.categories)
    blocks = []
    above, below = _tail_masks(ls, high)
    means = cs.means()[:c].numpy()  # [C, d]
    counts = cs.count[:c].numpy().astype(np.float64)
    for direction, mask in enumerate((above, below)):
        valid = np.isfinite(high[direction]) & (high[direction] > 0)
        hi_c = (cs.hist[:c].long() * mask.unsqueeze(0)).sum(-1).numpy().astype(np.float64)  # [C, d]
        hi_all = (ls.hist.counts * mask).sum(-1).numpy().astype(np.float64)  # [d]
        precision = hi_c / np.maximum(counts, 1)[:, None]
        recall = hi_c / np.maximum(hi_all, 1)[None, :]
        f1 = np.where(hi_c >= 2, 2 * precision * recall / np.maximum(precision + recall, 1e-30), 0.0)
        order = np.argsort(-f1, axis=0, kind="stable")[:n_best]  # [n_best, d]
        for rank in range(order.shape[0]):
            cat = order[rank]
            ok = valid & (f1[cat, np.arange(f1.shape[1])] > 0)
            neurons = np.nonzero(ok)[0]
            blocks.append(_single("category", "cat", layer, neurons * 2 + direction, cat[ok], width))
        sign = 1.0 if direction == 0 else -1.0
        m = np.where((counts >= 5)[:, None] & np.isfinite(means), sign * means, -np.inf)
        best = m.argmax(0)
        ok = valid & np.isfinite(m[best, np.arange(m.shape[1])])
        neurons = np.nonzero(ok)[0]
        blocks.append(_single("baseline_category", "cat", layer, neurons * 2 + direction, best[ok], width))
    return blocks


def _positions(ls: Any, high: np.ndarray, layer: int, first: int, width: int) -> list[Block]:
    """Window positions whose train mean in the direction is high (see the module docstring)."""
    pos = ls.positions
    count = pos.count.numpy().astype(np.float64)
    means = (pos.sum.numpy() / np.maximum(count, 1)[:, None])  # [npos, d]
    means[count == 0] = np.nan
    means[:first] = np.nan
    blocks = []
    for direction in (0, 1):
        m = (1.0 if direction == 0 else -1.0) * means
        m = np.where(np.isfinite(m), m, -np.inf)
        top = np.argsort(-m, axis=0, kind="stable")[:width]  # [K, d]
        vals = np.take_along_axis(m, top, axis=0)
        mx = vals[0]
        thr = np.maximum(0.5 * mx, 0.5 * high[direction])
        ok = (vals >= thr[None, :]) & np.isfinite(vals) & (high[direction] > 0)[None, :]
        neurons = np.nonzero(ok[0])[0]
        keys = np.where(ok, top, -1).T[neurons]
        weights = np.where(ok, vals, 0.0).T[neurons]
        blocks.append(_block("position", "pos", layer, neurons * 2 + direction, keys, weights))
    return blocks


def derive_layer(layer: int, ls: Any, table: WindowTable, vocab: Vocabulary, s: CandidateSettings, *,
                 first: int, n_domains: int, domain_share: np.ndarray) -> tuple[list[Block], np.ndarray]:
    """Every candidate of one layer (blocks) and its ``[2, d]`` scales."""
    k = s.max_elements
    scale = direction_scale(ls)
    high = np.where(np.isfinite(scale) & (scale > 1e-6), s.high_fraction * scale, np.inf)
    ev = layer_evidence(ls, table, high)
    total = group_mass(ev.group, ev.value)
    blocks: list[Block] = []
    g, keys, w = greedy_keys(ev.group, ev.tok, ev.value, total, coverage=s.coverage, max_k=k)
    blocks.append(_block("tokens", "tok", layer, g, keys, w))
    bigram = np.where(ev.prev >= 0, ev.prev * len(vocab) + ev.tok, -1)
    for family, key in (("prev", ev.prev), ("next", ev.next), ("bigram", bigram)):
        g, keys, w = greedy_keys(ev.group, key, ev.value, total, coverage=s.coverage, max_k=k,
                                 min_cover=s.min_context_cover)
        blocks.append(_block("context", family, layer, g, keys, w))
    cs = ls.concepts
    if cs is not None:
        c = len(cs.categories)
        base = cs.count[:c].numpy() / max(ls.moments.count, 1)
        for family, bits in (("prevcat", ev.prev_bits), ("nextcat", ev.next_bits)):
            g, cat = _neighbour_category(ev, bits, total, base, s)
            blocks.append(_single("context", family, layer, g, cat, k))
    blocks.extend(_categories(ls, high, layer, 2, k))
    blocks.extend(_positions(ls, high, layer, first, k))
    if len(ev.group):
        gi = np.searchsorted(total[0], ev.group)
        share1 = np.bincount(gi, weights=ev.value * (ev.docpos < DOCSTART[0]), minlength=len(total[0])) / total[1]
        share16 = np.bincount(gi, weights=ev.value * (ev.docpos < DOCSTART[1]), minlength=len(total[0])) / total[1]
        key = np.where(share1 >= 0.3, DOCSTART[0], np.where(share16 >= 0.5, DOCSTART[1], -1))
        ok = key > 0
        blocks.append(_single("position", "docstart", layer, total[0][ok], key[ok], k))
    if n_domains >= 2:
        g, keys, w = greedy_keys(ev.group, ev.domain, ev.value, total, coverage=s.coverage, max_k=s.max_domains,
                                 min_cover=s.min_context_cover)
        covered = np.where(keys >= 0, domain_share[np.maximum(keys, 0)], 0.0).sum(1)
        ok = covered < 0.9
        pad = np.full((int(ok.sum()), k), -1, dtype=np.int64)
        padw = np.zeros((int(ok.sum()), k))
        pad[:, : keys.shape[1]], padw[:, : keys.shape[1]] = keys[ok], w[ok]
        blocks.append(_block("domain", "domain", layer, g[ok], pad, padw))
    return blocks, scale


def random_baseline(tokens: Block, counts: np.ndarray, seed: int) -> Block:
    """Random token sets of the same size as each ``tokens`` candidate, frequency-matched (see the module
    docstring)."""
    n_vocab = len(counts)
    bins = np.where(counts > 0, np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64) + 1, 0)
    pools = {int(b): np.nonzero(bins == b)[0] for b in np.unique(bins)}
    keys = np.full_like(tokens.keys, -1)
    cache: dict[tuple[int, int], np.ndarray] = {}
    for i in range(len(tokens)):
        own = [int(x) for x in tokens.keys[i] if x >= 0]
        digest = hashlib.blake2b(json.dumps([seed, int(tokens.layer[i]), int(tokens.neuron[i]), sorted(own)])
                                 .encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        taken = set(own)
        for j, key in enumerate(own):
            b = int(bins[key]) if key < n_vocab else 0
            for step in range(64):
                pool = _pool(pools, b, step, cache)
                if len(pool) <= len(taken):
                    continue
                for _ in range(32):  # rejection sampling: the pool is much larger than the taken set
                    pick = int(pool[rng.integers(len(pool))])
                    if pick not in taken:
                        keys[i, j] = pick
                        taken.add(pick)
                        break
                if keys[i, j] >= 0:
                    break
    return Block("baseline_random", "tok", tokens.layer, tokens.neuron, tokens.direction, keys,
                 tokens.weights.copy())


def _pool(pools: dict[int, np.ndarray], b: int, step: int, cache: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """Keys of frequency bins ``b - step`` and ``b + step`` (built once per pair)."""
    hit = cache.get((b, step))
    if hit is None:
        parts = [pools[x] for x in sorted({b - step, b + step}) if x in pools]
        hit = cache[(b, step)] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return hit


def top_token_baseline(tokens: Block) -> Block:
    keys = np.full_like(tokens.keys, -1)
    weights = np.zeros_like(tokens.weights)
    keys[:, 0], weights[:, 0] = tokens.keys[:, 0], 1.0
    return Block("baseline_top_token", "tok", tokens.layer, tokens.neuron, tokens.direction, keys, weights)


def assemble_layer(blocks: list[Block], space: FeatureSpace, scale: np.ndarray, d: int) -> LayerCandidates:
    """Resolve a layer's blocks to features and pairs (elements sorted by weight, descending)."""
    blocks = [b for b in blocks if len(b)]
    width = max((b.keys.shape[1] for b in blocks), default=1)
    neuron = np.concatenate([b.neuron for b in blocks]) if blocks else np.zeros(0, np.int64)
    direction = np.concatenate([b.direction for b in blocks]) if blocks else np.zeros(0, np.int64)
    kind = np.concatenate([np.full(len(b), b.kind, dtype=object) for b in blocks]) if blocks else np.zeros(0, object)
    family = np.concatenate([np.full(len(b), b.family, dtype=object) for b in blocks]) if blocks else kind.copy()
    keys = np.full((len(neuron), width), -1, dtype=np.int64)
    weights = np.zeros((len(neuron), width))
    feature = np.full((len(neuron), width), -1, dtype=np.int64)
    row = 0
    for b in blocks:
        n, kw = len(b), b.keys.shape[1]
        keys[row:row + n, :kw], weights[row:row + n, :kw] = b.keys, b.weights
        present = b.keys >= 0
        uk = np.unique(b.keys[present])
        fids = space.features(b.family, uk)
        feature[row:row + n, :kw][present] = fids[np.searchsorted(uk, b.keys[present])]
        row += n
    # elements by weight, descending (padding last)
    order = np.argsort(np.where(keys >= 0, -weights, np.inf), axis=1, kind="stable")
    keys, weights, feature = (np.take_along_axis(x, order, 1) for x in (keys, weights, feature))
    present = feature >= 0
    trip = np.stack([np.repeat(neuron, width), np.repeat(direction, width), feature.reshape(-1)])[:, present.reshape(-1)]
    uniq, inverse = np.unique(trip, axis=1, return_inverse=True)
    pair = np.full(keys.shape, -1, dtype=np.int64)
    pair[present] = inverse.reshape(-1)
    pairs = Pairs(uniq[0], uniq[1], uniq[2], space.n_dense)
    tok = (kind == "tokens")
    tp = present & tok[:, None]
    tokset = (np.repeat(neuron, width)[tp.reshape(-1)], np.repeat(direction, width)[tp.reshape(-1)], feature[tp])
    return LayerCandidates(pairs, neuron, direction, kind, family, keys, feature, pair, weights, scale, tokset)


def derive_candidates(state: ScanState, vocab: Vocabulary, *, categories: list[str], domains: list[str],
                      domain_of: dict[str, int], include_first: bool, bos: bool,
                      settings: CandidateSettings | None = None) -> CandidateSet:
    """Candidates for every neuron and direction of every layer of a run's (train) scan state.

    Args:
        state: the run's ``stats.pt`` state.
        vocab: the model's normalised vocabulary.
        categories: the lexicon's categories (the run's, in order); ``domains``: the corpus's domain names;
            ``domain_of``: document source -> domain index.
        include_first: whether the scan counted position 0; ``bos``: whether windows start with BOS.
    """
    s = settings or CandidateSettings()
    table = WindowTable(state, vocab, domain_of, bos)
    first = 0 if include_first else 1
    counts = table.token_counts(first)
    counts = np.pad(counts, (0, max(0, len(vocab) - len(counts))))
    win_tokens = np.bincount(np.maximum(table.domain, 0), weights=table.length, minlength=max(len(domains), 1))
    domain_share = win_tokens / max(win_tokens.sum(), 1)
    space = FeatureSpace(categories, domains if len(domains) >= 2 else [], len(vocab))
    layers: dict[int, LayerCandidates] = {}
    for layer in sorted(state.layers):
        ls = state.layers[layer]
        blocks, scale = derive_layer(layer, ls, table, vocab, s, first=first, n_domains=len(space.domains),
                                     domain_share=domain_share)
        tokens = blocks[0]
        blocks += [random_baseline(tokens, counts, s.seed), top_token_baseline(tokens)]
        layers[layer] = assemble_layer(blocks, space, scale, ls.d)
    space.freeze()
    info = {"stored_windows": len(table.wids), "train_tokens_in_windows": int(table.length.sum())}
    return CandidateSet(space, layers, s, info)


# ------------------------------------------------------------------------------------------------ rendering
def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render(family: str, kind: str, keys: list[int], vocab: Vocabulary, space: FeatureSpace) -> tuple[str, dict]:
    """``(explanation text, machine-readable rule)`` of one candidate."""
    n = len(vocab)
    cats, doms = space.categories, space.domains
    rule: dict[str, Any] = {"family": family}
    if family in ("tok", "prev", "next"):
        words = [vocab.strings[k] for k in keys]
        rule["tokens"] = words
        rule["token_ids"] = [vocab.token_ids(k) for k in keys]
        listed = ", ".join(_q(w) for w in words)
        text = {"tok": f"the tokens {listed}" if len(words) > 1 else f"the token {listed}",
                "prev": f"any token after {listed}", "next": f"any token before {listed}"}[family]
    elif family == "bigram":
        pairs = [(vocab.strings[k // n], vocab.strings[k % n]) for k in keys]
        rule["bigrams"] = [list(p) for p in pairs]
        rule["token_ids"] = [[vocab.token_ids(k // n), vocab.token_ids(k % n)] for k in keys]
        text = "; ".join(f"{_q(b)} after {_q(a)}" for a, b in pairs)
    elif family in ("cat", "prevcat", "nextcat"):
        name = cats[keys[0]]
        rule["category"] = name
        art = "an" if name[:1].lower() in "aeiou" else "a"
        text = {"cat": f"{art} {name} word", "prevcat": f"any token after {art} {name} word",
                "nextcat": f"any token before {art} {name} word"}[family]
    elif family == "pos":
        rule["positions"] = [int(k) for k in keys]
        text = ("window position " if len(keys) == 1 else "window positions ") + ", ".join(str(k) for k in keys)
    elif family == "docstart":
        rule["first_tokens"] = int(keys[0])
        text = "the first token of a document" if keys[0] == 1 else f"the first {keys[0]} tokens of a document"
    elif family == "domain":
        rule["domains"] = [doms[k] for k in keys]
        text = ("any token of a document in domain " if len(keys) == 1 else "any token of a document in domains ") \
            + ", ".join(doms[k] or "(root)" for k in keys)
    else:
        raise ValueError(f"unknown family {family!r}")
    if kind == "baseline_random":
        text = "random: " + text
        rule.pop("token_ids", None)  # a random draw is never verified; its token strings say what it was
    elif kind == "baseline_top_token":
        text = "top token only: " + text
    elif kind == "baseline_category":
        text = "lexicon category: " + text
    return text, rule
