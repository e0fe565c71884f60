"""The offline ``python-stdlib`` corpus: the standard library's own ``.py`` files, one document per file."""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from neuronhunter.data import Corpus, tokenize_document
from neuronhunter.data import corpus as corpus_mod
from neuronhunter.data.batches import iter_token_blocks
from neuronhunter.errors import CorpusError


@pytest.fixture(scope="module")
def stdlib_docs():
    c = Corpus("python-stdlib")
    return c, list(c)


def test_stdlib_corpus_is_big_varied_and_clean(stdlib_docs):
    c, docs = stdlib_docs
    assert c.n_chars > 1_000_000 and c.n_docs == len(docs) > 200
    domains = Counter(d.domain for d in docs)
    assert len(domains) >= 10 and {"email", "asyncio", "json", "<module>"} <= set(domains)
    sources = [d.source for d in docs]
    assert sources == sorted(sources, key=lambda s: tuple(s.split("/"))) and len(set(sources)) == len(sources)
    parts = [s.split("/") for s in sources]
    assert all(p[-1].endswith(".py") for p in parts)
    assert not any(set(p[:-1]) & {"test", "tests", "idle_test", "site-packages", "__pycache__"} for p in parts)
    assert not any(p[0] in ("idlelib", "lib2to3") for p in parts)
    by_source = {d.source: d for d in docs}
    assert by_source["json/decoder.py"].domain == "json" and by_source["os.py"].domain == "<module>"
    root = Path(sysconfig.get_paths()["stdlib"])
    assert by_source["json/decoder.py"].text == (root / "json" / "decoder.py").read_text(encoding="utf-8")


def test_stdlib_corpus_is_deterministic(stdlib_docs):
    c, docs = stdlib_docs
    again = Corpus("python-stdlib")
    assert [(d.doc_id, d.source, d.domain) for d in again] == [(d.doc_id, d.source, d.domain) for d in docs]
    assert again.sha256 == c.sha256 and again.n_chars == c.n_chars


def test_stdlib_selection():
    docs = list(Corpus("python-stdlib:email,json,os"))
    assert {d.domain for d in docs} == {"email", "json", "<module>"}
    assert [d.source for d in docs if d.domain == "<module>"] == ["os.py"]
    modules = list(Corpus("python-stdlib:<module>"))
    assert modules and all("/" not in d.source for d in modules)
    with pytest.raises(CorpusError, match="no standard library package or module named nosuchthing"):
        list(Corpus("python-stdlib:json,nosuchthing"))


def test_stdlib_files_that_are_not_utf8_are_skipped_and_counted(tmp_path, monkeypatch):
    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "tests" / "test_x.py").write_text("z = 3\n")
    (tmp_path / "lib2to3").mkdir()
    (tmp_path / "lib2to3" / "a.py").write_text("w = 4\n")
    monkeypatch.setattr(corpus_mod.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    c = Corpus("python-stdlib")  # on_error="fail", yet a non-UTF-8 source file is skipped
    assert [(d.source, d.domain) for d in c] == [("good.py", "<module>"), ("pkg/__init__.py", "pkg")]
    assert c.n_skipped == 1 and "latin.py:2" in c.skipped[0]


def test_stdlib_block_tokenisation_equals_whole(gpt2_tok, stdlib_docs):
    _, docs = stdlib_docs
    doc = next(d for d in docs if d.source == "json/decoder.py")
    ids, offsets = tokenize_document(gpt2_tok, doc.text)
    blocks = list(iter_token_blocks(gpt2_tok, doc, block_chars=300))
    assert len(blocks) > 20
    assert [i for b in blocks for i in b.ids] == ids and [o for b in blocks for o in b.offsets] == offsets
