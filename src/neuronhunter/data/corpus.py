"""Corpora: streams of documents from the bundled texts, files, folders, JSONL, Parquet or a HF dataset.

A corpus is read lazily, one document at a time, so a scan's memory does not depend on the corpus size.

Corpus specs understood by :func:`iter_documents`:

* ``None`` / ``"default"``: the bundled corpus (original English prose on varied topics, MIT licensed).
* ``"master"``: the bundled master text for the hunt (each paragraph is a document).
* a ``.txt`` file (one document), a folder of ``.txt`` files (one document each, sorted by name),
* a ``.jsonl`` file (one JSON object per line, text in ``text_field``), a ``.parquet`` file (column ``text_field``),
* ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset, streamed (needs ``datasets`` and network access).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import CorpusError

RESOURCES = "neuronhunter.data.resources"


@dataclass(frozen=True)
class Document:
    """One document: its index in the corpus, its text and where it came from."""

    doc_id: int
    text: str
    source: str


def resource_path(name: str) -> Path:
    """Path of a bundled resource file or folder."""
    return Path(str(resources.files(RESOURCES).joinpath(name)))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror}") from None
    if b"\x00" in data[:8192]:
        raise CorpusError(f"{path} is not a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"{path} is not a UTF-8 text file") from None


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _raw_documents(spec: str | Path | None, text_field: str) -> Iterator[tuple[str, str]]:
    if spec is None or str(spec) == "default":
        folder = resource_path("corpus")
        for f in sorted(folder.glob("*.txt")):
            yield f.name, _read_text(f)
        return
    if str(spec) == "master":
        for i, para in enumerate(_paragraphs(_read_text(resource_path("master_text.txt")))):
            yield f"master_text.txt#{i}", para
        return
    if isinstance(spec, str) and spec.startswith("hf:"):
        yield from _hf_documents(spec, text_field)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"corpus folder {path} has no .txt files")
        for f in files:
            yield str(f.relative_to(path)), _read_text(f)
    elif path.suffix == ".jsonl":
        text = _read_text(path)
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CorpusError(f"{path}:{lineno} is not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise CorpusError(f"{path}:{lineno} has no string field {text_field!r}")
            yield f"{path.name}:{lineno}", row[text_field]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise CorpusError(f"{path} is not a readable Parquet file") from None
        if text_field not in pf.schema_arrow.names:
            raise CorpusError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, str):
                    yield f"{path.name}#{row - 1}", value
    else:
        yield path.name, _read_text(path)


def _hf_documents(spec: str, text_field: str) -> Iterator[tuple[str, str]]:
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError:
        raise CorpusError("HF dataset corpora need the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - offline/unknown dataset errors vary
        raise CorpusError(f"could not open HF dataset {name!r} (offline or unknown?): {str(exc).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        value = row.get(text_field)
        if isinstance(value, str):
            yield f"{name}#{i}", value


class Corpus:
    """A re-iterable, lazily read corpus with a content hash.

    Iterating yields :class:`Document` objects with consecutive ``doc_id`` (empty documents are skipped). After a
    full iteration, :attr:`sha256` holds the hash of all document texts (what the manifest records).
    """

    def __init__(self, spec: str | Path | None = None, *, text_field: str = "text", max_docs: int | None = None):
        self.spec = spec
        self.text_field = text_field
        self.max_docs = max_docs
        self.sha256: str | None = None
        self.n_docs: int | None = None

    @property
    def name(self) -> str:
        return "default" if self.spec is None else str(self.spec)

    def __iter__(self) -> Iterator[Document]:
        h = hashlib.sha256()
        n = 0
        for source, text in _raw_documents(self.spec, self.text_field):
            if self.max_docs is not None and n >= self.max_docs:
                break
            if not text.strip():
                continue
            h.update(text.encode("utf-8"))
            h.update(b"\x00")
            yield Document(n, text, source)
            n += 1
        if n == 0:
            raise CorpusError(f"corpus {self.name!r} is empty (no non-blank documents)")
        self.sha256, self.n_docs = h.hexdigest(), n

    def check(self) -> None:
        """Fail early (before any output is written) when the corpus is missing or empty."""
        for _ in self:
            return


def iter_documents(spec: str | Path | None = None, *, text_field: str = "text") -> Iterator[Document]:
    """Iterate the documents of a corpus spec (see the module docstring)."""
    return iter(Corpus(spec, text_field=text_field))
