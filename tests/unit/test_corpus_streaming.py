"""Streaming corpus reading: line splitting, BOMs, validation with file:line, error policy, many files, domains,
block tokenisation equal to whole tokenisation, and memory bounded by a block (not by a file)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from neuronhunter.data import ConceptLabeller, Corpus, Document, iter_windows, tokenize_document
from neuronhunter.data import corpus as corpus_mod
from neuronhunter.data.batches import block_safe, count_document_tokens, iter_token_blocks, text_blocks
from neuronhunter.errors import ConfigError, CorpusError


def _jsonl(path, rows, *, newline="\n", bom=False):
    data = newline.join(json.dumps(r, ensure_ascii=False) for r in rows) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------- lines and BOMs


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    texts = ["one\u2028two", "three\u2029four", "five\u0085six", "plain"]
    path = _jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not escaped
    docs = list(Corpus(path))
    assert [d.text for d in docs] == texts
    assert [d.source for d in docs] == ["c.jsonl:1", "c.jsonl:2", "c.jsonl:3", "c.jsonl:4"]


def test_bom_is_dropped_from_txt_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfhello world")
    assert [d.text for d in Corpus(tmp_path / "b.txt")] == ["hello world"]
    path = _jsonl(tmp_path / "b.jsonl", [{"text": "first"}, {"text": "second"}], bom=True)
    assert [d.text for d in Corpus(path)] == ["first", "second"]


def test_crlf_files(tmp_path):
    path = _jsonl(tmp_path / "w.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c\r\nd"}], newline="\r\n")
    docs = list(Corpus(path))
    assert [d.text for d in docs] == ["a", "b", "c\r\nd"] and docs[2].source == "w.jsonl:3"
    (tmp_path / "w.txt").write_bytes(b"line one\r\nline two\r\n")
    assert [d.text for d in Corpus(tmp_path / "w.txt")] == ["line one\r\nline two\r\n"]  # no newline translation


# ---------------------------------------------------------------------------------------------------- validation


def test_jsonl_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3 is not valid JSON") as info:
        list(Corpus(path))
    assert "\n" not in str(info.value)
    c = Corpus(path, on_error="skip")
    assert [d.text for d in c] == ["a", "b", "d"] and c.n_skipped == 1 and "bad.jsonl:3" in c.skipped[0]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"body": "x"}', "has no string field 'text'"),
        ('{"text": 3}', "has no string field 'text'"),
        ('["text"]', "has no string field 'text'"),
        ('{"text": "nul \\u0000 inside"}', "NUL"),
        ('{"text": "lone \\ud800 surrogate"}', "not valid Unicode"),
    ],
)
def test_jsonl_bad_rows_name_their_line(tmp_path, line, message):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + "\n")
    with pytest.raises(CorpusError, match=message) as info:
        list(Corpus(path))
    assert "r.jsonl:3" in str(info.value)


def test_jsonl_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "fine"}\n')
    with pytest.raises(CorpusError, match=r"l\.jsonl:2 is not valid UTF-8"):
        list(Corpus(path))
    c = Corpus(path, on_error="skip")
    assert [d.text for d in c] == ["ok", "fine"] and c.n_skipped == 1


def _folder_with_bad_file(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "d.txt", "e.txt"):
        (folder / name).write_text(f"document {name}")
    (folder / "c.txt").write_bytes(b"line one\nline two caf\xe9\n")
    return folder


def test_folder_with_a_non_utf8_file_in_the_middle(tmp_path):
    folder = _folder_with_bad_file(tmp_path)
    seen = []
    with pytest.raises(CorpusError) as info:
        for doc in Corpus(folder):
            seen.append(doc.source)
    message = str(info.value)
    assert "c.txt:2" in message and "UTF-8" in message and "\n" not in message
    assert seen == ["a.txt", "b.txt"]  # it failed where the bad file is, naming it
    c = Corpus(folder, on_error="skip")
    docs = list(c)
    assert [d.source for d in docs] == ["a.txt", "b.txt", "d.txt", "e.txt"] and [d.doc_id for d in docs] == [0, 1, 2, 3]
    assert c.n_skipped == 1 and len(c.skipped) == 1 and "c.txt" in c.skipped[0] and c.n_docs == 4


def test_check_full_validates_every_document(tmp_path):
    folder = _folder_with_bad_file(tmp_path)
    Corpus(folder).check()  # the first document is fine
    with pytest.raises(CorpusError, match="c.txt"):
        Corpus(folder).check(full=True)
    c = Corpus(folder, on_error="skip")
    c.check(full=True)
    assert c.n_docs == 4 and c.n_skipped == 1 and len(c.sha256) == 64


def test_binary_file_and_policy_errors(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"text\n\x00\x01\x02")
    with pytest.raises(CorpusError, match=r"bin\.txt:2 is not a text file"):
        list(Corpus(tmp_path / "bin.txt"))
    with pytest.raises(CorpusError, match="no usable documents: 1 skipped"):
        list(Corpus(tmp_path / "bin.txt", on_error="skip"))  # nothing left
    with pytest.raises(ConfigError, match="on_error"):
        Corpus(tmp_path, on_error="ignore")  # type: ignore[arg-type]


def test_skipped_reasons_are_capped(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join("{oops\n" for _ in range(30)) + '{"text": "last"}\n')
    c = Corpus(path, on_error="skip")
    assert [d.text for d in c] == ["last"]
    assert c.n_skipped == 30 and len(c.skipped) == corpus_mod.MAX_REASONS
    list(c)  # counts restart with each iteration
    assert c.n_skipped == 30


def test_parquet_nulls_and_non_string_columns(tmp_path):
    pq = tmp_path / "p.parquet"
    pd.DataFrame({"text": ["a", None, "c"]}).to_parquet(pq)
    with pytest.raises(CorpusError, match=r"p\.parquet#1 has no string field 'text'"):
        list(Corpus(pq))
    c = Corpus(pq, on_error="skip")
    assert [(d.text, d.source) for d in c] == [("a", "p.parquet#0"), ("c", "p.parquet#2")] and c.n_skipped == 1
    ints = tmp_path / "i.parquet"
    pd.DataFrame({"text": [1, 2]}).to_parquet(ints)
    with pytest.raises(CorpusError, match="not strings"):
        list(Corpus(ints))


# ------------------------------------------------------------------------------------------ many files and domains


def test_glob_of_jsonl_and_parquet_files_in_sorted_order(tmp_path):
    data = tmp_path / "data"
    (data / "b").mkdir(parents=True)
    _jsonl(data / "a1.jsonl", [{"text": "a1-0"}, {"text": "a1-1"}])
    _jsonl(data / "b" / "b1.jsonl", [{"text": "b1-0"}])
    pd.DataFrame({"text": ["p-0", "p-1"]}).to_parquet(data / "b" / "p.parquet")
    pd.DataFrame({"text": ["q-0"]}).to_parquet(data / "q.parquet")
    (data / "notes.txt").write_text("not matched by the globs")
    docs = list(Corpus(str(data / "*.jsonl")))
    assert [(d.text, d.source) for d in docs] == [("a1-0", "a1.jsonl:1"), ("a1-1", "a1.jsonl:2")]
    docs = list(Corpus(str(data / "**" / "*.parquet")))
    assert [(d.text, d.source, d.domain) for d in docs] == [
        ("p-0", "b/p.parquet#0", "b"), ("p-1", "b/p.parquet#1", "b"), ("q-0", "q.parquet#0", "")]
    mixed = list(Corpus(str(data / "**" / "*.[jp]*")))  # .jsonl and .parquet
    assert [d.text for d in mixed] == ["a1-0", "a1-1", "b1-0", "p-0", "p-1", "q-0"]
    assert [d.uid for d in mixed] == [d.source for d in mixed] and len({d.uid for d in mixed}) == 6
    folder = list(Corpus(data))  # a folder reads .txt, .jsonl and .parquet files
    assert [d.source for d in folder] == ["a1.jsonl:1", "a1.jsonl:2", "b/b1.jsonl:1", "b/p.parquet#0",
                                          "b/p.parquet#1", "notes.txt", "q.parquet#0"]
    with pytest.raises(CorpusError, match="no files match"):
        list(Corpus(str(data / "*.nothing")))


def test_domain_from_sub_folders(tmp_path):
    for rel in ("top.txt", "news/x.txt", "news/y.txt", "code/py/z.txt", ".hidden/h.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"text of {rel}")
    docs = list(Corpus(tmp_path))
    assert [(d.source, d.domain) for d in docs] == [
        ("code/py/z.txt", "code/py"), ("news/x.txt", "news"), ("news/y.txt", "news"), ("top.txt", "")]
    assert [d.domain for d in Corpus(tmp_path / "news" / "x.txt")] == [""]  # a single file is its own root


def test_domain_from_a_field(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    _jsonl(sub / "d.jsonl", [{"text": "a", "topic": "sport"}, {"text": "b"}, {"text": "c", "topic": 7}])
    pd.DataFrame({"text": ["p", "q"], "topic": ["law", None]}).to_parquet(sub / "d.parquet")
    docs = list(Corpus(tmp_path, domain_field="topic"))
    assert [(d.text, d.domain) for d in docs] == [("a", "sport"), ("b", "sub"), ("c", "7"), ("p", "law"), ("q", "sub")]
    assert {d.domain for d in Corpus(tmp_path)} == {"sub"}  # without domain_field: the folder
    _jsonl(sub / "d.jsonl", [{"text": "a", "topic": ["x"]}])
    with pytest.raises(CorpusError, match=r"d\.jsonl:1 field 'topic' is not a string"):
        list(Corpus(tmp_path, domain_field="topic"))


def test_document_api_stays_compatible():
    doc = Document(3, "some text", "src")
    assert (doc.doc_id, doc.text, doc.source, doc.domain, doc.uid, doc.in_memory) == (3, "some text", "src", "", "src", True)
    assert list(doc.iter_text()) == ["some text"] and doc == Document(3, "some text", "src")
    lazy = Document(0, None, "f", "d", reader=lambda: iter(["ab", "cd"]))
    assert lazy.text == "abcd" and not lazy.in_memory and list(lazy.iter_text()) == ["ab", "cd"]
    with pytest.raises(TypeError):
        Document(0, "x", "s", reader=lambda: iter([]))


# ------------------------------------------------------------------------------------------ streamed text files


def test_big_text_files_are_streamed_and_validated(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "WHOLE_FILE_BYTES", 64)
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 7)  # splits multi-byte characters between reads
    text = "Grüße aus Köln – 日本語のテキスト 😀 end.\n" * 20
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (tmp_path / "b.txt").write_text("small")
    docs = list(Corpus(tmp_path))
    assert not docs[0].in_memory and docs[1].in_memory
    assert docs[0].text == text and "".join(docs[0].iter_text()) == text
    assert max(len(p.encode()) for p in docs[0].iter_text()) <= 7 + 3  # a read plus a carried partial character
    c = Corpus(tmp_path)
    list(c)
    monkeypatch.setattr(corpus_mod, "WHOLE_FILE_BYTES", 1 << 30)
    whole = Corpus(tmp_path)
    assert [d.text for d in whole] == [text, "small"]
    assert whole.sha256 == c.sha256 and whole.n_chars == c.n_chars == len(text) + 5  # same hash streamed or whole
    monkeypatch.setattr(corpus_mod, "WHOLE_FILE_BYTES", 64)
    (tmp_path / "a.txt").write_bytes(text.encode() * 2 + b"bad \xff byte\n")
    with pytest.raises(CorpusError, match=r"a\.txt:41 is not valid UTF-8"):
        list(Corpus(tmp_path))
    skip = Corpus(tmp_path, on_error="skip")
    assert [d.text for d in skip] == ["small"] and skip.n_skipped == 1
    assert skip.sha256 == _sha(tmp_path / "b.txt")  # the skipped file left no trace in the hash
    (tmp_path / "a.txt").write_bytes(b" \n\t" * 40)
    assert [d.text for d in Corpus(tmp_path)] == ["small"]  # a blank streamed file is left out


def _sha(path):
    c = Corpus(path)
    c.check(full=True)
    return c.sha256


# ------------------------------------------------------------------------------------------- block tokenisation


def _varied_text(n_chars: int, seed: int = 0) -> str:
    r = random.Random(seed)
    words = ["the", "cat", "Paris", "don't", "it's", "2024", "3.14", "naïve", "Grüße", "日本語", "😀", "x_y", "(a)",
             '"q"', "--", "...", "Hello", "WORLD", "re-use", "C++", "e\u0301", "\u2028", "Ω"]
    seps = [" "] * 30 + ["  ", "\n", "\n\n", "\r\n", "\t", " \n ", ", ", ". ", "\u00a0", "   "]
    out, n = [], 0
    while n < n_chars:
        piece = r.choice(words) + r.choice(seps)
        out.append(piece)
        n += len(piece)
    return "".join(out)[:n_chars]


def test_gpt2_is_block_safe(gpt2_tok):
    assert block_safe(gpt2_tok)


@pytest.mark.parametrize("block_chars", [40, 257, 4096])
def test_block_tokenisation_equals_whole_on_generated_text(gpt2_tok, block_chars):
    text = _varied_text(60_000, seed=block_chars)
    ids, offsets = tokenize_document(gpt2_tok, text)
    blocks = list(iter_token_blocks(gpt2_tok, text, block_chars=block_chars))
    assert len(blocks) > 10
    assert [i for b in blocks for i in b.ids] == ids
    assert [o for b in blocks for o in b.offsets] == offsets
    assert "".join(b for _, _, b, _ in text_blocks([text], block_chars)) == text
    # the pieces a document arrives in do not matter
    pieces = [text[i:i + 999] for i in range(0, len(text), 999)]
    doc = Document(0, None, "gen", reader=lambda: iter(pieces))
    assert [i for b in iter_token_blocks(gpt2_tok, doc, block_chars=block_chars) for i in b.ids] == ids
    assert count_document_tokens(gpt2_tok, doc, block_chars=block_chars) == len(ids)


class _PrefixTokenizer:
    """A character tokenizer that, like SentencePiece with a dummy prefix, marks the start of every text."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        return {"input_ids": [0] + [ord(c) for c in text],
                "offset_mapping": [(0, 0)] + [(i, i + 1) for i in range(len(text))]}


def test_tokenizers_that_are_not_block_safe_get_whole_documents():
    tok = _PrefixTokenizer()
    assert not block_safe(tok)
    text = "some words here and there " * 20
    blocks = list(iter_token_blocks(tok, text, block_chars=30))
    assert len(blocks) == 1 and blocks[0].ids == tokenize_document(tok, text)[0]


def test_text_without_safe_cuts_still_makes_bounded_blocks():
    text = "x" * 10_000
    blocks = [b for _, _, b, _ in text_blocks([text], 100)]
    assert "".join(blocks) == text and max(len(b) for b in blocks) == 1600  # hard cut at 16 blocks


def _window_tuples(wins):
    return [(w.window_id, w.doc_id, w.start, w.ids, w.source, None if w.labels is None else w.labels.tolist())
            for w in wins]


@pytest.mark.parametrize("spec, block_chars", [(None, 800), ("master", 120)])
def test_windows_and_labels_do_not_depend_on_the_block_size(gpt2_tok, spec, block_chars):
    labeller = ConceptLabeller()
    docs = list(Corpus(spec))[:25]
    kw = dict(context_length=32, bos_token_id=50256, labeller=labeller)
    ref = list(iter_windows(docs, gpt2_tok, **kw))  # every bundled document fits one block: tokenised whole
    blocked = 0
    for doc in docs:
        whole_ids, whole_off = tokenize_document(gpt2_tok, doc.text)
        blocks = list(iter_token_blocks(gpt2_tok, doc, labeller=labeller, block_chars=block_chars))
        blocked += len(blocks) > 1
        assert [i for b in blocks for i in b.ids] == whole_ids
        assert [o for b in blocks for o in b.offsets] == whole_off
        assert np.array_equal(np.concatenate([b.labels for b in blocks]), labeller.label(doc.text, whole_off))
    assert blocked >= 10
    small = list(iter_windows(docs, gpt2_tok, block_chars=block_chars, **kw))
    assert _window_tuples(small) == _window_tuples(ref)
    assert sum(int(w.labels.sum()) for w in ref) > 100
    capped = list(iter_windows(docs, gpt2_tok, block_chars=block_chars, max_tokens=500, **kw))
    assert _window_tuples(capped[:-1]) == _window_tuples(ref)[: len(capped) - 1]
    assert capped[-1].ids == ref[len(capped) - 1].ids[: len(capped[-1].ids)]
    assert sum(len(w.ids) - 1 for w in capped) == 500


def test_multi_word_concepts_across_a_cut_are_labelled(gpt2_tok):
    labeller = ConceptLabeller({"categories": {"bear": {"words": ["polar bear"]}, "word": {"words": ["ice"]}}})
    text = ("on the ice a polar bear walks " * 40).strip()
    ids, off = tokenize_document(gpt2_tok, text)
    want = labeller.label(text, off)
    for block_chars in (13, 17, 50):
        blocks = list(iter_token_blocks(gpt2_tok, text, labeller=labeller, block_chars=block_chars))
        assert np.array_equal(np.concatenate([b.labels for b in blocks]), want)
    assert want[:, 0].sum() == 80  # "polar" and " bear", 40 times


# ---------------------------------------------------------------------------------------------- bounded memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from neuronhunter.data import Corpus, iter_windows
    from neuronhunter.models.tiny import gpt2_tokenizer

    tok = gpt2_tokenizer()
    tok("warm up the tokenizer once")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    corpus = Corpus(sys.argv[1])
    n_tokens = n_windows = 0
    lazy = None
    for w in iter_windows(corpus, tok, context_length=128, bos_token_id=50256, max_tokens=int(sys.argv[2])):
        n_tokens += len(w.ids) - 1
        n_windows += 1
    lazy = not next(iter(corpus)).in_memory
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "after_kb": after, "tokens": n_tokens, "windows": n_windows,
                      "streamed": lazy}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_scanning_a_50mb_single_line_file_keeps_memory_bounded(tmp_path):
    """A 50 MB one-line text file: validated, hashed and tokenised in blocks, never read whole.

    Measured on the dev machine (GPT-2 tokenizer): the first 1 M tokens raise peak RSS by ~33 MB over the imports
    (the whole 50 MB file, 28.4 M tokens: also ~33 MB, in 63 s); tokenising the file in one call raises it by
    ~225 MB per MB of text (4.5 GB for 20 MB, so ~11 GB for 50 MB). Bound: 100 MB.
    """
    r = random.Random(0)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(1, 10))) for _ in range(5000)]
    path = tmp_path / "big.txt"
    size = 50_000_000
    with path.open("w") as fh:
        n = 0
        while n < size:
            piece = (" ".join(r.choices(words, k=20_000)) + " ")[: size - n]
            fh.write(piece)
            n += len(piece)
    assert path.stat().st_size == size
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), "1000000"], capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["streamed"] and res["tokens"] == 1_000_000 and res["windows"] == -(-1_000_000 // 127)
    growth_mb = (res["after_kb"] - res["before_kb"]) / 1024
    assert growth_mb < 100, f"peak RSS grew by {growth_mb:.0f} MB while scanning"
