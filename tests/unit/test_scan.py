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
from neuronhunter.scan import CHECKPOINT, Scanner, load_state, run_scan, window_key
from neuronhunter.stats.state import ScanState

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
    step = cfg.context_length - (bos is not None)
    for w in iter_windows(Corpus(corpus), model.tokenizer, context_length=cfg.context_length, bos_token_id=bos):
        w.window_id = window_key(w.doc_id, w.start // step)  # the scan's global window ids
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
                     compile_stats=compile_stats, calibration_windows=4)
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
        # per-bin counts; a value within float rounding of a bin edge may fall either side (batched and single-window
        # forward passes differ in the last float bits), so those are only counted, not placed
        # each neuron's own range, calibrated on the first windows: their min and max widened by a quarter of
        # the width on each side
        lo, hi = sub["hist_lo"].to_numpy(), sub["hist_hi"].to_numpy()
        first = torch.cat([_per_window(model, windows[: cfg.calibration_windows], L)[w.window_id][1:]
                           for w in windows[: cfg.calibration_windows]]).double()
        width = (first.amax(0) - first.amin(0)).numpy()
        np.testing.assert_allclose(lo, first.amin(0).numpy() - 0.25 * width, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hi, first.amax(0).numpy() + 0.25 * width, rtol=1e-5, atol=1e-6)
        pos = (x.numpy() - lo) / ((hi - lo) / cfg.hist_bins)
        edge = np.abs(pos - np.round(pos)) < 2e-4  # in bins: float32 rounding of x * scale + shift
        bins = np.clip(np.floor(pos).astype(int) + 1, 0, cfg.hist_bins + 1)
        certain = np.stack([np.bincount(bins[~edge[:, j], j], minlength=cfg.hist_bins + 2) for j in range(x.shape[1])])
        got = np.stack(sub["hist"].to_list())
        assert (got >= certain).all() and ((got - certain).sum(1) == edge.sum(0)).all()
        assert edge.mean() < 0.01  # (GELU puts a few values just below 0, an edge)
    # top-1 example of a neuron = the window holding its global max
    ex = pd.read_parquet(tmp_path / "run" / "examples.parquet")
    top = ex[(ex.layer == 1) & (ex.neuron == 5) & (ex.kind == "top") & (ex["rank"] == 0)].iloc[0]
    assert top.activation == pytest.approx(float(ref[1][:, 5].max()), abs=1e-6)
    assert "[[" + top.token + "]]" in top.context
    bottom = ex[(ex.layer == 1) & (ex.neuron == 5) & (ex.kind == "bottom") & (ex["rank"] == 0)].iloc[0]
    assert bottom.activation == pytest.approx(float(ref[1][:, 5].min()), abs=1e-6) and bottom.direction == "-"
    # every exemplar sits at the first maximum (direction +) or minimum (-) of its window, from the brute force
    per_window = _per_window(model, windows, layer=1)
    peaks = {sign: torch.stack([(sign * per_window[w.window_id][1:]).amax(0) for w in windows]) for sign in (1, -1)}
    neurons = neurons.set_index(["layer", "neuron"])
    for row in ex[ex.layer == 1].itertuples():
        sign = 1 if row.direction == "+" else -1
        acts = sign * per_window[row.window][1:, row.neuron]  # counted positions 1.. (position 0 excluded)
        assert row.window_pos == 1 + int(acts.argmax())
        assert row.activation == pytest.approx(sign * float(acts.max()), abs=1e-6)
        if row.kind in ("top", "bottom"):  # the k best windows in that direction
            assert float(acts.max()) >= float(peaks[sign][:, row.neuron].sort(descending=True).values[2]) - 1e-6
        else:  # a band sample: its peak lies in its band (fractions of the calibrated scale)
            lo_v, hi_v = neurons.loc[(1, row.neuron), ["hist_lo", "hist_hi"]]
            scale = (5 * hi_v + lo_v) / 6 if sign > 0 else -(5 * lo_v + hi_v) / 6  # the calibration extreme
            rel = float(acts.max()) / scale
            assert rel >= row.band_lo - 1e-4
            upper = [0.1, 0.3, 0.5, 0.7, np.inf][row.band]
            assert rel < upper + 1e-4
    for kind in ("top", "bottom"):
        assert set(ex[ex.kind == kind]["rank"]) == {0, 1, 2}
    # band samples: in every band, the windows with the smallest hashes among those whose peak falls in it
    from neuronhunter.stats.exemplars import window_hash

    h = window_hash([w.window_id for w in windows], cfg.seed)
    ls = result.state.layers[1]
    for sign, bands in ((1, ls.bands_pos), (-1, ls.bands_neg)):
        band_of = bands.band_of(peaks[sign])  # [windows, d]
        for n in (0, 7):
            for b in range(bands.n_bands):
                members = [i for i in range(len(windows)) if int(band_of[i, n]) == b]
                expect = sorted(members, key=lambda i: int(h[i]))[: bands.r]
                got = [int(w) for w in bands.window[b, :, n] if w >= 0]
                assert got == [windows[i].window_id for i in expect]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["tokens"] == result.state.tokens == sum(len(w.ids) - 1 for w in windows)
    assert manifest["prepend_bos"] is True and manifest["layers"] == [0, 1]
    assert len(manifest["corpus"]["fingerprint"]) == 64 and manifest["corpus"]["documents"] == len(TEXT)
    assert manifest["corpus"]["tokens"] == result.state.tokens and len(manifest["model_fingerprint"]) == 64
    for name in ("neurons.csv", "neurons.json", "examples.csv", "examples.json", "stats.pt", "config.json"):
        assert (tmp_path / "run" / name).exists()
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / CHECKPOINT).exists()
    assert not (tmp_path / ".run.partial").exists()  # the working folder was swapped into place


def test_sharded_scans_merge_into_the_one_pass_result(tiny_gpt2, tmp_path):
    """Shards (documents split by a stable hash of their source) calibrate on the same first windows and number
    windows globally, so merging them in any order equals one pass: counts, histograms and every exemplar."""
    whole = tmp_path / "all"
    whole.mkdir()
    texts = TEXT + [" ".join(reversed(t.split())) for t in TEXT]  # six different documents (no exact ties)
    for j, t in enumerate(texts):
        (whole / f"{j}.txt").write_text(t)
    cfg = ScanConfig(model="tiny", corpus=str(whole), layers=[0, 1], context_length=16, batch_size=2, top_k=4)
    one = Scanner(tiny_gpt2, cfg).run()
    shards = [Scanner(tiny_gpt2, cfg, shard=(i, 3)).run() for i in range(3)]
    assert all(s.tokens for s in shards) and sum(s.tokens for s in shards) == one.tokens
    for order in ((0, 1, 2), (2, 0, 1)):
        parts = [ScanState.from_state_dict(shards[i].state_dict()) for i in order]
        merged = parts[0].merge(parts[1]).merge(parts[2])
        assert merged.corpus_fp == one.corpus_fp and merged.documents == one.documents == 2 * len(TEXT)
        assert merged.tokens == one.tokens
        for L in (0, 1):
            m, o = merged.layers[L], one.layers[L]
            assert torch.allclose(m.moments.s1, o.moments.s1, atol=1e-5)
            assert torch.allclose(m.moments.s2, o.moments.s2, atol=1e-5)
            assert torch.equal(m.hist.counts, o.hist.counts)
            assert torch.allclose(m.moments.max, o.moments.max, atol=1e-6)  # batch composition changes rounding
            for name in ("topk", "bottomk"):
                a, b = getattr(m, name), getattr(o, name)
                assert torch.allclose(a.values, b.values, atol=1e-6) and torch.equal(a.window, b.window)
            for name in ("bands_pos", "bands_neg"):
                a, b = getattr(m, name), getattr(o, name)
                assert torch.equal(a.window, b.window) and torch.equal(a.pos, b.pos)
    with pytest.raises(RunDirError, match="overlap"):  # the same windows twice
        ScanState.from_state_dict(shards[0].state_dict()).merge(ScanState.from_state_dict(shards[0].state_dict()))
    other = ScanState.from_state_dict(shards[1].state_dict())
    other.layers[0].calibration.lo += 1
    other.layers[0].hist.lo += 1
    with pytest.raises(RunDirError, match="calibrated differently"):
        ScanState.from_state_dict(shards[0].state_dict()).merge(other)


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
    ls = state.layers[0]
    per_neuron = 2 * ls.topk.k + 2 * ls.bands_pos.n_bands * ls.bands_pos.r  # top, bottom and band samples
    assert len(state.windows) <= 2 * per_neuron < state.n_windows  # neurons x exemplars, not the corpus
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
