"""The pieces of the Ray scan that need no Ray: shard ranges, scanning a range, counting labels once, the tree merge,
the shard store (ground truth: the single-process scan and brute-force window lists)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from neuronhunter.config import ScanConfig
from neuronhunter.data.concepts import ConceptLabeller, load_lexicon
from neuronhunter.distributed import CountOnce, ShardStore, shard_ranges, tree_merge
from neuronhunter.scan import Scanner
from neuronhunter.stats.state import ScanState


def _windows(docs, step):
    """Brute force: every window ``(doc, index, real tokens)`` of the scan, in order."""
    return [(d, j, min(step, n - j * step)) for d, n, _ in docs for j in range((n + step - 1) // step)]


def test_shard_ranges_cut_the_scan_into_whole_batches():
    rng = random.Random(0)
    for _ in range(300):
        step, batch, shards = rng.randint(1, 9), rng.randint(1, 6), rng.randint(1, 12)
        docs = []
        for i in range(rng.randint(1, 30)):
            n = rng.choice([0, 1, 2, step, step + 1, rng.randint(1, 60)])
            docs.append((2 * i + 1, n, n + rng.randint(0, 3)))
        wins = _windows(docs, step)
        ranges = shard_ranges(docs, shards=shards, batch_size=batch, step=step)
        assert len(ranges) == shards
        got = []
        for r in ranges:
            if r["windows"] == 0:
                continue
            start = next(i for i, w in enumerate(wins) if w[:2] == (r["doc"], r["skip"]))
            assert start % batch == 0  # a shard starts where a batch of the one-process scan starts
            part = wins[start:start + r["windows"]]
            assert sum(w[2] for w in part) == r["tokens"]
            assert r["doc_tokens"] == next(full for d, _, full in docs if d == r["doc"])
            got.extend(part)
        assert got == wins  # every window once, in order
        sizes = [r["windows"] for r in ranges]
        assert max(sizes) - min(sizes) <= batch * (1 + (len(wins) // batch) // shards // max(1, len(wins)))  # even


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(1)
    words = ("the river ran past the mill and the baker sold bread to a miller in spring while she sang of "
             "rain snow and sun def return class import self").split()
    lines = []
    for i in range(11):
        n = rng.choice([4, 20, 60, 150, 250])
        lines.append(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}))
        if i % 5 == 0:
            lines.append(lines[-1])  # duplicated documents: exact ties between windows
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class Cooccurrence:
    """Like the hunt's labeller: labels, and counts label co-occurrence over every block of text it labels."""

    def __init__(self, inner):
        self.inner, self.categories = inner, inner.categories
        self.cooccurrence = np.zeros((len(self.categories),) * 2, dtype=np.int64)

    def label(self, text, offsets):
        labels = self.inner.label(text, offsets)
        m = labels.astype(np.int64)
        self.cooccurrence += m.T @ m
        return labels


def _plan(scanner, cfg, shards):
    """What the Ray driver's plan computes (the worker's plan pass, without Ray)."""
    from neuronhunter.data.batches import count_document_tokens

    docs, seen, stop = [], 0, None
    for doc in scanner.documents():
        full = n = count_document_tokens(scanner.model.tokenizer, doc)
        if cfg.max_tokens is not None and seen + n >= cfg.max_tokens:
            n = cfg.max_tokens - seen
            stop = (doc.doc_id, n)
        seen += n
        docs.append((doc.doc_id, n, full))
        if stop:
            break
    step = cfg.context_length - (1 if scanner.bos is not None else 0)
    return shard_ranges(docs, shards=shards, batch_size=cfg.batch_size, step=step), stop, step


@pytest.mark.parametrize("max_tokens", [None, 1500])
def test_scanning_shard_ranges_and_merging_equals_one_pass(tiny_llama, corpus, max_tokens):
    """Each range's batches are the one-process scan's batches, so the merged state is that scan's state: equal
    maxima, minima, histograms, exemplar windows and values (ties between duplicated windows included), concept
    statistics, and co-occurrence counts of the labeller (each block of text counted once, also when a document
    spans two shards); moments to float64 rounding."""
    lexicon = load_lexicon(None)
    cfg = ScanConfig(model="tiny", corpus=str(corpus), context_length=24, batch_size=3, top_k=4,
                     max_tokens=max_tokens, split="train", heldout_fraction=0.2, compile_stats=False)
    one_lab = Cooccurrence(ConceptLabeller(lexicon))
    base = Scanner(tiny_llama, cfg, one_lab)
    cal = base.calibrate()
    one = base.run(base.new_state(cal))
    ranges, stop, step = _plan(base, cfg, shards=5)
    assert sum(r["tokens"] for r in ranges) == one.tokens
    assert any(r["skip"] > 0 for r in ranges)  # some document spans two shards
    states, counts = [], np.zeros_like(one_lab.cooccurrence)
    for r in ranges:
        if not r["windows"]:
            continue
        lab = Cooccurrence(ConceptLabeller(lexicon))
        sc = Scanner(tiny_llama, cfg.model_copy(update={"max_tokens": None}),
                     CountOnce(lab, skip=r["skip"] * step, first=r["doc_tokens"]),
                     window_range=(r["doc"], r["skip"], r["windows"]), stop=stop)
        state = sc.run(sc.new_state(cal))
        assert state.tokens == r["tokens"]
        states.append(ScanState.from_state_dict(state.state_dict()))
        counts += lab.cooccurrence
    merged = tree_merge(iter(states))
    assert np.array_equal(counts, one_lab.cooccurrence)
    assert (merged.tokens, merged.n_windows, merged.documents, merged.corpus_fp) == (
        one.tokens, one.n_windows, one.documents, one.corpus_fp)
    assert set(merged.windows) == set(one.windows)
    for layer, o in one.layers.items():
        m = merged.layers[layer]
        assert m.moments.count == o.moments.count
        for name in ("min", "max", "active", "active_neg"):
            assert torch.equal(getattr(m.moments, name), getattr(o.moments, name)), name
        for name in ("s1", "s2", "s3", "s4"):
            assert torch.allclose(getattr(m.moments, name), getattr(o.moments, name), rtol=1e-12, atol=1e-12)
        assert torch.equal(m.hist.counts, o.hist.counts)
        for name in ("topk", "bottomk", "bands_pos", "bands_neg"):
            a, b = getattr(m, name), getattr(o, name)
            assert torch.equal(a.window, b.window) and torch.equal(a.pos, b.pos), name
            if hasattr(a, "values"):
                assert torch.equal(a.values, b.values), name
        assert torch.equal(m.concepts.max, o.concepts.max) and torch.equal(m.concepts.count, o.concepts.count)


def test_count_once_skips_only_blocks_an_earlier_shard_labelled():
    class Counter:
        categories = ["a"]

        def __init__(self):
            self.cooccurrence = np.zeros((1, 1), dtype=np.int64)

        def label(self, text, offsets):
            self.cooccurrence += len(offsets)
            return np.ones((len(offsets), 1), dtype=bool)

    inner = Counter()
    wrapped = CountOnce(inner, skip=10, first=25)  # first document: 25 tokens, the first 10 scanned earlier
    for n in (4, 6, 8, 7, 5):  # blocks of the first document start at 0, 4, 10, 18; then a new document
        assert wrapped.label("x", [(0, 1)] * n).shape == (n, 1)
    assert inner.cooccurrence[0, 0] == 8 + 7 + 5  # the blocks starting at token 10 and later, and the next document


def test_shard_store_round_trip_through_fsspec(tiny_gpt2, tmp_path):
    """A store at an fsspec URI (memory://) holds what a local folder holds: state, then record; remove deletes
    only shard files."""
    pytest.importorskip("fsspec")
    cfg = ScanConfig(model="tiny", corpus=None, layers=[0], context_length=16, max_tokens=100)
    state = Scanner(tiny_gpt2, cfg).run()
    for location in ("memory://nh-test/shards", str(tmp_path / "store")):
        store = ShardStore(location)
        assert store.records() == {}
        store.put_state(3, state, {"run": "r", "tokens": state.tokens})
        assert store.records() == {3: {"run": "r", "tokens": state.tokens}}
        loaded, extra = store.load_state(3)
        assert extra["run"] == "r" and loaded.tokens == state.tokens
        assert torch.equal(loaded.layers[0].moments.max, state.layers[0].moments.max)
        store.remove()
        assert store.records() == {}
    assert not (tmp_path / "store").exists()  # a run's own folder in the store goes once it holds nothing
    store = ShardStore(str(tmp_path / "store"))
    store.put_state(1, state, {"run": "r"})
    (tmp_path / "store" / "notes.txt").write_text("mine", encoding="utf-8")
    store.remove()
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["notes.txt"]  # only shard files are removed


def test_a_corpus_can_start_at_a_file_without_reading_the_files_before(tmp_path):
    """A shard starts at its first document's file: the files before it are not read (here one holds a bad line,
    which a full read with on_error='fail' stops at), and documents keep their ids in the whole corpus."""
    from neuronhunter.data.corpus import Corpus
    from neuronhunter.errors import CorpusError

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\nnot json\n{"text": "two"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n\n{"text": "four"}\n')
    (tmp_path / "c.txt").write_text("five")
    assert Corpus(tmp_path).files() == ["a.jsonl", "b.jsonl", "c.txt"]
    assert Corpus(tmp_path / "a.jsonl").files() is None and Corpus("master").files() is None
    with pytest.raises(CorpusError, match="a.jsonl:2"):
        list(Corpus(tmp_path))
    whole = list(Corpus(tmp_path, on_error="skip"))
    assert [(d.doc_id, d.source) for d in whole] == [(0, "a.jsonl:1"), (1, "a.jsonl:3"), (2, "b.jsonl:1"),
                                                      (3, "b.jsonl:3"), (4, "c.txt")]
    started = list(Corpus(tmp_path, start=("b.jsonl", 2)))
    assert started == whole[2:]
    with pytest.raises(CorpusError, match="gone"):
        list(Corpus(tmp_path, start=("x.jsonl", 0)))


def test_plan_difference_names_what_changed_and_tolerates_new_options_at_their_default():
    from neuronhunter.shards import Plan

    old = Plan(4, {"top_k": 20, "corpus": "c"}, "m", "s", {"digest": "d"}, None, [{"windows": 1}])
    newer = Plan(4, {"top_k": 20, "corpus": "c", "new_option": 1}, "m", "s", {"digest": "d"}, None, [{"windows": 1}])
    assert old.difference(newer, {"new_option": 1}) is None  # an option added since, left at its default
    assert old.difference(newer, {"new_option": 0}) == "a different configuration (new_option)"
    assert old.difference(Plan(4, {"top_k": 5, "corpus": "c"}, "m", "s", {"digest": "d"}, None, [{"windows": 1}])) \
        == "a different configuration (top_k)"
    assert "shards" in old.difference(Plan(8, old.config, "m", "s", old.corpus, None, old.ranges))
    assert "weights" in old.difference(Plan(4, old.config, "x", "s", old.corpus, None, old.ranges))
    assert "corpus" in old.difference(Plan(4, old.config, "m", "s", {"digest": "e"}, None, old.ranges))
