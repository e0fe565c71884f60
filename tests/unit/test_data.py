"""Corpus formats and errors, windows and BOS handling."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neuronhunter.data import Corpus, iter_batches, iter_windows
from neuronhunter.errors import CorpusError


def test_bundled_corpus_and_master_text():
    docs = list(Corpus(None))
    assert len(docs) >= 40
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    master = list(Corpus("master"))
    assert len(master) > 10 and all(d.text.strip() for d in master)


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("beta")
    (folder / "a.txt").write_text("alpha")
    (folder / "skip.md").write_text("not a txt")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"body": ["x y", "  ", "z"]}).to_parquet(pq)
    assert [d.text for d in Corpus(tmp_path / "a.txt")] == ["first document"]
    assert [d.text for d in Corpus(folder)] == ["alpha", "beta"]
    assert [d.text for d in Corpus(jl)] == ["one", "two"]
    assert [d.text for d in Corpus(pq, text_field="body")] == ["x y", "z"]  # blank documents skipped
    c = Corpus(jl)
    list(c)
    assert c.n_docs == 2 and len(c.sha256) == 64


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "not found"),
        (lambda p: (p / "e.txt").write_text("   \n") and p / "e.txt", "empty"),
        (lambda p: (p / "b.txt").write_bytes(b"\x00\x01\x02binary") and p / "b.txt", "not a text file"),
        (lambda p: (p / "l.txt").write_bytes("caf\xe9".encode("latin-1")) and p / "l.txt", "UTF-8"),
        (lambda p: (p / "j.jsonl").write_text("{bad json\n") and p / "j.jsonl", "not valid JSON"),
        (lambda p: (p / "k.jsonl").write_text('{"body": "x"}\n') and p / "k.jsonl", "no string field 'text'"),
        (lambda p: (p / "d").mkdir() or p / "d", "no .txt files"),
    ],
)
def test_corpus_errors(tmp_path, setup, message):
    with pytest.raises(CorpusError, match=message):
        Corpus(setup(tmp_path)).check()


def test_windows_bos_and_determinism(gpt2_tok, tmp_path):
    (tmp_path / "t.txt").write_text("word " * 50)
    ids = gpt2_tok("word " * 50, add_special_tokens=False)["input_ids"]
    wins = list(iter_windows(Corpus(tmp_path / "t.txt"), gpt2_tok, context_length=16, bos_token_id=50256))
    assert all(w.ids[0] == 50256 for w in wins)
    assert [tok for w in wins for tok in w.ids[1:]] == ids  # every token once, in order
    assert [w.start for w in wins] == list(range(0, len(ids), 15))
    nobos = list(iter_windows(Corpus(tmp_path / "t.txt"), gpt2_tok, context_length=16, bos_token_id=None))
    assert [tok for w in nobos for tok in w.ids] == ids and len(nobos[0].ids) == 16
    capped = list(iter_windows(Corpus(tmp_path / "t.txt"), gpt2_tok, context_length=16, bos_token_id=50256,
                               max_tokens=20))
    assert sum(len(w.ids) - 1 for w in capped) == 20
    batches = list(iter_batches(iter(wins), batch_size=3, pad_token_id=0, has_bos=True))
    last, _ = batches[-1]
    assert last.attention_mask.sum() == sum(len(w.ids) for w in wins[(len(batches) - 1) * 3:])
    again = list(iter_windows(Corpus(tmp_path / "t.txt"), gpt2_tok, context_length=16, bos_token_id=50256))
    assert [w.ids for w in again] == [w.ids for w in wins]
