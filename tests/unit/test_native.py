"""The native histogram loop (``stats/histogram.c``) against numpy, and its fall-backs; the shape-specialised
statistics kernel against the eager computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuronhunter.stats import Histogram, LayerStats, StatsSpec
from neuronhunter.stats import native as nat

needs_native = pytest.mark.skipif(nat.library() is None, reason="no C compiler here")


def _values(seed: int, shape: tuple[int, ...], n_bins: int = 60, lo: float = -2.0, hi: float = 4.0):
    """Values at a random fraction (0.002..0.998) of a known bin (under- and overflow included), so each has one
    right bin, and that bin (0 = underflow, n_bins + 1 = overflow)."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(-3, n_bins + 3, shape, generator=g).double()
    frac = 0.002 + 0.996 * torch.rand(shape, generator=g, dtype=torch.float64)
    x = (lo + (which + frac) * (hi - lo) / n_bins).float()
    return x, np.clip(which.numpy().astype(np.int64) + 1, 0, n_bins + 1)


def _numpy_counts(bins: np.ndarray, keep: np.ndarray, nb: int) -> np.ndarray:
    rows = bins.reshape(-1, bins.shape[-1])[keep.reshape(-1)]
    return np.stack([np.bincount(rows[:, j], minlength=nb) for j in range(rows.shape[1])])


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_native_histogram_counts_every_bin_of_a_wide_layer(threads):
    x, bins = _values(1, (6, 50, 1536))
    keep = torch.rand(6, 50, generator=torch.Generator().manual_seed(2)) < 0.8
    h = Histogram(1536)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h.add_masked(x, keep)
        h.add_masked(x[:2], keep[:2])  # counts add up in place
    finally:
        torch.set_num_threads(before)
    expected = _numpy_counts(bins, keep.numpy(), 62) + _numpy_counts(bins[:2], keep[:2].numpy(), 62)
    np.testing.assert_array_equal(h.counts.numpy(), expected)


@needs_native
def test_native_and_bincount_agree_on_slices_half_precision_and_non_finite_values():
    x, _ = _values(3, (4, 30, 100), n_bins=12, lo=-3, hi=3)
    x[0, 1, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.0])  # 3.0 = hi: overflow
    x[1, 2, 5] = -3.0  # lo: the first regular bin
    keep = torch.ones(4, 30, dtype=torch.bool)
    keep[:, 0] = False
    keep[2, 20:] = False
    # bins by hand: width 0.5, so bin = floor(2 * v + 7) clamped to [0, 13]; NaN goes to the underflow bin
    v = x.double().numpy()
    ref = np.clip(np.floor(np.nan_to_num(2 * v + 7, nan=0.0, posinf=99, neginf=-99)), 0, 13).astype(np.int64)
    assert ref[0, 1, 0] == 0 and ref[0, 1, 1] == 13 and ref[0, 1, 2] == 0 and ref[0, 1, 3] == 13 and ref[1, 2, 5] == 1
    for sample, cols in ((x, 100), (x[..., :37], 37), (x.half(), 100)):  # whole, a neuron slice, half precision
        a, b = Histogram(cols, -3, 3, 12), Histogram(cols, -3, 3, 12)
        a.add_masked(sample, keep)
        b.add_masked(sample, keep, native=False)
        assert torch.equal(a.counts, b.counts)
        if sample.dtype == torch.float32:
            np.testing.assert_array_equal(a.counts.numpy(), _numpy_counts(ref[..., :cols], keep.numpy(), 14))


def test_turned_off_or_unbuildable_native_histogram_falls_back_to_bincount(monkeypatch, caplog, tmp_path):
    x, bins = _values(4, (3, 20, 64))
    keep = torch.ones(3, 20, dtype=torch.bool)
    expected = _numpy_counts(bins, keep.numpy(), 62)

    monkeypatch.setenv("NEURONHUNTER_NATIVE", "0")
    assert nat.library() is None and not nat.usable(x)
    h = Histogram(64)
    h.add_masked(x, keep)
    np.testing.assert_array_equal(h.counts.numpy(), expected)

    monkeypatch.delenv("NEURONHUNTER_NATIVE")
    monkeypatch.setattr(nat, "_lib", None)
    monkeypatch.setattr(nat, "_failed", False)
    monkeypatch.setenv("NEURONHUNTER_CACHE", str(tmp_path))
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level("WARNING", logger="neuronhunter.stats.native"):
        for _ in range(2):
            h = Histogram(64)
            h.add_masked(x, keep)
            np.testing.assert_array_equal(h.counts.numpy(), expected)
    assert [r.getMessage() for r in caplog.records] == [
        "native statistics loops not available (cc failed: cc: fatal error: broken compiler); "
        "histograms are filled by torch.bincount and exemplars by torch (slower)"]
    assert not list((tmp_path / "native").iterdir())  # no half-built library (or temp file) left behind


def test_native_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if nat._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(nat, "_lib", None)
    monkeypatch.setattr(nat, "_failed", False)
    monkeypatch.setenv("NEURONHUNTER_CACHE", str(tmp_path))
    assert nat.library() is not None
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(nat, "_lib", None)
    assert nat.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_full_batches_use_a_shape_specialised_kernel_equal_to_eager():
    """Batches of a scan's full-batch shape with >= 2**20 activations get a kernel compiled for that shape (other
    shapes run the dynamic one); its results equal the eager ones."""
    from neuronhunter.stats import kernels

    g = torch.Generator().manual_seed(7)
    b, t, d = 4, 16, 16384  # 2**20 activations
    acts = torch.randn(b, t, d, generator=g) * 2
    mask = torch.ones(b, t, dtype=torch.long)
    mask[2, 9:] = 0
    spec = StatsSpec(top_k=2, n_positions=t)
    fused, eager = LayerStats(0, d, spec, full_batch=(b, t)), LayerStats(0, d, spec, compile=False)
    key = ((b, t, d), acts.stride(), acts.dtype, acts.device, not nat.usable(acts))
    for step, batch in enumerate((acts[:3], acts)):  # a smaller batch first: no specialised kernel for it
        fused.update(batch, mask[: len(batch)], torch.arange(len(batch)) + b * step)
        eager.update(batch, mask[: len(batch)], torch.arange(len(batch)) + b * step)
        assert (key in kernels._static_shapes) == (step == 1)
        assert not any(k[0] == (3, t, d) for k in kernels._static_shapes)
    assert torch.equal(fused.hist.counts, eager.hist.counts)
    assert torch.equal(fused.topk.window, eager.topk.window) and torch.equal(fused.topk.pos, eager.topk.pos)
    assert torch.equal(fused.moments.max, eager.moments.max) and torch.equal(fused.moments.min, eager.moments.min)
    assert torch.equal(fused.moments.active, eager.moments.active)
    assert torch.allclose(fused.moments.s2, eager.moments.s2, rtol=1e-5)
    assert torch.allclose(fused.positions.sum, eager.positions.sum, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("compile_stats", [True, False])
def test_a_nan_activation_is_counted_as_underflow_not_a_crash(compile_stats):
    """``bincount`` used to reject the garbage index a NaN became; now a NaN lands in the underflow bin."""
    acts = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(9))
    acts[1, 4, 2] = float("nan")
    mask = torch.ones(3, 8, dtype=torch.long)
    ls = LayerStats(0, 16, StatsSpec(top_k=2, n_positions=8), compile=compile_stats)
    ls.update(acts, mask, torch.arange(3))
    counted = acts[:, 1:]  # position 0 is not counted
    assert int(ls.hist.counts[2, 0]) == 1 + int((counted[..., 2] < -2).sum())
    assert int(ls.hist.counts.sum()) == counted.numel()


def test_compiled_kernel_index_path_equals_eager_when_native_is_off(monkeypatch):
    """The path CUDA takes (and CPU without a C compiler): the fused kernel writes the histogram index, bincount
    counts it."""
    monkeypatch.setenv("NEURONHUNTER_NATIVE", "0")
    x, bins = _values(11, (5, 12, 48))
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[3, 7:] = 0
    spec = StatsSpec(top_k=2, n_positions=12)
    fused, eager = LayerStats(0, 48, spec), LayerStats(0, 48, spec, compile=False)
    fused.update(x, mask, torch.arange(5))
    eager.update(x, mask, torch.arange(5))
    keep = mask.bool().numpy().copy()
    keep[:, 0] = False
    np.testing.assert_array_equal(fused.hist.counts.numpy(), _numpy_counts(bins, keep, 62))
    assert torch.equal(fused.hist.counts, eager.hist.counts) and torch.equal(fused.topk.pos, eager.topk.pos)


def _exemplar_batches(seed: int, d: int, batches: int, n: int):
    """Window peaks with many exact ties (values on a coarse grid), windows without a counted token (-inf), NaN and
    +inf peaks, and one batch offered out of window order."""
    g = torch.Generator().manual_seed(seed)
    out, next_id = [], 0
    for b in range(batches):
        peak = torch.randint(-6, 7, (n, d), generator=g).float() / 2
        peak[torch.rand(n, d, generator=g) < 0.05] = float("-inf")
        peak[torch.rand(n, d, generator=g) < 0.01] = float("nan")
        peak[torch.rand(n, d, generator=g) < 0.005] = float("inf")
        pos = torch.randint(0, 128, (n, d), generator=g)
        ids = torch.arange(next_id, next_id + n)
        next_id += n
        out.append((peak, pos, ids.flip(0) if b == 3 else ids))
    return out


@needs_native
@pytest.mark.parametrize("k", [5, 40])  # lists full after the first batch, or still filling over several
def test_native_exemplar_loops_equal_the_torch_updates(k):
    from neuronhunter.stats.exemplars import BandSamples, TopK

    d = 300
    batches = _exemplar_batches(7, d, 40, 16)
    scale = torch.rand(d, generator=torch.Generator().manual_seed(8)) * 3 + 0.01
    scale[:3] = torch.tensor([0.0, 1e-40, 3.0])  # a zero scale is clamped alike in both
    lists = {flag: (TopK(d, k), BandSamples(d, scale, (0.0, 0.1, 0.3, 0.5, 0.7), 3, seed=4)) for flag in (False, True)}
    half = {flag: TopK(d, k) for flag in (False, True)}  # after two batches: the partly filled lists agree too
    for peak, pos, ids in batches[:2]:
        for native, top in half.items():
            top.update(peak, pos, ids, native=native)
    assert torch.equal(half[False].window, half[True].window) and torch.equal(half[False].values, half[True].values)
    assert bool((half[True].window < 0).any()) == (k > 32)
    for peak, pos, ids in batches:
        for native, (top, bands) in lists.items():
            top.update(peak, pos, ids, native=native)
            bands.update(peak, pos, ids, native=native)
    (t0, b0), (t1, b1) = lists[False], lists[True]
    for name in ("values", "window", "pos"):
        assert torch.equal(getattr(t0, name), getattr(t1, name)), name
    for name in ("hash", "window", "pos"):
        assert torch.equal(getattr(b0, name), getattr(b1, name)), name
    assert torch.equal(b0.value.nan_to_num(-99.0), b1.value.nan_to_num(-99.0))
    # the lists are real: full, with ties broken by the smaller window id, and every band of some neuron sampled
    assert bool((t1.window >= 0).all())
    tied = (t1.values[1:] == t1.values[:-1]) & (t1.window[1:] >= 0)
    assert bool(tied.any()) and bool((t1.window[1:][tied] > t1.window[:-1][tied]).all())
    assert bool((b1.window[:, 0] >= 0).any(1).all())
    # and equal to one merge of everything, the order-free definition
    top = TopK(d, k)
    for peak, pos, ids in batches:
        other = TopK(d, k)
        other.update(peak, pos, ids)
        top.merge(other)
    assert torch.equal(top.window, t1.window) and torch.equal(top.values, t1.values)
