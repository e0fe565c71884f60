"""Never lose data, as a user meets it on the command line: scans killed with SIGKILL at random points and
resumed give the tables of an uninterrupted scan; a killed --overwrite leaves the previous run readable; folders
that are not runs are never emptied."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from neuronhunter.cli.main import main

pytestmark = pytest.mark.e2e

WORDS = ("river stone lamp bread seven green harbour winter yeast robot chair door window north quiet "
         "market orange copper violin garden letter morning salt tower").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from neuronhunter.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("safety")
    model = save_tiny_model(root / "tiny", "gpt2")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(24):
        (corpus / f"{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(120)) + ".")
    cfg = root / "scan.yaml"
    cfg.write_text("checkpoint_every: 1\nbatch_size: 2\ncontext_length: 16\ntop_k: 3\nlayers: [0, 1]\n")
    return root, model, corpus, cfg


def _argv(setup, out, *extra):
    root, model, corpus, cfg = setup
    return [sys.executable, "-m", "neuronhunter", "scan", "--model", str(model), "--corpus", str(corpus),
            "--out", str(out), "--config", str(cfg), "--no-compile", *extra]


def _run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _tables(out):
    return pd.read_parquet(out / "neurons.parquet"), pd.read_parquet(out / "examples.parquet")


def _kill_after_checkpoints(argv, partial, n_checkpoints, extra_delay):
    """Start the scan, SIGKILL it once its checkpoint has been rewritten ``n_checkpoints`` times (+ a delay)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = partial / ".checkpoint.pt"
    seen, last = 0, None
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        try:
            stamp = ckpt.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
            if seen >= n_checkpoints:
                time.sleep(extra_delay)
                break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def reference(setup):
    root = setup[0]
    out = root / "reference"
    res = _run(_argv(setup, out))
    assert res.returncode == 0, res.stderr
    return _tables(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_then_resume_equals_an_uninterrupted_scan(setup, reference, seed):
    root = setup[0]
    out = root / f"killed{seed}"
    rng = random.Random(seed)
    rc = _kill_after_checkpoints(_argv(setup, out), root / f".killed{seed}.partial", rng.randint(1, 30),
                                 rng.random() * 0.2)
    assert rc == -signal.SIGKILL
    assert not out.exists() or (out / "manifest.json").exists()  # never a half-written run at out
    res = _run(_argv(setup, out, "--resume"))
    assert res.returncode == 0, res.stderr
    neurons, examples = _tables(out)
    pd.testing.assert_frame_equal(neurons, reference[0])
    pd.testing.assert_frame_equal(examples, reference[1])
    assert not (root / f".killed{seed}.partial").exists()


@pytest.mark.parametrize("seed", [3])
def test_a_killed_overwrite_leaves_the_previous_run_readable(setup, reference, seed):
    root = setup[0]
    out = root / f"old{seed}"
    assert _run(_argv(setup, out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rng = random.Random(seed)
    rc = _kill_after_checkpoints(_argv(setup, out, "--overwrite", "--top-k", "5"), root / f".old{seed}.partial",
                                 rng.randint(1, 30), rng.random() * 0.2)
    assert rc == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    pd.testing.assert_frame_equal(_tables(out)[0], reference[0])
    assert main(["query", str(out), "SELECT count(*) AS n FROM neurons"]) == 0


def test_overwrite_never_empties_a_folder_that_is_not_a_run(setup, tmp_path, capsys, monkeypatch):
    _, model, corpus, _ = setup
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("notes")
    (mine / "src" / "a.py").write_text("x = 1")
    args = ["scan", "--model", str(model), "--corpus", str(corpus), "--layers", "0", "--no-compile"]
    assert main([*args, "--out", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a neuronhunter run folder" in err and "\n" not in err
    assert (mine / "notes.txt").read_text() == "notes" and (mine / "src" / "a.py").read_text() == "x = 1"
    monkeypatch.chdir(mine)
    assert main([*args, "-o", ".", "--overwrite"]) == 2
    assert "current folder" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["notes.txt", "src"]


def test_resume_with_nothing_to_resume_and_bad_context_length(setup, tmp_path, capsys):
    _, model, corpus, _ = setup
    args = ["scan", "--model", str(model), "--corpus", str(corpus), "--layers", "0", "--no-compile"]
    assert main([*args, "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "r"), "--context-length", "2048"]) == 2  # tiny model: 256
    err = capsys.readouterr().err
    assert "longer than" in err and "256" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()
