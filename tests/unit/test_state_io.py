"""Saved scan states: big tensors stored compressed, restored bit for bit; older bare stats.pt files still load."""

from __future__ import annotations

import pytest
import torch

from neuronhunter.config import ScanConfig
from neuronhunter.scan import run_scan
from neuronhunter.stats.state import PACKED, load_state, pack_tensors, unpack_tensors


def _diff(a, b, where="state"):
    """The first place where ``a`` and ``b`` differ (tensors bit for bit, NaN equal to NaN), or None."""
    if isinstance(a, torch.Tensor):
        same = (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b))
        return None if same else where
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return where
        return next((d for k in a if (d := _diff(a[k], b[k], f"{where}.{k}")) is not None), None)
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return where
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True)) if (d := _diff(x, y, f"{where}[{i}]"))
                     is not None), None)
    return None if a == b else where


def _equal(a, b):
    return _diff(a, b) is None


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_pack_round_trip_every_dtype(codec):
    g = torch.Generator().manual_seed(0)
    obj = {"small": torch.arange(5), "i32": torch.randint(0, 3, (300, 200), generator=g, dtype=torch.int32),
           "i64": torch.randint(-5, 2**40, (20000,), generator=g), "f64": torch.randn(100, 100, generator=g).double(),
           "f32": torch.full((70000,), float("nan")), "nested": [{"u8": torch.zeros(1 << 17, dtype=torch.uint8)}],
           "text": "kept", "n": 3}
    packed = pack_tensors(obj, codec)
    assert packed["small"] is obj["small"]  # small tensors are stored as they are
    assert PACKED in packed["i32"] and PACKED in packed["nested"][0]["u8"]
    assert packed["nested"][0]["u8"]["data"].numel() < 1000  # zeros compress
    assert packed["i32"].get("codec", "zstd") == codec  # recorded where not zstd (older files hold zstd only)
    back = unpack_tensors(packed)
    assert _equal(back, obj)


def test_saved_run_state_is_compressed_and_equal(tiny_llama, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"The red fox saw a blue car in Paris on Monday, day {i}. " * 12)
    cfg = ScanConfig(model="tiny", corpus=str(corpus), out=str(tmp_path / "run"), context_length=16,
                     batch_size=3, concepts="default", calibration_windows=4)
    result = run_scan(cfg, model=tiny_llama)
    path = tmp_path / "run" / "stats.pt"
    state, _ = load_state(path)
    assert _diff(state.state_dict(), result.state.state_dict()) is None
    raw = tmp_path / "raw.pt"
    torch.save(result.state.state_dict(), raw)  # the older format: the bare state dict, uncompressed
    assert path.stat().st_size < raw.stat().st_size / 2
    assert _diff(load_state(raw)[0].state_dict(), result.state.state_dict()) is None
