"""Token features: the vocabulary rule-based explanations are written in, and their values on a batch.

A rule-based explanation (:mod:`.candidates`) is a set of *features* of one *family*; it predicts that the neuron
fires on a token when one of its features holds there. The families, and what a feature's key is:

==========  ============================================================  =========================
family      feature holds at token ``t`` when ...                         key
==========  ============================================================  =========================
``tok``     the token, normalised, is ``key``                             normalised token id
``prev``    the previous token (normalised) is ``key``                    normalised token id
``next``    the next token (normalised) is ``key``                        normalised token id
``bigram``  (previous, current) tokens, normalised, are ``key``           ``prev * V + tok``
``pos``     the token sits at window position ``key``                     position
``cat``     the token carries lexicon category ``key``                    category index
``prevcat`` the previous token carries category ``key``                   category index
``nextcat`` the next token carries category ``key``                       category index
``docstart``the token is among the first ``key`` tokens of its document   1 or 16
``domain``  the token's document has domain ``key``                       domain index
==========  ============================================================  =========================

**Normalisation** (:func:`normalise`): one leading space is dropped and the text lower-cased, so ``" Red"``,
``"red"`` and ``"RED"`` are one feature; byte pieces that do not decode on their own keep their raw token
string. The "previous token" of the first token after BOS is the BOS token; the last token of a window has no
"next" token (no feature).

Within the families ``tok``, ``prev``, ``next``, ``bigram``, ``pos``, ``docstart`` (one key at a time) and
``domain`` a token has exactly one key, so the features of one explanation never overlap: an explanation's
prediction is the weight of the one feature that holds (0 if none), and its sufficient statistics on held-out text
are sums over its features (:mod:`.scoring`). ``cat``/``prevcat``/``nextcat`` explanations have one feature each.

*Sparse* families (``tok``, ``prev``, ``next``, ``bigram``, ``pos``: many keys) are looked up key by key; *dense*
families (categories, document start, domains: few features, each on many tokens) have a fixed numbering and are
computed as a ``[tokens, features]`` mask. Either way a batch's features become one list of occurrences
``(token, feature)`` (:class:`BatchFeatures`); :mod:`.scoring` decides per feature how to sum over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

SPARSE_FAMILIES = ("tok", "prev", "next", "bigram", "pos")
DENSE_FAMILIES = ("cat", "prevcat", "nextcat", "docstart", "domain")
FAMILIES = SPARSE_FAMILIES + DENSE_FAMILIES
DOCSTART = (1, 16)  # "the first k tokens of a document"


def normalise(piece: str) -> str:
    """A token's text with one leading space dropped, lower-cased (``" Red"`` -> ``"red"``)."""
    if len(piece) > 1 and piece[0] == " ":
        piece = piece[1:]
    return piece.lower()


class Vocabulary:
    """The normalised vocabulary of a tokenizer.

    Attributes:
        norm_of: ``[vocab]`` int64, the normalised id of every token id.
        strings: the normalised strings (index = normalised id).
    """

    def __init__(self, tokenizer: Any) -> None:
        n = len(tokenizer)
        pieces = tokenizer.batch_decode([[i] for i in range(n)])
        raw = tokenizer.convert_ids_to_tokens(list(range(n)))
        index: dict[str, int] = {}
        norm = np.empty(n, dtype=np.int64)
        for i, (piece, tok) in enumerate(zip(pieces, raw, strict=True)):
            key = normalise(piece) if "\ufffd" not in piece else f"<{tok}>"
            norm[i] = index.setdefault(key, len(index))
        self.norm_of = norm
        self.strings = list(index)
        self.index = index
        self._ids: dict[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.strings)

    def token_ids(self, key: int) -> list[int]:
        """The token ids whose normalised form is ``key``."""
        if self._ids is None:
            order = np.argsort(self.norm_of, kind="stable")
            bounds = np.searchsorted(self.norm_of[order], np.arange(len(self.strings) + 1))
            self._ids = {k: order[bounds[k]:bounds[k + 1]].tolist() for k in range(len(self.strings))}
        return self._ids[int(key)]


class FeatureSpace:
    """A numbering of the features a set of explanations uses.

    Dense features come first, in a fixed layout (``cat``, ``prevcat``, ``nextcat`` per category, ``docstart``
    per :data:`DOCSTART`, ``domain`` per domain); sparse ones are numbered as candidates ask for them
    (:meth:`feature`). Call :meth:`freeze` before scoring.
    """

    def __init__(self, categories: list[str], domains: list[str], n_vocab: int) -> None:
        self.categories, self.domains, self.n_vocab = list(categories), list(domains), int(n_vocab)
        c = len(self.categories)
        self.dense_offset = {"cat": 0, "prevcat": c, "nextcat": 2 * c, "docstart": 3 * c,
                             "domain": 3 * c + len(DOCSTART)}
        self.n_dense = 3 * c + len(DOCSTART) + len(self.domains)
        self._sparse: dict[str, dict[int, int]] = {f: {} for f in SPARSE_FAMILIES}
        self.n_features = self.n_dense
        self.keys: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # family -> (sorted keys, feature ids)

    def feature(self, family: str, key: int) -> int:
        """The id of a feature (numbering a new sparse one on first use)."""
        if family in self.dense_offset:
            if family == "docstart":
                return self.dense_offset[family] + DOCSTART.index(int(key))
            return self.dense_offset[family] + int(key)
        table = self._sparse[family]
        fid = table.get(int(key))
        if fid is None:
            fid = table[int(key)] = self.n_features
            self.n_features += 1
        return fid

    def features(self, family: str, keys: np.ndarray) -> np.ndarray:
        """:meth:`feature` for many keys of one family."""
        return np.array([self.feature(family, int(k)) for k in keys], dtype=np.int64)

    def freeze(self) -> None:
        for family, table in self._sparse.items():
            keys = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
            ids = np.fromiter(table.values(), dtype=np.int64, count=len(table))
            order = np.argsort(keys)
            self.keys[family] = (keys[order], ids[order])

    def lookup(self, family: str, keys: Tensor) -> Tensor:
        """Feature ids of ``keys`` (int64 tensor) in a sparse family; -1 where a key is no feature (or is -1)."""
        sorted_keys, ids = self.keys[family]
        if not len(sorted_keys):
            return torch.full_like(keys, -1)
        sk, fi = torch.from_numpy(sorted_keys), torch.from_numpy(ids)
        at = torch.searchsorted(sk, keys).clamp(max=len(sk) - 1)
        return torch.where((sk[at] == keys) & (keys >= 0), fi[at], torch.full_like(keys, -1))

    def describe(self, fid: int) -> tuple[str, int]:
        """``(family, key)`` of a feature id."""
        if fid < self.n_dense:
            for family in reversed(DENSE_FAMILIES):
                off = self.dense_offset[family]
                if fid >= off:
                    k = fid - off
                    return family, (DOCSTART[k] if family == "docstart" else k)
        for family, table in self._sparse.items():
            for key, value in table.items():
                if value == fid:
                    return family, key
        raise KeyError(fid)


@dataclass
class BatchFeatures:
    """The features of the counted tokens of one batch (``T`` tokens, flattened in batch order).

    Attributes:
        flat: ``[T]`` index of each counted token in the flattened ``[batch * pos]`` activations.
        fold: ``[T]`` int64, the held-out fold (0/1) of the token's document.
        occ_token, occ_feature: every feature that holds (sparse and dense): token ``occ_token[i]`` has feature
            ``occ_feature[i]``.
        tok_feature: ``[T]`` the token's ``tok`` feature id (-1: none of the candidates' tokens).
        fold_onehot: ``[2, T]`` float32.
    """

    flat: Tensor
    fold: Tensor
    occ_token: Tensor
    occ_feature: Tensor
    tok_feature: Tensor
    fold_onehot: Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.flat.numel())

    def tokens(self, lo: int, hi: int) -> BatchFeatures:
        """The features of tokens ``lo .. hi - 1`` only (renumbered from 0)."""
        if lo == 0 and hi >= self.n_tokens:
            return self
        keep = (self.occ_token >= lo) & (self.occ_token < hi)
        return BatchFeatures(self.flat[lo:hi], self.fold[lo:hi], self.occ_token[keep] - lo, self.occ_feature[keep],
                             self.tok_feature[lo:hi], self.fold_onehot[:, lo:hi])


def shifted(x: Tensor, by: int, fill: int = -1) -> Tensor:
    """``x [batch, pos]`` shifted along positions: ``by=1`` gives the previous position's value, ``-1`` the next."""
    out = torch.full_like(x, fill)
    if by > 0:
        out[:, by:] = x[:, :-by]
    else:
        out[:, :by] = x[:, -by:]
    return out


def batch_features(space: FeatureSpace, vocab: Vocabulary, ids: Tensor, real: Tensor, keep: Tensor,
                   starts: Tensor, doc_domain: Tensor, doc_fold: Tensor, labels: Tensor | None, *,
                   bos: bool) -> tuple[BatchFeatures, Tensor]:
    """Compute the features of a batch.

    Args:
        ids: ``[B, P]`` token ids; ``real``: ``[B, P]`` bool real tokens; ``keep``: ``[B, P]`` bool counted tokens.
        starts: ``[B]`` each window's first real token's index in its document.
        doc_domain, doc_fold: ``[B]`` domain index (-1: none) and fold of each window's document.
        labels: ``[B, P, C]`` bool concept labels (None without a lexicon).
        bos: whether position 0 of every window is a prepended BOS token.

    Returns:
        the batch's features and ``[2, n_features]`` int64 counts of each feature per fold.
    """
    b, p = ids.shape
    norm = torch.from_numpy(vocab.norm_of)[ids]
    norm = torch.where(real, norm, torch.full_like(norm, -1))
    prev, nxt = shifted(norm, 1), shifted(norm, -1)
    flat = torch.nonzero(keep.reshape(-1)).view(-1)
    t = flat.numel()
    fold = doc_fold.view(b, 1).expand(b, p).reshape(-1)[flat]
    position = torch.arange(p).view(1, p).expand(b, p).reshape(-1)[flat]
    keys = {
        "tok": norm.reshape(-1)[flat],
        "prev": prev.reshape(-1)[flat],
        "next": nxt.reshape(-1)[flat],
        "pos": position,
    }
    pk, tk = keys["prev"], keys["tok"]
    keys["bigram"] = torch.where(pk >= 0, pk * space.n_vocab + tk, torch.full_like(pk, -1))
    occ_t, occ_f = [], []
    rows = torch.arange(t)
    tok_feature = torch.full((t,), -1, dtype=torch.long)
    for family in SPARSE_FAMILIES:
        fid = space.lookup(family, keys[family])
        if family == "tok":
            tok_feature = fid
        hit = fid >= 0
        occ_t.append(rows[hit])
        occ_f.append(fid[hit])
    fold_onehot = torch.stack([(fold == 0), (fold == 1)]).float()
    if space.n_dense:
        d = torch.zeros((t, space.n_dense), dtype=torch.bool)
        c = len(space.categories)
        if c and labels is not None:
            lab = labels.bool()
            prev_lab = torch.zeros_like(lab)
            prev_lab[:, 1:] = lab[:, :-1]
            next_lab = torch.zeros_like(lab)
            next_lab[:, :-1] = lab[:, 1:] & real[:, 1:].unsqueeze(-1)
            for family, value in (("cat", lab), ("prevcat", prev_lab), ("nextcat", next_lab)):
                off = space.dense_offset[family]
                d[:, off:off + c] = value.reshape(b * p, c)[flat]
        docpos = (starts.view(b, 1) + torch.arange(p).view(1, p) - (1 if bos else 0)).reshape(-1)[flat]
        for i, k in enumerate(DOCSTART):
            d[:, space.dense_offset["docstart"] + i] = docpos < k
        if space.domains:
            dom = doc_domain.view(b, 1).expand(b, p).reshape(-1)[flat]
            ok = dom >= 0
            d[rows[ok], space.dense_offset["domain"] + dom[ok]] = True
        tok_i, feat_i = torch.nonzero(d, as_tuple=True)
        occ_t.append(tok_i)
        occ_f.append(feat_i)
    occ_token, occ_feature = torch.cat(occ_t), torch.cat(occ_f)
    counts = torch.zeros((2, space.n_features), dtype=torch.long)
    counts.view(-1).index_add_(0, occ_feature + fold[occ_token] * space.n_features,
                               torch.ones_like(occ_feature))
    return BatchFeatures(flat, fold, occ_token, occ_feature, tok_feature, fold_onehot), counts
