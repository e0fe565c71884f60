"""The train / held-out split of a corpus, by document.

Nothing that selects a claim about a neuron may also confirm it. Every judgement layer (hunt, explain, verify)
therefore works on documents: a scan that derives claims reads the ``train`` documents; scoring and causal tests
read the ``heldout`` ones (or another corpus). A document's side depends only on its stable id
(:attr:`Document.uid`, i.e. its source: file, file and line, row) and the split's seed, never on the order
documents are read, the number of workers or which other documents exist, so that

* the same document is on the same side in every command that reads the same corpus with the same split, and
* a sharded scan and a single-process scan see the same documents.

``fraction`` is the expected share of *documents* held out. With few documents the realised share varies
(:meth:`DocumentSplit.counts` reports what was realised; manifests record it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

Side = Literal["all", "train", "heldout"]
SIDES: tuple[str, ...] = ("all", "train", "heldout")


def unit_hash(uid: str, seed: int) -> float:
    """A number in ``[0, 1)`` from a stable hash of ``(seed, uid)`` (BLAKE2b; the same on every machine)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{uid}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@dataclass(frozen=True)
class DocumentSplit:
    """Which documents are held out: those whose :func:`unit_hash` is below ``fraction``.

    Args:
        fraction: the expected share of documents held out (0 < fraction < 1).
        seed: the split's seed (another seed, another split).
    """

    fraction: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError("the held-out fraction must lie strictly between 0 and 1")

    def side(self, uid: str) -> str:
        """``"heldout"`` or ``"train"`` for a document id."""
        return "heldout" if unit_hash(uid, self.seed) < self.fraction else "train"

    def keeps(self, uid: str, side: str) -> bool:
        """Whether a document with id ``uid`` belongs to ``side`` (``"all"`` keeps every document)."""
        if side not in SIDES:
            raise ValueError(f"split side must be one of {', '.join(SIDES)}, not {side!r}")
        return side == "all" or self.side(uid) == side

    def select(self, documents: Iterable[Any], side: str) -> Iterator[Any]:
        """The documents (objects with a ``uid``) of one side, in their order."""
        for doc in documents:
            if self.keeps(doc.uid, side):
                yield doc

    def counts(self, uids: Iterable[str]) -> dict[str, int]:
        """How many of ``uids`` fall on each side."""
        out = {"train": 0, "heldout": 0}
        for uid in uids:
            out[self.side(uid)] += 1
        return out

    def manifest(self, side: str) -> dict[str, Any]:
        """What a run records about the split it read (``side``: the part it read)."""
        return {"side": side, "heldout_fraction": self.fraction, "seed": self.seed, "unit": "document",
                "rule": "heldout iff BLAKE2b-64(seed, document uid) / 2**64 < heldout_fraction"}
