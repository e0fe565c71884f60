"""The scan against a brute-force computation with plain forward passes, merge of shards, resume, outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuronhunter.config import ScanConfig
from neuronhunter.data import Corpus, iter_windows
from neuronhunter.errors import RunDirError
from neuronhunter.models import Site
from neuronhunter.scan import CHECKPOINT, Scanner, load_state, run_scan

TEXT = [
    "The old lighthouse keeper climbed the stairs every evening at seven. He lit the lamp, wrote in his log, and "
    "watched the ships pass the rocks of the northern bay. In winter the storms were long and the nights longer.",
    "Bread dough needs time. Mix flour, water, salt and a little yeast, then wait. The gluten forms on its own; "
    "folding it twice in the first hour is enough. Bake it hot, at two hundred and thirty degrees.",
    "A small robot rolled across the laboratory floor, bumped into a chair, turned left and tried again. The "
    "engineers cheered each time it found the door without help.",
]


@pytest.fixture()
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, t in enumerate(TEXT):
        (d / f"{i}.txt").write_text(t)
    return d


def _brute_force(model, cfg, corpus):
    """Every counted token's activation via run_with_cache, window by window (independent of the accumulators)."""
    bos = model.bos_token_id if cfg.prepend_bos else None
    rows, windows = {}, []
    for w in iter_windows(Corpus(corpus), model.tokenizer, context_length=cfg.context_length, bos_token_id=bos):
        ids = torch.tensor([w.ids])
        _, cache = model.run_with_cache(ids, sites=[Site.mlp_post(L) for L in cfg.layers])
        windows.append(w)
        for L in cfg.layers:
            a = cache[Site.mlp_post(L)][0]
            rows.setdefault(L, []).append(a[1:] if not cfg.include_first else a)
    return {L: torch.cat(v) for L, v in rows.items()}, windows


def _per_window(model, windows, layer):
    """{window id: activations [pos, d]} of one layer, one plain forward pass per window."""
    out = {}
    for w in windows:
        _, cache = model.run_with_cache(torch.tensor([w.ids]), sites=[Site.mlp_post(layer)])
        out[w.window_id] = cache[Site.mlp_post(layer)][0]
    return out


@pytest.mark.parametrize(("family", "compile_stats"), [("gpt2", True), ("llama", True), ("llama", False)])
def test_scan_matches_brute_force(family, compile_stats, corpus_dir, tmp_path, request):
    model = request.getfixturevalue(f"tiny_{family}")
    cfg = ScanConfig(model="tiny", corpus=str(corpus_dir), out=str(tmp_path / "run"), layers=[0, 1],
                     context_length=16, batch_size=3, top_k=3, formats=["parquet", "csv", "json"],
                     compile_stats=compile_stats)
    result = run_scan(cfg, model=model)
    ref, windows = _brute_force(model, cfg, corpus_dir)
    neurons = pd.read_parquet(tmp_path / "run" / "neurons.parquet")
    assert len(neurons) == 2 * model.d_mlp
    for L in (0, 1):
        x = ref[L].double()
        sub = neurons[neurons.layer == L].sort_values("neuron")
        assert (sub["count"] == x.shape[0]).all()
        np.testing.assert_allclose(sub["mean"], x.mean(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(sub["std"], x.std(0, unbiased=False).numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(sub["max"], x.amax(0).numpy(), atol=1e-6)
        np.testing.assert_allclose(sub["frac_active"], (x > 0).double().mean(0).numpy())
        # per-bin counts; a value within 1e-5 of a bin edge may fall either side (batched and single-window
        # forward passes differ in the last float bits), so those are only counted, not placed
        lo, hi = cfg.hist_range
        pos = (x.numpy() - lo) / ((hi - lo) / cfg.hist_bins)
        edge = np.abs(pos - np.round(pos)) < 1e-5 * cfg.hist_bins / (hi - lo)
        bins = np.clip(np.floor(pos).astype(int) + 1, 0, cfg.hist_bins + 1)
        certain = np.stack([np.bincount(bins[~edge[:, j], j], minlength=cfg.hist_bins + 2) for j in range(x.shape[1])])
        got = np.stack(sub["hist"].to_list())
        assert (got >= certain).all() and ((got - certain).sum(1) == edge.sum(0)).all()
        assert edge.mean() < 0.01  # (GELU puts a few values just below 0, an edge)
    # top-1 example of a neuron = the window holding its global max
    ex = pd.read_parquet(tmp_path / "run" / "examples.parquet")
    top = ex[(ex.layer == 1) & (ex.neuron == 5) & (ex["rank"] == 0)].iloc[0]
    assert top.activation == pytest.approx(float(ref[1][:, 5].max()), abs=1e-6)
    assert "[[" + top.token + "]]" in top.context
    # every top example sits at the first maximum of its window (per-window activations from the brute force)
    per_window = _per_window(model, windows, layer=1)
    for row in ex[ex.layer == 1].itertuples():
        acts = per_window[row.window][1:, row.neuron]  # counted positions 1.. (position 0 excluded)
        assert row.window_pos == 1 + int(acts.argmax())
        assert row.activation == pytest.approx(float(acts.max()), abs=1e-6)
    assert set(ex["rank"]) == {0, 1, 2}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["tokens"] == result.state.tokens == sum(len(w.ids) - 1 for w in windows)
    assert manifest["prepend_bos"] is True and manifest["layers"] == [0, 1]
    assert len(manifest["corpus"]["fingerprint"]) == 64 and manifest["corpus"]["documents"] == len(TEXT)
    assert manifest["corpus"]["tokens"] == result.state.tokens and len(manifest["model_fingerprint"]) == 64
    for name in ("neurons.csv", "neurons.json", "examples.csv", "examples.json", "stats.pt", "config.json"):
        assert (tmp_path / "run" / name).exists()
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / CHECKPOINT).exists()
    assert not (tmp_path / ".run.partial").exists()  # the working folder was swapped into place


def test_split_corpus_merge_equals_one_pass(tiny_gpt2, tmp_path):
    parts = []
    for i, chunk in enumerate((TEXT[:2], TEXT[2:])):
        d = tmp_path / f"c{i}"
        d.mkdir()
        for j, t in enumerate(chunk):  # the same file names as in the whole corpus: the fingerprint reads sources
            (d / f"{2 * i + j}.txt").write_text(t)
        parts.append(d)
    whole = tmp_path / "all"
    whole.mkdir()
    for j, t in enumerate(TEXT):
        (whole / f"{j}.txt").write_text(t)
    kw = dict(model="tiny", layers=[0, 1], context_length=16, batch_size=2, top_k=4)
    one = run_scan(ScanConfig(corpus=str(whole), **kw), model=tiny_gpt2, write=False).state
    a = run_scan(ScanConfig(corpus=str(parts[0]), **kw), model=tiny_gpt2, write=False).state
    b = run_scan(ScanConfig(corpus=str(parts[1]), **kw), model=tiny_gpt2, write=False).state
    # window ids of the second shard follow the first shard's
    offset = a.n_windows
    for ls in b.layers.values():
        ls.topk.window = torch.where(ls.topk.window >= 0, ls.topk.window + offset, ls.topk.window)
    b.windows = {w + offset: v for w, v in b.windows.items()}
    with pytest.raises(RunDirError, match="overlap"):  # window ids must be global: a shard numbered from 0 clashes
        run_scan(ScanConfig(corpus=str(parts[0]), **kw), model=tiny_gpt2, write=False).state.merge(
            run_scan(ScanConfig(corpus=str(parts[1]), **kw), model=tiny_gpt2, write=False).state)
    merged = a.merge(b)
    assert merged.corpus_fp == one.corpus_fp and merged.documents == one.documents == len(TEXT)
    assert merged.tokens == one.tokens
    for L in (0, 1):
        m, o = merged.layers[L], one.layers[L]
        assert torch.allclose(m.moments.s1, o.moments.s1, atol=1e-5)
        assert torch.allclose(m.moments.s2, o.moments.s2, atol=1e-5)
        assert torch.equal(m.hist.counts, o.hist.counts)
        assert torch.allclose(m.moments.max, o.moments.max, atol=1e-6)  # batch composition changes rounding
        assert torch.allclose(m.topk.values, o.topk.values)
        assert torch.equal(m.topk.window, o.topk.window)


def test_resume_from_checkpoint_equals_uninterrupted(tiny_gpt2, corpus_dir, tmp_path):
    kw = dict(model="tiny", corpus=str(corpus_dir), layers=[1], context_length=12, batch_size=1, top_k=3,
              checkpoint_every=2, formats=["parquet"])
    full = run_scan(ScanConfig(out=str(tmp_path / "full"), **kw), model=tiny_gpt2)

    class Interrupt(Exception):
        pass

    calls = {"n": 0}

    def stop_after_three(done, total):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt

    out = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run_scan(ScanConfig(out=str(out), **kw), model=tiny_gpt2, progress=stop_after_three)
    partial = tmp_path / ".cut.partial"  # the interrupted run's working folder; nothing at out yet
    assert (partial / CHECKPOINT).exists() and not out.exists()
    state, _ = load_state(partial / CHECKPOINT)
    assert state.batches_done == 2
    resumed = run_scan(ScanConfig(out=str(out), **kw), model=tiny_gpt2, resume=True)
    assert resumed.state.tokens == full.state.tokens
    a = pd.read_parquet(out / "neurons.parquet")
    b = pd.read_parquet(tmp_path / "full" / "neurons.parquet")
    pd.testing.assert_frame_equal(a.drop(columns=["hist"]), b.drop(columns=["hist"]), atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "examples.parquet"),
                                  pd.read_parquet(tmp_path / "full" / "examples.parquet"))


def test_refuses_to_clobber_complete_run(tiny_gpt2, corpus_dir, tmp_path):
    cfg = ScanConfig(model="tiny", corpus=str(corpus_dir), out=str(tmp_path / "r"), layers=[0], context_length=16,
                     formats=["parquet"])
    run_scan(cfg, model=tiny_gpt2)
    with pytest.raises(RunDirError, match="--overwrite"):
        run_scan(cfg, model=tiny_gpt2)
    run_scan(cfg, model=tiny_gpt2, overwrite=True)


def test_window_store_is_bounded(tiny_gpt2, tmp_path):
    """Memory does not grow with the corpus: stored windows are only those some top-k refers to."""
    text = " ".join(TEXT) * 6
    (tmp_path / "big.txt").write_text(text)
    cfg = ScanConfig(model="tiny", corpus=str(tmp_path / "big.txt"), layers=[0], neurons_per_layer=2,
                     context_length=8, batch_size=4, top_k=2)
    scanner = Scanner(tiny_gpt2, cfg)
    state = scanner.run()
    assert state.n_windows > 40
    assert len(state.windows) <= 2 * 2  # neurons x k
    assert state.layers[0].d == 2


def test_deterministic(tiny_llama, corpus_dir):
    cfg = ScanConfig(model="tiny", corpus=str(corpus_dir), layers=[0, 1], context_length=16, top_k=2)
    a = run_scan(cfg, model=tiny_llama, write=False)
    b = run_scan(cfg, model=tiny_llama, write=False)
    pd.testing.assert_frame_equal(a.neurons_frame(), b.neurons_frame())
    pd.testing.assert_frame_equal(a.examples_frame(), b.examples_frame())


def test_batch_size_does_not_change_results(tiny_llama, corpus_dir):
    """Statistics are per token and per window: how windows are grouped into batches (and padded) never changes
    counts, histograms or the top-k windows and positions (ties go to the earlier window); sums and maxima agree up
    to float rounding."""
    states = [run_scan(ScanConfig(model="tiny", corpus=str(corpus_dir), layers=[0, 1], context_length=6, top_k=3,
                                  batch_size=bs), model=tiny_llama, write=False).state for bs in (1, 3, 8)]
    ref = states[0]
    assert ref.n_windows > 8  # the largest batch size sees more than one batch
    for st in states[1:]:
        assert st.tokens == ref.tokens and st.n_windows == ref.n_windows
        for L in (0, 1):
            a, b = st.layers[L], ref.layers[L]
            assert a.moments.count == b.moments.count
            assert torch.equal(a.moments.active, b.moments.active)
            assert torch.equal(a.hist.counts, b.hist.counts)
            assert torch.allclose(a.moments.s2, b.moments.s2, rtol=1e-4, atol=1e-5)
            assert torch.allclose(a.moments.max, b.moments.max, atol=1e-5)
            assert torch.equal(a.topk.window, b.topk.window) and torch.equal(a.topk.pos, b.topk.pos)
            assert torch.allclose(a.positions.sum, b.positions.sum, atol=1e-4)
