"""Accumulators against independent numpy computations, and the merge property merge(a, b) == fit(a ++ b)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronhunter.stats import ConceptStats, Histogram, LayerStats, Moments, PositionStats, StatsSpec, TopK


def _ref_moments(x: np.ndarray):
    mean = x.mean(0)
    std = x.std(0)
    z = (x - mean) / std
    return mean, std, (z**3).mean(0), (z**4).mean(0) - 3


def test_moments_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=g) * torch.linspace(0.5, 3, 7) + torch.linspace(-1, 1, 7)
    m = Moments(7, threshold=0.25)
    m.update(x[:200])
    m.update(x[200:])
    s = m.summary()
    mean, std, skew, kurt = _ref_moments(x.double().numpy())
    np.testing.assert_allclose(s["mean"].numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(s["std"].numpy(), std, rtol=1e-5)
    np.testing.assert_allclose(s["skew"].numpy(), skew, atol=1e-4)
    np.testing.assert_allclose(s["kurtosis"].numpy(), kurt, atol=1e-4)
    np.testing.assert_allclose(s["frac_active"].numpy(), (x.numpy() > 0.25).mean(0))
    assert torch.equal(m.min, x.amin(0)) and torch.equal(m.max, x.amax(0))


def test_histogram_matches_numpy_with_under_and_overflow():
    x = torch.tensor([[-3.0, 0.0], [-2.0, 0.5], [0.99, 4.0], [3.999, 10.0]])
    h = Histogram(2, lo=-2.0, hi=4.0, n_bins=6)
    h.update(x)
    for n in range(2):
        col = x[:, n].numpy()
        inner, _ = np.histogram(col[(col >= -2) & (col < 4)], bins=6, range=(-2, 4))
        expected = [int((col < -2).sum()), *inner.tolist(), int((col >= 4).sum())]
        assert h.counts[n].tolist() == expected
    assert h.counts.sum().item() == x.numel()


def test_topk_keeps_best_windows_and_positions():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(10, 6, 3, generator=g)  # windows, pos, neurons
    tk = TopK(3, k=4)
    for start in range(0, 10, 3):
        chunk = acts[start : start + 3]
        wmax, wpos = chunk.max(1)
        tk.update(wmax, wpos, torch.arange(start, start + chunk.shape[0]))
    for n in range(3):
        per_window = acts[:, :, n].max(1)
        best = torch.argsort(per_window.values, descending=True)[:4]
        assert tk.window[:, n].tolist() == best.tolist()
        assert tk.pos[:, n].tolist() == per_window.indices[best].tolist()
        assert torch.allclose(tk.values[:, n], per_window.values[best])


def test_concept_stats_match_masked_means():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 5, generator=g)
    labels = torch.rand(100, 3, generator=g) < 0.3
    cs = ConceptStats(5, ["a", "b", "c"])
    cs.update(x[:40], labels[:40])
    cs.update(x[40:], labels[40:])
    means = cs.means()
    for c in range(3):
        sel = labels[:, c]
        assert cs.count[c] == int(sel.sum())
        assert torch.allclose(means[c].float(), x[sel].mean(0), atol=1e-6)
        assert torch.equal(cs.max[c], x[sel].amax(0))
    none = ~labels.any(1)
    assert torch.allclose(means[3].float(), x[none].mean(0), atol=1e-6)


def _layer_stats(acts, mask, labels, spec):
    ls = LayerStats(0, acts.shape[-1], spec)
    ls.update(acts, mask, torch.arange(acts.shape[0]), labels)
    return ls


def test_layer_stats_exclude_position_zero_and_padding():
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(4, 6, 5, generator=g)
    acts[:, 0] = 1000.0  # a massive BOS activation must not leak into anything
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    acts[1, 4:] = 500.0  # padding garbage
    labels = torch.rand(4, 6, 2, generator=g) < 0.5
    spec = StatsSpec(top_k=2, hist_lo=-4, hist_hi=4, hist_bins=8, n_positions=6, categories=("a", "b"))
    ls = _layer_stats(acts, mask, labels, spec)
    keep = mask.bool().clone()
    keep[:, 0] = False
    x = acts[keep]
    s = ls.moments.summary()
    assert ls.moments.count == x.shape[0] == 4 * 5 - 2
    assert torch.allclose(s["mean"].float(), x.mean(0), atol=1e-5)
    assert torch.equal(ls.moments.max, x.amax(0))
    assert ls.hist.counts.sum().item() == x.numel()
    assert ls.topk.values.max() < 100
    assert ls.concepts.count[:2].tolist() == labels[keep].sum(0).tolist()
    # position 0 is tracked separately
    assert torch.all(ls.positions.first_max == 1000.0)
    assert torch.allclose(ls.positions.means()[0].float(), torch.full((5,), 1000.0))
    # with include_first the BOS values are counted
    ls2 = _layer_stats(acts, mask, labels, StatsSpec(top_k=2, n_positions=6, include_first=True))
    assert torch.all(ls2.moments.max == 1000.0) and ls2.moments.count == 4 * 6 - 2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), split=st.integers(1, 7), include_first=st.booleans())
def test_merge_equals_single_pass(seed, split, include_first):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(8, 5, 4, generator=g) * 2
    mask = (torch.rand(8, 5, generator=g) < 0.85).long()
    mask[:, 0] = 1
    mask = torch.cummin(mask, dim=1).values  # right padding
    labels = torch.rand(8, 5, 3, generator=g) < 0.3
    spec = StatsSpec(top_k=3, hist_lo=-3, hist_hi=3, hist_bins=12, n_positions=5, include_first=include_first,
                     categories=("a", "b", "c"))
    whole = LayerStats(0, 4, spec)
    whole.update(acts, mask, torch.arange(8), labels)
    a, b = LayerStats(0, 4, spec), LayerStats(0, 4, spec)
    a.update(acts[:split], mask[:split], torch.arange(split), labels[:split])
    b.update(acts[split:], mask[split:], torch.arange(split, 8), labels[split:])
    merged = LayerStats.from_state_dict(a.state_dict()).merge(b)
    assert merged.moments.count == whole.moments.count
    for name in ("s1", "s2", "s3", "s4"):
        assert torch.allclose(getattr(merged.moments, name), getattr(whole.moments, name), rtol=1e-5, atol=1e-4)
    assert torch.equal(merged.moments.min, whole.moments.min)
    assert torch.equal(merged.moments.max, whole.moments.max)
    assert torch.equal(merged.moments.active, whole.moments.active)
    assert torch.equal(merged.hist.counts, whole.hist.counts)
    assert torch.allclose(merged.topk.values, whole.topk.values)
    assert torch.equal(merged.topk.window, whole.topk.window)
    assert torch.equal(merged.topk.pos, whole.topk.pos)
    assert torch.allclose(merged.concepts.sum, whole.concepts.sum, atol=1e-4)
    assert torch.equal(merged.concepts.count, whole.concepts.count)
    assert torch.equal(merged.concepts.max, whole.concepts.max)
    assert torch.allclose(merged.positions.sum, whole.positions.sum, atol=1e-4)
    assert torch.equal(merged.positions.first_max, whole.positions.first_max)


def test_histogram_rejects_bad_range():
    with pytest.raises(ValueError):
        Histogram(3, lo=1.0, hi=1.0)


def test_update_works_inside_and_outside_inference_mode():
    """Work buffers made during an inference-mode scan must stay usable outside it (and vice versa)."""
    acts = torch.randn(2, 4, 3)
    mask = torch.ones(2, 4, dtype=torch.long)
    ls = LayerStats(0, 3, StatsSpec(n_positions=4))
    with torch.inference_mode():
        ls.update(acts, mask, torch.arange(2))
    ls.update(acts.clone(), mask, torch.arange(2, 4))
    assert ls.moments.count == 2 * 2 * 3


def test_histogram_bins_every_neuron_of_a_wide_layer():
    """1,536 neurons x 62 bins: flat indices reach ~95,000, where float32 can no longer hold a fraction of a bin.
    Values sit at a random fraction (0.002..0.998) of their bin, so every one has a single right answer."""
    g = torch.Generator().manual_seed(4)
    d, n_bins, lo, hi = 1536, 60, -2.0, 4.0
    width = (hi - lo) / n_bins
    which = torch.randint(-3, n_bins + 3, (300, d), generator=g).double()  # includes under- and overflow
    frac = 0.002 + 0.996 * torch.rand(300, d, generator=g, dtype=torch.float64)
    x = (lo + (which + frac) * width).float()
    h = Histogram(d, lo=lo, hi=hi, n_bins=n_bins)
    h.update(x[:150])
    h.update(x[150:])
    expected = np.zeros((d, n_bins + 2), dtype=np.int64)
    idx = np.clip(which.numpy().astype(np.int64) + 1, 0, n_bins + 1)
    for j in range(d):
        expected[j] = np.bincount(idx[:, j], minlength=n_bins + 2)
    np.testing.assert_array_equal(h.counts.numpy(), expected)


def _batch(seed: int, b: int = 5, t: int = 9, d: int = 40):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(b, t, d, generator=g) * 1.5
    acts[:, 0] = 900.0 + 10 * torch.arange(b).view(b, 1)  # massive sequence-starter values (distinct: no ties)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    acts[mask == 0] = -700.0  # padding garbage
    labels = torch.rand(b, t, 3, generator=g) < 0.3
    return acts, mask, labels


@pytest.mark.parametrize(("include_first", "threshold"), [(False, 0.0), (True, 0.0), (False, -0.5)])
def test_fused_and_eager_statistics_agree_with_plain_computation(include_first, threshold):
    acts, mask, labels = _batch(5)
    before = acts.clone()
    spec = StatsSpec(top_k=3, hist_lo=-3, hist_hi=3, hist_bins=12, n_positions=9, include_first=include_first,
                     categories=("a", "b", "c"), threshold=threshold)
    fused, eager = LayerStats(0, 40, spec, compile=True), LayerStats(0, 40, spec, compile=False)
    ids = torch.arange(5) + 100
    fused.update(acts, mask, ids, labels)
    eager.update(acts, mask, ids, labels)
    assert torch.equal(acts, before)  # the activations handed in are left as they were
    keep = mask.bool().clone()
    if not include_first:
        keep[:, 0] = False
    x = acts[keep].double()
    for ls in (fused, eager):
        m = ls.moments
        assert m.count == x.shape[0]
        assert torch.equal(m.min, x.amin(0).float()) and torch.equal(m.max, x.amax(0).float())
        assert torch.equal(m.active, (x > threshold).sum(0))
        for p, s in ((1, m.s1), (2, m.s2), (3, m.s3), (4, m.s4)):
            assert torch.allclose(s, (x**p).sum(0), rtol=1e-5, atol=1e-3)
        assert ls.hist.counts.sum() == x.numel()
        # top-k: windows ranked by their max over counted tokens, position = first maximum in the window
        wmax = torch.where(keep.unsqueeze(-1), acts, float("-inf")).amax(1)  # [b, d]
        order = torch.argsort(wmax, dim=0, descending=True)[:3]
        assert torch.equal(ls.topk.window, ids[order])
        for r in range(3):
            for n in range(40):
                w = int(order[r, n])
                counted = torch.nonzero(keep[w]).view(-1)
                best = counted[acts[w, counted, n].argmax()]
                assert int(ls.topk.pos[r, n]) == int(best)
        assert torch.equal(ls.concepts.count[:3], labels[keep].sum(0))
        means = ls.positions.means()
        assert torch.allclose(means[0].float(), acts[:, 0].mean(0))
        assert torch.allclose(means[2].float(), acts[mask[:, 2].bool(), 2].mean(0), atol=1e-5)
    assert torch.equal(fused.hist.counts, eager.hist.counts)


def test_half_precision_activations_are_upcast():
    acts, mask, _ = _batch(6)
    spec = StatsSpec(top_k=2, n_positions=9)
    half, full = LayerStats(0, 40, spec), LayerStats(0, 40, spec)
    half.update(acts.bfloat16(), mask, torch.arange(5))
    full.update(acts.bfloat16().float(), mask, torch.arange(5))
    assert half.moments.s2.dtype == torch.float64
    assert torch.allclose(half.moments.s2, full.moments.s2, rtol=1e-6)
    assert torch.equal(half.hist.counts, full.hist.counts) and torch.equal(half.topk.pos, full.topk.pos)


def test_compile_failure_falls_back_to_eager_once(monkeypatch, caplog):
    from neuronhunter.stats import kernels

    calls = {"n": 0}

    def broken_compile(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_compile_failed", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    acts, mask, _ = _batch(7)
    spec = StatsSpec(top_k=2, n_positions=9)
    a, b = LayerStats(0, 40, spec), LayerStats(0, 40, spec, compile=False)
    with caplog.at_level("WARNING", logger="neuronhunter.stats.kernels"):
        a.update(acts, mask, torch.arange(5))
        a.update(acts, mask, torch.arange(5, 10))
    b.update(acts, mask, torch.arange(5))
    b.update(acts, mask, torch.arange(5, 10))
    assert calls["n"] == 1
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile is not available here (no C++ compiler found); scan statistics run eagerly (slower)"]
    assert torch.equal(a.hist.counts, b.hist.counts) and torch.equal(a.moments.s1, b.moments.s1)
    assert not kernels.compile_enabled()


def test_single_window_and_single_position_batches_need_no_recompilation():
    """b == 1 or t == 1 would make torch.compile specialise (seconds and memory per variant); they are padded
    with uncounted tokens instead, with results equal to the eager computation."""
    torch._dynamo.utils.counters.clear()
    spec = StatsSpec(top_k=2, n_positions=9, include_first=True)
    acts, mask, _ = _batch(8)
    for sl in (slice(0, 3), slice(0, 1), slice(2, 3)):
        for t in (9, 1):
            a, m = acts[sl, :t].contiguous(), mask[sl, :t].clone()
            fused, eager = LayerStats(0, 40, spec), LayerStats(0, 40, spec, compile=False)
            fused.update(a, m, torch.arange(a.shape[0]))
            eager.update(a, m, torch.arange(a.shape[0]))
            assert torch.equal(fused.topk.window, eager.topk.window) and torch.equal(fused.topk.pos, eager.topk.pos)
            assert torch.equal(fused.hist.counts, eager.hist.counts)
            assert torch.allclose(fused.positions.sum, eager.positions.sum, atol=1e-4)
            assert torch.allclose(fused.moments.s2, eager.moments.s2, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1


def test_position_stats_update_skips_padding():
    acts, mask, _ = _batch(9)
    ps = PositionStats(40, 9)
    ps.update(acts, mask)
    real = mask.bool()
    for p in (0, 3, 8):
        assert torch.allclose(ps.means()[p].float(), acts[real[:, p], p].mean(0), atol=1e-5)
    assert ps.count.tolist() == real.sum(0).tolist()
    assert torch.equal(ps.first_max, acts[:, 0].amax(0))
