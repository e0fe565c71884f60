"""Run folders: the tool deletes only what it owns, an old run stays readable until the new one is complete,
resume refuses mismatched inputs, in-place updates mark the run incomplete while they run."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

from neuronhunter.config import ScanConfig
from neuronhunter.errors import CorpusError, RunDirError
from neuronhunter.io import MANIFEST, UPDATING, require_run
from neuronhunter.runfolder import CHECKPOINT, MARKER, RunFolder, owned, updating
from neuronhunter.scan import run_scan

TEXT = [
    "The old lighthouse keeper climbed the stairs every evening at seven and lit the lamp for the ships.",
    "Bread dough needs time. Mix flour, water, salt and a little yeast, then wait for the gluten to form.",
    "A small robot rolled across the laboratory floor, bumped into a chair, turned left and tried again.",
    "In spring the river rose over the meadows and the herons came back to the willows by the mill.",
]


@pytest.fixture()
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, t in enumerate(TEXT):
        (d / f"{i}.txt").write_text(t)
    return d


def _cfg(corpus, out, **kw):
    base = dict(model="tiny", corpus=str(corpus), out=str(out), layers=[0], context_length=8, batch_size=1,
                top_k=2, checkpoint_every=1, compile_stats=False)
    return ScanConfig(**{**base, **kw})


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Interrupt(Exception):
    pass


def _interrupt_after(n):
    calls = {"n": 0}

    def progress(done, total):
        calls["n"] += 1
        if calls["n"] == n:
            raise Interrupt

    return progress


def test_owned_names():
    for name in ("neurons.parquet", "examples.csv", "stats.pt", "manifest.json", "plots", ".neurons.parquet.x.tmp"):
        assert owned(name)
    for name in ("notes.txt", "src", "a.py", ".git", "README.md", "data.jsonl"):
        assert not owned(name)


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_gpt2, corpus_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "src").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "src" / "a.py").write_text("print('hi')")
    before = _snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="not a neuronhunter run folder"):
            run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, overwrite=overwrite)
    assert _snapshot(out) == before
    assert not (tmp_path / ".mine.partial").exists()


def test_overwrite_refuses_a_run_with_files_it_did_not_write(tiny_gpt2, corpus_dir, tmp_path):
    out = tmp_path / "run"
    run_scan(_cfg(corpus_dir, out), model=tiny_gpt2)
    (out / "my_analysis.ipynb").write_text("{}")
    before = _snapshot(out)
    with pytest.raises(RunDirError, match="my_analysis.ipynb"):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, overwrite=True)
    assert _snapshot(out) == before


def test_overwrite_refuses_the_current_folder(tiny_gpt2, corpus_dir, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "setup.py").write_text("x = 1")
    monkeypatch.chdir(repo)
    for out in (".", str(repo), ".."):
        with pytest.raises(RunDirError):
            run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, overwrite=True)
    assert (repo / "setup.py").read_text() == "x = 1"


def test_overwrite_replaces_a_run_and_keeps_the_old_one_until_the_new_one_is_complete(tiny_gpt2, corpus_dir,
                                                                                      tmp_path):
    out = tmp_path / "run"
    first = run_scan(_cfg(corpus_dir, out), model=tiny_gpt2)
    old = _snapshot(out)
    # a replacement that fails half-way leaves the old run exactly as it was
    with pytest.raises(Interrupt):
        run_scan(_cfg(corpus_dir, out, top_k=3), model=tiny_gpt2, overwrite=True, progress=_interrupt_after(3))
    assert _snapshot(out) == old
    require_run(out)
    assert (tmp_path / ".run.partial" / CHECKPOINT).exists()
    # a complete replacement swaps in; nothing of ours is left beside it
    second = run_scan(_cfg(corpus_dir, out, top_k=3), model=tiny_gpt2, overwrite=True)
    assert json.loads((out / "config.json").read_text())["top_k"] == 3
    assert second.state.tokens == first.state.tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "run"]
    assert not (out / MARKER).exists()


def test_an_interrupted_run_needs_resume_or_overwrite(tiny_gpt2, corpus_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, progress=_interrupt_after(2))
    with pytest.raises(RunDirError, match="--resume"):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2)
    with pytest.raises(RunDirError, match="not a complete run folder.*--resume"):
        require_run(out)


def test_resume_with_nothing_to_resume_is_an_error(tiny_gpt2, corpus_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunDirError, match="nothing to resume"):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, resume=True)
    run_scan(_cfg(corpus_dir, out), model=tiny_gpt2)
    before = _snapshot(out)
    with pytest.raises(RunDirError, match="complete run: nothing to resume"):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, resume=True)
    assert _snapshot(out) == before


def test_resume_refuses_an_edited_corpus(tiny_gpt2, corpus_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, progress=_interrupt_after(4))
    partial = tmp_path / ".run.partial"
    saved = _snapshot(partial)
    (corpus_dir / "0.txt").write_text(TEXT[0].replace("seven", "eight"))
    with pytest.raises(RunDirError, match="corpus differs"):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, resume=True)
    assert _snapshot(partial) == saved and not out.exists()
    (corpus_dir / "0.txt").write_text(TEXT[0])  # restored: the resume goes through and equals a full run
    resumed = run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, resume=True)
    full = run_scan(_cfg(corpus_dir, tmp_path / "full"), model=tiny_gpt2)
    assert resumed.state.corpus_fp == full.state.corpus_fp
    pd.testing.assert_frame_equal(pd.read_parquet(out / "examples.parquet"),
                                  pd.read_parquet(tmp_path / "full" / "examples.parquet"))


def test_resume_refuses_other_weights_and_another_config(tiny_gpt2, corpus_dir, tmp_path):
    from neuronhunter.models.tiny import tiny_model

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_scan(_cfg(corpus_dir, out), model=tiny_gpt2, progress=_interrupt_after(2))
    other = tiny_model("gpt2")
    with torch.no_grad():
        other.model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0  # one weight changed, same name and config
    with pytest.raises(RunDirError, match="weights differ"):
        run_scan(_cfg(corpus_dir, out), model=other, resume=True)
    with pytest.raises(RunDirError, match="different configuration.*top_k"):
        run_scan(_cfg(corpus_dir, out, top_k=5), model=tiny_gpt2, resume=True)
    assert (tmp_path / ".run.partial" / CHECKPOINT).exists()


def test_a_scan_that_counts_nothing_is_an_error(tiny_gpt2, tmp_path):
    (tmp_path / "one.txt").write_text("Hello")  # one token; without BOS it is each window's uncounted first token
    with pytest.raises(CorpusError, match="counted no tokens"):
        run_scan(_cfg(tmp_path / "one.txt", tmp_path / "run", prepend_bos=False), model=tiny_gpt2)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()
    # with BOS the one token is counted, and min = max = its activation
    res = run_scan(_cfg(tmp_path / "one.txt", tmp_path / "run"), model=tiny_gpt2)
    frame = res.neurons_frame()
    assert (frame["count"] == 1).all() and (frame["min"] == frame["max"]).all()


def test_a_crash_between_the_two_renames_is_repaired(tiny_gpt2, corpus_dir, tmp_path):
    out = tmp_path / "run"
    run_scan(_cfg(corpus_dir, out), model=tiny_gpt2)
    folder = RunFolder(out)
    work = folder.begin(overwrite=True)
    (work / "neurons.parquet").write_bytes((out / "neurons.parquet").read_bytes())
    (work / MANIFEST).write_text(json.dumps({"kind": "scan"}))
    os.replace(out, tmp_path / ".run.old-deadbeef")  # the first rename of the swap happened, then a crash
    RunFolder(out).begin(overwrite=True)
    assert (out / MANIFEST).exists() and not (tmp_path / ".run.old-deadbeef").exists()


def test_updating_marks_the_run_incomplete_until_done(tiny_gpt2, corpus_dir, tmp_path):
    out = tmp_path / "run"
    run_scan(_cfg(corpus_dir, out), model=tiny_gpt2)
    with pytest.raises(Interrupt), updating(out) as manifest:
        assert not (out / MANIFEST).exists() and (out / UPDATING).exists()
        manifest["note"] = "x"
        raise Interrupt
    with pytest.raises(RunDirError, match="update of .* was interrupted"):
        require_run(out)
    # a finished update writes the manifest back with the change
    os.replace(out / UPDATING, out / MANIFEST)
    with updating(out) as manifest:
        manifest["note"] = "done"
    assert json.loads((out / MANIFEST).read_text())["note"] == "done" and not (out / UPDATING).exists()
