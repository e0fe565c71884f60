"""Corpora: streams of documents from the bundled texts, files, folders, globs, JSONL, Parquet, the Python standard
library or a HF dataset.

A corpus is read lazily, one document at a time, so a scan's memory does not depend on the corpus size.

Corpus specs understood by :class:`Corpus` and :func:`iter_documents`:

* ``None`` / ``"default"``: the bundled corpus (original English prose on varied topics, MIT licensed).
* ``"master"``: the bundled master text for the hunt (each paragraph is a document).
* ``"python-stdlib"`` / ``"python-stdlib:email,json"``: the ``.py`` source files of the running Python's standard
  library (``sysconfig.get_paths()["stdlib"]``), one document per file, sorted by relative path. Left out:
  ``site-packages``/``dist-packages``, ``__pycache__``, every ``test``/``tests``/``idle_test`` folder, folders that
  are not package names (``config-3.11-x86_64-linux-gnu``) and the whole ``idlelib`` and ``lib2to3`` packages (IDE
  and 2to3 test data). Files that are not valid UTF-8 are always skipped and counted in :attr:`Corpus.n_skipped`,
  whatever ``on_error`` says. ``domain`` is the top-level package (``email``, ``asyncio``, ``json``, ...);
  top-level single-file modules (``os.py``, ``typing.py``, ...) share the domain ``"<module>"``. The optional list after the colon keeps only those top-level names: packages, single modules
  (``os``) or ``<module>`` for all single modules. On CPython 3.11.7 (Linux) the whole spec gives 597 files,
  11.06 M characters, 5.17 M GPT-2 tokens, in 31 domains (168 files in ``<module>``, 122 in ``encodings``).
* a ``.txt`` file (one document), a ``.jsonl`` file (one JSON object per line, text in ``text_field``), a ``.parquet``
  file (column ``text_field``); any other file is read as text.
* a folder: every ``.txt``, ``.jsonl`` and ``.parquet`` file below it (hidden files and folders left out), or a glob
  such as ``data/*.jsonl`` or ``shards/**/*.parquet`` (every matching file, read by its suffix as above).
  Files are read in sorted order of their path relative to the root (the folder, or the glob's leading folders).
* ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset, streamed (needs ``datasets`` and network access).

Reading:

* Text is UTF-8; a byte-order mark at the start of a file is dropped. Line endings are kept as they are (no
  translation), so a document's text is its file's bytes decoded.
* JSONL files are read one line at a time, split on ``\\n`` only (``\\r\\n`` works too), never on U+2028, U+2029 or
  U+0085, which are legal inside JSON strings. Blank lines are ignored.
* Text files up to 4 MiB are read whole; bigger ones are streamed twice in 1 MiB blocks: once while iterating (to
  validate and hash them), then again when the document's text is consumed through :meth:`Document.iter_text`
  (:func:`~neuronhunter.data.batches.iter_windows` does so, tokenising in bounded blocks). Memory is then bounded
  by a block, not by the file. A JSONL line or Parquet value is one document and is held in memory whole (a JSONL
  line with a 50 MB string raised peak memory by about 125 MB; it is still tokenised in blocks).
* Parquet files are read in record batches.

Validation: every document is checked as it is read: the file must be UTF-8 without NUL bytes, a JSONL line must be
a JSON object with a string ``text_field``, a Parquet ``text_field`` column must hold strings (no nulls). A bad
document is reported on one line with its file and line (``c.jsonl:3 is not valid JSON ...``) or row
(``d.parquet#7``). ``on_error="fail"`` (default) raises :class:`~neuronhunter.errors.CorpusError`; ``"skip"``
leaves the document out, counting it in :attr:`Corpus.n_skipped` and keeping the first reasons in
:attr:`Corpus.skipped` (an unreadable file counts once). Blank documents are left out silently. A corpus with no
document left is a :class:`CorpusError`.

Every :class:`Document` has a ``source`` (relative path, plus ``:line`` for JSONL and ``#row`` for Parquet, or
``#index`` for paragraphs and hub rows) that is unique within its corpus and stable across runs (:attr:`Document.uid`)
and a ``domain``: the value of ``domain_field`` (JSONL key or Parquet column, when given and present) or else the
sub-folder the file sits in relative to the corpus root (``""`` at the root, ``"a/b"`` when nested).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, CorpusError

log = logging.getLogger(__name__)

RESOURCES = "neuronhunter.data.resources"
FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
STDLIB = "python-stdlib"
STDLIB_MODULE_DOMAIN = "<module>"
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
STDLIB_SKIP_TOP = frozenset({"idlelib", "lib2to3"})
WHOLE_FILE_BYTES = 4 << 20  # text files up to this size are read whole; bigger ones are streamed
READ_BYTES = 1 << 20  # block size when streaming a text file
MAX_REASONS = 10  # skip reasons kept in Corpus.skipped
_BOM = b"\xef\xbb\xbf"
_GLOB_CHARS = frozenset("*?[")

OnError = Literal["fail", "skip"]


class Document:
    """One document: its index in the corpus, its text, where it came from and its domain.

    ``Document(doc_id, text, source)`` holds its text in memory. A document of a big text file holds a ``reader``
    instead (a function returning an iterator of text pieces) and reads the file again whenever its text is
    consumed: use :meth:`iter_text` for bounded memory; :attr:`text` joins the pieces (the whole file in memory).
    """

    __slots__ = ("doc_id", "source", "domain", "_text", "_reader")

    def __init__(self, doc_id: int, text: str | None = None, source: str = "", domain: str = "", *,
                 reader: Callable[[], Iterator[str]] | None = None) -> None:
        if (text is None) == (reader is None):
            raise TypeError("a Document needs exactly one of text and reader")
        self.doc_id = doc_id
        self.source = source
        self.domain = domain
        self._text = text
        self._reader = reader

    @property
    def text(self) -> str:
        """The whole text (for a streamed document this reads the whole file into memory)."""
        if self._text is not None:
            return self._text
        return "".join(self.iter_text())

    @property
    def in_memory(self) -> bool:
        """Whether the text is held in memory (else it is read from its file on each :meth:`iter_text`)."""
        return self._text is not None

    @property
    def uid(self) -> str:
        """A stable string id, unique within the corpus (the source), e.g. for hashing documents into shards."""
        return self.source

    def iter_text(self) -> Iterator[str]:
        """The text in consecutive pieces (one piece for an in-memory text, blocks of about 1 MiB for a file)."""
        if self._text is not None:
            if self._text:
                yield self._text
            return
        assert self._reader is not None
        yield from self._reader()

    def __repr__(self) -> str:
        shown = repr(self._text[:40]) + ("..." if len(self._text) > 40 else "") if self._text is not None else "<file>"
        return f"Document(doc_id={self.doc_id}, source={self.source!r}, domain={self.domain!r}, text={shown})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Document):
            return NotImplemented
        return (self.doc_id, self.source, self.domain) == (other.doc_id, other.source, other.domain) and (
            self.text == other.text)

    __hash__ = None  # type: ignore[assignment]


def resource_path(name: str) -> Path:
    """Path of a bundled resource file or folder."""
    return Path(str(resources.files(RESOURCES).joinpath(name)))


# ----------------------------------------------------------------------------------------------------------- reading


@dataclass
class _Item:
    """What the readers yield: a document (text in memory or a reader) or a bad document (``error``)."""

    source: str
    domain: str = ""
    text: str | None = None
    reader: Callable[[], Iterator[str]] | None = None
    error: str | None = None
    always_skip: bool = False  # a bad document that is skipped (and counted) whatever on_error says


def _line_at(data: bytes, pos: int, line0: int) -> int:
    return line0 + data.count(b"\n", 0, pos)


def _decode(data: bytes, where: str, line0: int = 1) -> str:
    """Decode UTF-8 bytes, raising a one-line :class:`CorpusError` naming ``where:line`` on NUL bytes or bad UTF-8."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"{where}:{_line_at(data, nul, line0)} is not a text file (NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = _line_at(data, exc.start, line0)
        raise CorpusError(f"{where}:{line} is not valid UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def _utf8_complete(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 sequence."""
    for k in range(1, min(4, len(data)) + 1):
        c = data[-k]
        if c & 0xC0 != 0x80:  # ASCII or a lead byte
            need = 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4 if c >> 3 == 0b11110 else 1
            return len(data) - k if need > k else len(data)
    return len(data)


def _stream_file(path: Path, where: str) -> Iterator[str]:
    """Decoded text of a file in blocks of about :data:`READ_BYTES` (BOM dropped), validated as it is read."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise CorpusError(f"cannot read {where}: {exc.strerror}") from None
    with fh:
        carry = b""
        line = 1
        first = True
        while True:
            try:
                block = fh.read(READ_BYTES)
            except OSError as exc:
                raise CorpusError(f"cannot read {where}: {exc.strerror}") from None
            if first:
                first = False
                if block.startswith(_BOM):
                    block = block[len(_BOM):]
            if not block:
                if carry:
                    raise CorpusError(f"{where}:{line} is not valid UTF-8 text (truncated at the end of the file)")
                return
            data = carry + block
            cut = _utf8_complete(data)
            data, carry = data[:cut], data[cut:]
            text = _decode(data, where, line)
            line += data.count(b"\n")
            if text:
                yield text


def _read_text_file(path: Path, where: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {where}: {exc.strerror}") from None
    return _decode(data[len(_BOM):] if data.startswith(_BOM) else data, where)


def _text_file_item(path: Path, source: str, domain: str, *, always_skip: bool = False) -> _Item:
    """A text file as one document: read whole when small, else a streaming reader (validated by the corpus)."""
    where = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return _Item(source, domain, error=f"cannot read {where}: {exc.strerror}", always_skip=always_skip)
    if size > WHOLE_FILE_BYTES:
        return _Item(source, domain, reader=lambda: _stream_file(path, where), always_skip=always_skip)
    try:
        return _Item(source, domain, text=_read_text_file(path, where))
    except CorpusError as exc:
        return _Item(source, domain, error=str(exc), always_skip=always_skip)


def _domain_value(row: dict[str, Any], domain_field: str | None, default: str) -> str | None:
    """The document's domain from ``row[domain_field]`` (None when that value is not a scalar)."""
    if domain_field is None:
        return default
    value = row.get(domain_field)
    if value is None:
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    return None


def _jsonl_items(path: Path, rel: str, domain: str, text_field: str, domain_field: str | None) -> Iterator[_Item]:
    where = str(path)
    try:
        fh = path.open("rb")  # binary lines split on b"\n" only; each line is decoded on its own
    except OSError as exc:
        yield _Item(rel, domain, error=f"cannot read {where}: {exc.strerror}")
        return
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as exc:
                yield _Item(f"{rel}:{lineno + 1}", domain, error=f"cannot read {where}: {exc.strerror}")
                return
            if not raw:
                return
            lineno += 1
            source = f"{rel}:{lineno}"
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            try:
                line = _decode(raw, where, lineno)
            except CorpusError as exc:
                yield _Item(source, domain, error=str(exc))
                continue
            raw = b""  # a long line is then in memory twice (as text and parsed), not three times
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _Item(source, domain, error=f"{where}:{lineno} is not valid JSON ({exc.msg}, column {exc.colno})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                yield _Item(source, domain, error=f"{where}:{lineno} has no string field {text_field!r}")
                continue
            dom = _domain_value(row, domain_field, domain)
            if dom is None:
                yield _Item(source, domain, error=f"{where}:{lineno} field {domain_field!r} is not a string")
                continue
            text = row[text_field]
            if "\x00" in text:
                yield _Item(source, domain, error=f"{where}:{lineno} has NUL characters in {text_field!r} (binary?)")
                continue
            yield _Item(source, dom, text=text)


def _is_string_type(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t))


def _parquet_items(path: Path, rel: str, domain: str, text_field: str, domain_field: str | None) -> Iterator[_Item]:
    import pyarrow.parquet as pq

    where = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception:  # noqa: BLE001 - pyarrow raises several types for bad files
        yield _Item(rel, domain, error=f"{where} is not a readable Parquet file")
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        yield _Item(rel, domain, error=f"{where} has no column {text_field!r} (columns: {', '.join(names)})")
        return
    text_type = pf.schema_arrow.field(text_field).type
    if not _is_string_type(text_type):
        yield _Item(rel, domain, error=f"{where} column {text_field!r} holds {text_type}, not strings")
        return
    columns = [text_field] + ([domain_field] if domain_field in names and domain_field != text_field else [])
    row = 0
    batches = pf.iter_batches(columns=columns, batch_size=256)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception:  # noqa: BLE001 - corrupt pages raise various pyarrow errors
            yield _Item(f"{rel}#{row}", domain, error=f"{where} has unreadable data after row {row}")
            return
        texts = batch.column(0).to_pylist()
        domains = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for value, dom_value in zip(texts, domains, strict=True):
            source = f"{rel}#{row}"
            row += 1
            if not isinstance(value, str):
                yield _Item(source, domain, error=f"{where}#{row - 1} has no string field {text_field!r} (null)")
                continue
            if "\x00" in value:
                yield _Item(source, domain, error=f"{where}#{row - 1} has NUL characters in {text_field!r}")
                continue
            dom = domain if domain_field is None else _domain_value({"d": dom_value}, "d", domain)
            if dom is None:
                yield _Item(source, domain, error=f"{where}#{row - 1} column {domain_field!r} is not a string")
                continue
            yield _Item(source, dom, text=value)


def _file_items(path: Path, rel: str, domain: str, text_field: str, domain_field: str | None) -> Iterator[_Item]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_items(path, rel, domain, text_field, domain_field)
    elif suffix == ".parquet":
        yield from _parquet_items(path, rel, domain, text_field, domain_field)
    else:
        yield _text_file_item(path, rel, domain)


Unit = tuple[str, Callable[[], Iterator[_Item]]]  # a file of a many-file corpus: its relative path and its reader


def _many_files(root: Path, files: Iterable[Path], text_field: str, domain_field: str | None) -> list[Unit]:
    rels = sorted((f.relative_to(root) for f in files), key=lambda r: r.parts)
    out: list[Unit] = []
    for rel in rels:
        parent = rel.parent.as_posix()
        out.append((rel.as_posix(), functools.partial(_file_items, root / rel, rel.as_posix(),
                                                      "" if parent == "." else parent, text_field, domain_field)))
    return out


def _folder_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in filenames
                   if not f.startswith(".") and Path(f).suffix.lower() in FOLDER_SUFFIXES)
    return out


def _glob_root(pattern: str) -> tuple[Path, str]:
    """Split a glob into its leading folders (no glob characters) and the rest."""
    parts = Path(pattern).expanduser().parts
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return Path(*parts[:i]) if i else Path("."), str(Path(*parts[i:]))
    return Path(*parts), ""


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _stdlib_files(names: set[str] | None) -> list[tuple[Path, tuple[str, ...]]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"the Python standard library folder {root} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).parts
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and d.isidentifier()
                       and not (not rel_dir and d in STDLIB_SKIP_TOP)]
        for f in filenames:
            if f.endswith(".py"):
                out.append((Path(dirpath) / f, (*rel_dir, f)))
    out.sort(key=lambda item: item[1])
    if names is not None:
        tops = {parts[0] if len(parts) > 1 else parts[0][:-3] for _, parts in out}
        unknown = sorted(n for n in names if n not in tops and n != STDLIB_MODULE_DOMAIN)
        if unknown:
            raise CorpusError(f"{STDLIB}: no standard library package or module named {', '.join(unknown)}")
        out = [(p, parts) for p, parts in out
               if (parts[0] if len(parts) > 1 else parts[0][:-3]) in names
               or (len(parts) == 1 and STDLIB_MODULE_DOMAIN in names)]
    return out


def _one(item: Callable[[], _Item]) -> Iterator[_Item]:
    yield item()


def _stdlib_units(spec: str) -> list[Unit]:
    params = spec[len(STDLIB) + 1:] if spec.startswith(STDLIB + ":") else ""
    names = {n.strip() for n in params.split(",") if n.strip()} or None
    out: list[Unit] = []
    for path, parts in _stdlib_files(names):
        domain = parts[0] if len(parts) > 1 else STDLIB_MODULE_DOMAIN
        rel = "/".join(parts)
        out.append((rel, functools.partial(_one, functools.partial(_text_file_item, path, rel, domain,
                                                                   always_skip=True))))
    return out


def _units(spec: str | Path | None, text_field: str, domain_field: str | None) -> list[Unit] | None:
    """The files of a corpus read file by file (the bundled corpus, ``python-stdlib``, a folder, a glob) in reading
    order, or None for a corpus that is one stream (a file, ``master``, ``hf:``)."""
    name = None if spec is None else str(spec)
    if name is None or name == "default":
        return [(f.name, functools.partial(_one, functools.partial(_text_file_item, f, f.name, "")))
                for f in sorted(resource_path("corpus").glob("*.txt"))]
    if name == "master" or name.startswith("hf:") and isinstance(spec, str):
        return None
    if name == STDLIB or name.startswith(STDLIB + ":"):
        return _stdlib_units(name)
    path = Path(name).expanduser()
    if not path.exists() and _GLOB_CHARS & set(name):
        root, rest = _glob_root(name)
        files = [p for p in root.glob(rest) if p.is_file()] if rest else []
        if not files:
            raise CorpusError(f"no files match the corpus glob {name!r}")
        return _many_files(root, files, text_field, domain_field)
    if not path.exists():
        raise CorpusError(f"corpus not found: {path}")
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise CorpusError(f"corpus folder {path} has no .txt files (nor .jsonl or .parquet files)")
        return _many_files(path, files, text_field, domain_field)
    return None


def _raw_items(spec: str | Path | None, text_field: str, domain_field: str | None,
               start_file: str | None = None) -> Iterator[_Item]:
    units = _units(spec, text_field, domain_field)
    if units is not None:
        first = 0
        if start_file is not None:
            names = [rel for rel, _ in units]
            if start_file not in names:
                raise CorpusError(f"corpus {spec}: the file {start_file!r} is gone (the corpus changed)")
            first = names.index(start_file)
        for _, read in units[first:]:
            yield from read()
        return
    if start_file is not None:
        raise CorpusError(f"corpus {spec} is one stream, not files: it cannot start at {start_file!r}")
    name = str(spec)
    if name == "master":
        path = resource_path("master_text.txt")
        for i, para in enumerate(_paragraphs(_read_text_file(path, str(path)))):
            yield _Item(f"master_text.txt#{i}", text=para)
        return
    if isinstance(spec, str) and name.startswith("hf:"):
        yield from _hf_items(name, text_field, domain_field)
        return
    path = Path(name).expanduser()
    yield from _file_items(path, path.name, "", text_field, domain_field)


def _hf_items(spec: str, text_field: str, domain_field: str | None) -> Iterator[_Item]:
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
        source = f"{name}#{i}"
        value = row.get(text_field)
        dom = _domain_value(row, domain_field, "")
        if not isinstance(value, str):
            yield _Item(source, error=f"{source} has no string field {text_field!r}")
        elif "\x00" in value:
            yield _Item(source, error=f"{source} has NUL characters in {text_field!r}")
        elif dom is None:
            yield _Item(source, error=f"{source} field {domain_field!r} is not a string")
        else:
            yield _Item(source, dom, text=value)


# ------------------------------------------------------------------------------------------------------------ corpus


def _hash_text(h: Any, text: str, step: int = 1 << 20) -> None:
    """``h.update(text.encode())`` without a copy of a long text in memory."""
    if len(text) <= step:
        h.update(text.encode("utf-8"))
        return
    for i in range(0, len(text), step):
        h.update(text[i:i + step].encode("utf-8"))


class Corpus:
    """A re-iterable, lazily read corpus with a content hash.

    Iterating yields :class:`Document` objects with consecutive ``doc_id`` (blank documents are left out). After a
    full iteration, :attr:`sha256` holds the hash of all document texts (what the manifest records) and
    :attr:`n_docs` / :attr:`n_chars` their number and characters. :attr:`n_skipped` and :attr:`skipped` (the first
    :data:`MAX_REASONS` reasons) count the bad documents skipped by the iteration in progress or last run.

    Args:
        spec: a corpus spec (see the module docstring).
        text_field: the JSONL key / Parquet column / dataset field holding the text.
        max_docs: stop after this many documents.
        on_error: ``"fail"`` raises :class:`CorpusError` at the first bad document (with its file and line);
            ``"skip"`` leaves bad documents out and counts them.
        domain_field: the JSONL key / Parquet column / dataset field holding each document's domain label (None:
            the domain is the sub-folder of the file).
        start: ``(file, document id)``: begin at this file of a many-file corpus (see :meth:`files`), whose first
            document has this id, without reading the files before it (a shard of a Ray scan reads only from its
            first document on). :attr:`sha256`, :attr:`n_docs` and the skip counts then cover what was read.
    """

    def __init__(self, spec: str | Path | None = None, *, text_field: str = "text", max_docs: int | None = None,
                 on_error: OnError = "fail", domain_field: str | None = None,
                 start: tuple[str, int] | None = None) -> None:
        if on_error not in ("fail", "skip"):
            raise ConfigError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        self.spec = spec
        self.text_field = text_field
        self.max_docs = max_docs
        self.on_error: OnError = on_error
        self.domain_field = domain_field
        self.start = start
        self.sha256: str | None = None
        self.n_docs: int | None = None
        self.n_chars: int | None = None
        self.n_skipped = 0
        self.skipped: list[str] = []

    @property
    def name(self) -> str:
        return "default" if self.spec is None else str(self.spec)

    def _bad(self, item: _Item, reason: str) -> None:
        if self.on_error == "fail" and not item.always_skip:
            raise CorpusError(reason)
        self.n_skipped += 1
        if len(self.skipped) < MAX_REASONS:
            self.skipped.append(reason)
            log.warning("skipped a corpus document: %s", reason)
        else:
            log.debug("skipped a corpus document: %s", reason)

    def files(self) -> list[str] | None:
        """The relative paths of the files of a corpus read file by file (the bundled corpus, ``python-stdlib``, a
        folder, a glob), in reading order; None for one stream (a single file, ``master``, ``hf:``). A document's
        :attr:`~Document.source` is its file's path, or that path and ``:line`` / ``#row``."""
        units = _units(self.spec, self.text_field, self.domain_field)
        return None if units is None else [rel for rel, _ in units]

    def __iter__(self) -> Iterator[Document]:
        h = hashlib.sha256()
        n = first = self.start[1] if self.start is not None else 0
        chars = 0
        self.n_skipped, self.skipped = 0, []
        for item in _raw_items(self.spec, self.text_field, self.domain_field,
                               self.start[0] if self.start is not None else None):
            if self.max_docs is not None and n - first >= self.max_docs:
                break
            if item.error is not None:
                self._bad(item, item.error)
                continue
            if item.text is not None:
                if not item.text or item.text.isspace():  # (not strip(): no copy of a long text)
                    continue
                before = h.copy()
                try:
                    _hash_text(h, item.text)
                except UnicodeEncodeError:  # a JSON "\\ud800" escape gives a lone surrogate
                    h = before
                    self._bad(item, f"{item.source} has text that is not valid Unicode (a lone surrogate)")
                    continue
                h.update(b"\x00")
                chars += len(item.text)
                doc = Document(n, item.text, item.source, item.domain)
            else:  # a streamed file: validate and hash it now, read it again when its text is consumed
                assert item.reader is not None
                before = h.copy()
                blank, size = True, 0
                try:
                    for piece in item.reader():
                        blank = blank and piece.isspace()
                        size += len(piece)
                        _hash_text(h, piece)
                except CorpusError as exc:
                    h = before
                    self._bad(item, str(exc))
                    continue
                if blank:
                    h = before
                    continue
                h.update(b"\x00")
                chars += size
                doc = Document(n, None, item.source, item.domain, reader=item.reader)
            yield doc
            n += 1
        if n == first:
            if self.n_skipped:
                raise CorpusError(f"corpus {self.name!r} has no usable documents: {self.n_skipped} skipped "
                                  f"(first: {self.skipped[0]})")
            raise CorpusError(f"corpus {self.name!r} is empty (no non-blank documents)")
        self.sha256, self.n_docs, self.n_chars = h.hexdigest(), n - first, chars

    def check(self, *, full: bool = False) -> None:
        """Fail early (before any output is written) when the corpus is missing or empty.

        Args:
            full: validate every document (reads the whole corpus, without tokenising it; memory stays bounded),
                so that with ``on_error="fail"`` a bad document anywhere fails here, and :attr:`sha256`,
                :attr:`n_docs` and :attr:`n_skipped` are known afterwards. By default only up to the first usable
                document is read.
        """
        for _ in self:
            if not full:
                return


def iter_documents(spec: str | Path | None = None, *, text_field: str = "text", on_error: OnError = "fail",
                   domain_field: str | None = None) -> Iterator[Document]:
    """Iterate the documents of a corpus spec (see the module docstring)."""
    return iter(Corpus(spec, text_field=text_field, on_error=on_error, domain_field=domain_field))
