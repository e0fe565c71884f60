"""Tokenising documents into fixed-length windows and batches.

Each document is tokenised (with character offsets, so concept labels can be attached to words) and cut into
consecutive windows of ``context_length`` tokens. With ``prepend_bos`` every window starts with the model's BOS
token, so position 0 is always BOS; without it, position 0 is the window's first real token. Either way position 0
is "the sequence starter" that the scan tracks separately (see :mod:`neuronhunter.scan`).

Bounded memory: a document longer than ``block_chars`` (65,536 characters by default) is tokenised in blocks
(:func:`iter_token_blocks`), read piece by piece from :meth:`~neuronhunter.data.corpus.Document.iter_text`, so
memory is bounded by a block and a batch, not by a document or a file. A block is cut only where a byte-level BPE
tokenizer (GPT-2, GPT-NeoX, SmolLM, Llama 3 style pre-tokenisation) has a pre-token boundary, so its ids and
offsets are exactly those of tokenising the whole text:

* before a single space between two non-space characters (``"foo| bar"``: the space starts the next word), or
* after a lone newline between two non-space characters (``"foo\\n|bar"``; not after ``"\\n\\n"`` or ``"\\r\\n"``,
  which at the end of a block would pre-tokenise as one whitespace piece),

preferring a newline in the last quarter of the block, else the last such space. The incomplete tail is carried
into the next block. Text with no such position in 16 blocks is cut at that length (tokens at that cut may then
differ from whole-text tokenisation). Before it first cuts a document, :func:`block_safe` checks a tokenizer on a
probe text (split there == whole); a tokenizer that fails (e.g. SentencePiece with a dummy prefix) gets whole
documents, as before. Concept labels are computed per block with up to 256 characters of text on either side
(cut at white space), so a word or multi-word entry across a cut is labelled as in the whole text.

The stream is deterministic: same corpus, tokenizer and settings give the same windows in the same order, whatever
the block size.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .corpus import Document

log = logging.getLogger(__name__)

BLOCK_CHARS = 65536  # characters tokenised in one call (a document at most this long is tokenised whole)
MAX_BLOCK_FACTOR = 16  # without a safe cut, a block grows up to this many times block_chars before a hard cut
LABEL_CONTEXT = 256  # characters of text on each side of a block that the labeller sees


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


@dataclass
class TokenBlock:
    """Tokens of one block of a document: ``offsets`` are character offsets into the whole document."""

    start: int  # character offset of the block's first character in the document
    ids: list[int]
    offsets: list[tuple[int, int]]
    labels: np.ndarray | None  # [len(ids), categories] with a labeller


_PROBE = ("The quick brown fox, don't jump! Over 12345 lazy dogs 6 7.\nNew  line\there;\r\nand (x) \"y\"\n\n"
          "  indented 'quoted' text's end.\n\nÜber café naïve -- déjà vu 日本語 テスト ok?\nx = f(a, b) + 3.14\n"
          "def f():\n    return {'a': [1, 2]}\n# comment's end\r\nlast line\n \nend")
_SAFE: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_SAFE_BY_ID: dict[int, bool] = {}


def _cut_ok_space(text: str, i: int) -> bool:
    return text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()


def _cut_ok_newline(text: str, i: int) -> bool:
    # a lone newline: "\n\n" or "\r\n" at the end of a block would pre-tokenise as one piece, not two
    return text[i - 1] == "\n" and i >= 2 and not text[i - 2].isspace() and not text[i].isspace()


def _find_cut(buf: str, limit: int) -> int | None:
    """The best cut position ``i`` (block = ``buf[:i]``) with ``1 <= i <= min(limit, len(buf) - 2)``, or None."""
    hi = min(limit, len(buf) - 2)
    lo = max(1, hi - hi // 4)
    j = buf.rfind("\n", lo - 1, hi)
    while j >= lo - 1:  # a newline followed by a non-space in the last quarter
        if _cut_ok_newline(buf, j + 1):
            return j + 1
        j = buf.rfind("\n", lo - 1, j)
    j = buf.rfind(" ", 1, hi + 1)
    while j >= 1:  # else the last single space between two non-spaces
        if _cut_ok_space(buf, j):
            return j
        j = buf.rfind(" ", 1, j)
    j = buf.rfind("\n", 0, lo - 1)
    while j >= 0:  # else any newline followed by a non-space
        if _cut_ok_newline(buf, j + 1):
            return j + 1
        j = buf.rfind("\n", 0, j)
    return None


def _context_before(tail: str) -> str:
    """The end of the text before a block, starting at a white-space character ("" if there is none)."""
    for k, c in enumerate(tail):
        if c.isspace():
            return tail[k:]
    return ""


def _context_after(text: str, at_end: bool) -> str:
    """The start of the text after a block, ending before a white-space character (all of it at the end)."""
    if at_end:
        return text
    for k in range(len(text) - 1, -1, -1):
        if text[k].isspace():
            return text[:k]
    return ""


def text_blocks(pieces: Iterable[str], block_chars: int = BLOCK_CHARS, *,
                context: int = LABEL_CONTEXT) -> Iterator[tuple[int, str, str, str]]:
    """Cut a text given in pieces into blocks of at most about ``block_chars`` characters at safe positions.

    Yields ``(start, before, block, after)``: the block's character offset, up to ``context`` characters of text
    before and after it (cut at white space, for labelling) and the block. Memory is bounded by the block size
    and the largest piece; the blocks concatenated are the text.
    """
    if block_chars < 1:
        raise ValueError("block_chars must be positive")
    it = iter(pieces)
    src, sp = "", 0  # the current piece and how much of it is used
    buf, start, tail = "", 0, ""
    done = False
    while True:
        limit = block_chars
        while True:
            need = limit + context + 2 - len(buf)
            parts = [buf]
            while need > 0 and not done:
                if sp >= len(src):
                    nxt = next(it, None)
                    if nxt is None:
                        done = True
                    else:
                        src, sp = nxt, 0
                    continue
                part = src[sp: sp + need]
                sp += len(part)
                need -= len(part)
                parts.append(part)
            buf = "".join(parts) if len(parts) > 1 else buf
            if done and len(buf) <= limit:
                if buf:
                    yield start, _context_before(tail), buf, ""
                return
            cut = _find_cut(buf, limit)
            if cut is not None:
                break
            if limit >= block_chars * MAX_BLOCK_FACTOR:
                cut = limit
                break
            limit = min(limit * 4, block_chars * MAX_BLOCK_FACTOR)
        block = buf[:cut]
        rest = buf[cut:]
        yield start, _context_before(tail), block, _context_after(rest[:context], done and len(rest) <= context)
        tail = (tail + block)[-context:] if len(block) < context else block[-context:]
        buf, start = rest, start + cut


def block_safe(tokenizer: Any) -> bool:
    """Whether tokenising a text in blocks cut at :func:`text_blocks` positions equals tokenising it whole.

    Checked once per tokenizer on a probe text, at every safe cut position.
    """
    try:
        cached = _SAFE.get(tokenizer)
    except TypeError:
        cached = _SAFE_BY_ID.get(id(tokenizer))
    if cached is not None:
        return cached
    ids, offsets = tokenize_document(tokenizer, _PROBE)
    ok = True
    for i in range(1, len(_PROBE) - 1):
        if not (_cut_ok_space(_PROBE, i) or _cut_ok_newline(_PROBE, i)):
            continue
        a_ids, a_off = tokenize_document(tokenizer, _PROBE[:i])
        b_ids, b_off = tokenize_document(tokenizer, _PROBE[i:])
        if a_ids + b_ids != ids or a_off + [(s + i, e + i) for s, e in b_off] != offsets:
            ok = False
            break
    if not ok:
        log.info("tokenizer %s does not tokenise cut text like whole text: documents are tokenised whole",
                 type(tokenizer).__name__)
    try:
        _SAFE[tokenizer] = ok
    except TypeError:
        _SAFE_BY_ID[id(tokenizer)] = ok
    return ok


def _one_block(tokenizer: Any, text: str, labeller: TokenLabeller | None) -> TokenBlock:
    ids, offsets = tokenize_document(tokenizer, text)
    return TokenBlock(0, ids, offsets, labeller.label(text, offsets) if labeller is not None else None)


def iter_token_blocks(tokenizer: Any, doc: Document | str, *, labeller: TokenLabeller | None = None,
                      block_chars: int = BLOCK_CHARS) -> Iterator[TokenBlock]:
    """Tokenise (and label) a document in blocks of about ``block_chars`` characters (see the module docstring).

    The blocks' ids concatenated are the document's token ids; a document of at most ``block_chars`` characters
    (or any document, with a tokenizer that fails :func:`block_safe`) is one block, tokenised in one call.
    """
    text = doc if isinstance(doc, str) else (doc.text if doc.in_memory else None)
    if text is not None and len(text) <= block_chars:
        if text:
            yield _one_block(tokenizer, text, labeller)
        return
    pieces: Iterable[str] = [text] if text is not None else doc.iter_text()  # type: ignore[union-attr]
    blocks = text_blocks(pieces, block_chars)
    first = next(blocks, None)
    if first is None:
        return
    second = next(blocks, None)
    if second is not None and not block_safe(tokenizer):
        yield _one_block(tokenizer, text if text is not None else doc.text, labeller)  # type: ignore[union-attr]
        return
    for start, before, block, after in itertools.chain([first], [second] if second is not None else [], blocks):
        ids, offsets = tokenize_document(tokenizer, block)
        labels = None
        if labeller is not None:
            shift = len(before)
            labels = labeller.label(before + block + after, [(s + shift, e + shift) for s, e in offsets])
        yield TokenBlock(start, ids, [(s + start, e + start) for s, e in offsets], labels)


def count_document_tokens(tokenizer: Any, doc: Document | str, *, block_chars: int = BLOCK_CHARS) -> int:
    """Number of tokens of a document, tokenised in bounded blocks."""
    return sum(len(b.ids) for b in iter_token_blocks(tokenizer, doc, block_chars=block_chars))


def iter_windows(
    docs: Iterable[Document],
    tokenizer: Any,
    *,
    context_length: int,
    bos_token_id: int | None,
    labeller: TokenLabeller | None = None,
    max_tokens: int | None = None,
    block_chars: int = BLOCK_CHARS,
) -> Iterator[Window]:
    """Cut documents into windows of at most ``context_length`` tokens (BOS included when given).

    Long documents are tokenised in blocks of about ``block_chars`` characters; the windows are the same as with
    whole-document tokenisation (see the module docstring).

    Args:
        max_tokens: stop after this many real (non-BOS) tokens.
    """
    step = context_length - (1 if bos_token_id is not None else 0)
    if step < 1:
        raise ValueError("context_length too small")
    window_id = 0
    seen = 0
    n_cat = len(labeller.categories) if labeller is not None else 0
    bos_row = np.zeros((1, n_cat), dtype=bool)
    for doc in docs:
        pos = 0  # token index (in the document) of ids[0]
        ids: list[int] = []
        labels: np.ndarray | None = None
        blocks = iter_token_blocks(tokenizer, doc, labeller=labeller, block_chars=block_chars)
        done = False
        while not done:
            blk = next(blocks, None)
            if blk is None:
                done = True
            else:
                ids.extend(blk.ids)
                if blk.labels is not None:
                    labels = blk.labels if labels is None or not len(labels) else np.concatenate([labels, blk.labels])
            i = 0
            while len(ids) - i >= step or (done and i < len(ids)):
                chunk = ids[i : i + step]
                if max_tokens is not None:
                    chunk = chunk[: max_tokens - seen]
                if not chunk:
                    return
                lab = None
                if labels is not None:
                    lab = labels[i : i + len(chunk)]
                    if bos_token_id is not None:
                        lab = np.concatenate([bos_row, lab])
                if bos_token_id is not None:
                    chunk = [bos_token_id, *chunk]
                yield Window(window_id, doc.doc_id, pos + i, chunk, lab, doc.source)
                window_id += 1
                seen += len(chunk) - (1 if bos_token_id is not None else 0)
                if max_tokens is not None and seen >= max_tokens:
                    return
                i += step
            if i:
                ids = ids[i:]
                labels = labels[i:] if labels is not None else None
                pos += i


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
