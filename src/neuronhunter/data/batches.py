"""Tokenising documents into fixed-length windows and batches.

Each document is tokenised once (with character offsets, so concept labels can be attached to words) and cut into
consecutive windows of ``context_length`` tokens. With ``prepend_bos`` every window starts with the model's BOS
token, so position 0 is always BOS; without it, position 0 is the window's first real token. Either way position 0
is "the sequence starter" that the scan tracks separately (see :mod:`neuronhunter.scan`).

The stream is deterministic: same corpus, tokenizer and settings give the same windows in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .corpus import Document


class TokenLabeller(Protocol):
    """Labels tokens with concept categories from the document text and the tokens' character offsets."""

    categories: list[str]

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        """Return a bool array ``[n_tokens, n_categories]`` (a token may carry several labels or none)."""
        ...


@dataclass
class Window:
    """One window of one document: ``ids`` includes the BOS token when one was prepended."""

    window_id: int
    doc_id: int
    start: int  # index of the window's first real token within the document's tokens
    ids: list[int]
    labels: np.ndarray | None  # [len(ids), categories] (BOS row all False)
    source: str = ""  # the document's source (file name, row)


@dataclass
class TokenBatch:
    """A batch of windows, right-padded.

    Attributes:
        input_ids: ``[batch, pos]`` token ids.
        attention_mask: ``[batch, pos]`` 1 for real tokens (BOS included), 0 for padding.
        doc_ids, starts, window_ids: ``[batch]`` where each window came from.
        labels: ``[batch, pos, categories]`` bool concept labels, or None without a labeller.
        has_bos: whether position 0 of every row is a prepended BOS token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    doc_ids: Tensor
    starts: Tensor
    window_ids: Tensor
    labels: Tensor | None
    has_bos: bool

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def tokenize_document(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (no special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def iter_windows(
    docs: Iterable[Document],
    tokenizer: Any,
    *,
    context_length: int,
    bos_token_id: int | None,
    labeller: TokenLabeller | None = None,
    max_tokens: int | None = None,
) -> Iterator[Window]:
    """Cut documents into windows of at most ``context_length`` tokens (BOS included when given).

    Args:
        max_tokens: stop after this many real (non-BOS) tokens.
    """
    step = context_length - (1 if bos_token_id is not None else 0)
    if step < 1:
        raise ValueError("context_length too small")
    window_id = 0
    seen = 0
    n_cat = len(labeller.categories) if labeller is not None else 0
    for doc in docs:
        ids, offsets = tokenize_document(tokenizer, doc.text)
        labels = labeller.label(doc.text, offsets) if labeller is not None else None
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            if max_tokens is not None:
                chunk = chunk[: max_tokens - seen]
            if not chunk:
                return
            lab = None
            if labels is not None:
                lab = labels[start : start + len(chunk)]
                if bos_token_id is not None:
                    lab = np.concatenate([np.zeros((1, n_cat), dtype=bool), lab])
            if bos_token_id is not None:
                chunk = [bos_token_id, *chunk]
            yield Window(window_id, doc.doc_id, start, chunk, lab, doc.source)
            window_id += 1
            seen += len(chunk) - (1 if bos_token_id is not None else 0)
            if max_tokens is not None and seen >= max_tokens:
                return


def collate(windows: list[Window], *, pad_token_id: int, has_bos: bool, n_categories: int | None = None) -> TokenBatch:
    """Right-pad windows into a :class:`TokenBatch`."""
    width = max(len(w.ids) for w in windows)
    b = len(windows)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = None
    if n_categories is not None:
        labels = torch.zeros((b, width, n_categories), dtype=torch.bool)
    for i, w in enumerate(windows):
        n = len(w.ids)
        ids[i, :n] = torch.tensor(w.ids, dtype=torch.long)
        mask[i, :n] = 1
        if labels is not None and w.labels is not None:
            labels[i, :n] = torch.from_numpy(np.ascontiguousarray(w.labels))
    return TokenBatch(
        input_ids=ids,
        attention_mask=mask,
        doc_ids=torch.tensor([w.doc_id for w in windows], dtype=torch.long),
        starts=torch.tensor([w.start for w in windows], dtype=torch.long),
        window_ids=torch.tensor([w.window_id for w in windows], dtype=torch.long),
        labels=labels,
        has_bos=has_bos,
    )


def iter_batches(
    windows: Iterable[Window],
    *,
    batch_size: int,
    pad_token_id: int,
    has_bos: bool,
    n_categories: int | None = None,
) -> Iterator[tuple[TokenBatch, list[Window]]]:
    """Group windows into batches; yields ``(batch, windows)``."""
    buf: list[Window] = []
    for w in windows:
        buf.append(w)
        if len(buf) == batch_size:
            yield collate(buf, pad_token_id=pad_token_id, has_bos=has_bos, n_categories=n_categories), buf
            buf = []
    if buf:
        yield collate(buf, pad_token_id=pad_token_id, has_bos=has_bos, n_categories=n_categories), buf
