"""The document split: stable, order-free, and what a scan of each side reads."""

from __future__ import annotations

import json

import pytest

from neuronhunter.config import ScanConfig
from neuronhunter.data.split import DocumentSplit, unit_hash
from neuronhunter.scan import run_scan


def test_side_depends_on_uid_and_seed_only():
    split = DocumentSplit(0.3, seed=0)
    uids = [f"doc{i}.txt" for i in range(2000)]
    sides = [split.side(u) for u in uids]
    assert sides == [split.side(u) for u in reversed(uids)][::-1]  # order does not matter
    share = sides.count("heldout") / len(sides)
    assert 0.27 < share < 0.33  # binomial sd ~0.01
    other = [DocumentSplit(0.3, seed=1).side(u) for u in uids]
    assert other != sides  # another seed, another split
    assert unit_hash("a", 0) == unit_hash("a", 0) and 0 <= unit_hash("a", 0) < 1
    assert split.counts(uids) == {"train": sides.count("train"), "heldout": sides.count("heldout")}


def test_bad_fraction_and_side():
    with pytest.raises(ValueError):
        DocumentSplit(1.0)
    with pytest.raises(ValueError):
        DocumentSplit(0.5).keeps("x", "test")


def test_scans_of_both_sides_partition_the_corpus(tiny_gpt2, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i:02d}.txt").write_text(f"Document number {i} talks about the weather and the sea. " * (i + 1))
    split = DocumentSplit(0.4, seed=3)
    held = {f"{i:02d}.txt" for i in range(12) if split.side(f"{i:02d}.txt") == "heldout"}
    assert 0 < len(held) < 12
    tokens = {}
    for side in ("all", "train", "heldout"):
        cfg = ScanConfig(model="tiny", corpus=str(corpus), out=str(tmp_path / side), layers=[0], context_length=16,
                         batch_size=4, split=side, heldout_fraction=0.4, split_seed=3, calibration_windows=2)
        result = run_scan(cfg, model=tiny_gpt2)
        sources = {w.source for w in result.state.windows.values()}
        if side == "train":
            assert not sources & held
        if side == "heldout":
            assert sources <= held
        tokens[side] = result.state.tokens
        manifest = json.loads((tmp_path / side / "manifest.json").read_text())
        assert manifest["corpus"]["split"]["side"] == side
        assert manifest["corpus"]["split"]["heldout_fraction"] == 0.4
    assert tokens["train"] + tokens["heldout"] == tokens["all"]
