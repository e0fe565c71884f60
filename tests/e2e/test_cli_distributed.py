"""``neuronhunter scan --engine ray`` end to end: SIGKILL the driver, ``--resume`` scans only the unfinished shards and
the tables equal a one-process scan; bad input is one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from neuronhunter.cli.main import main
from neuronhunter.distributed import compare_runs

pytest.importorskip("ray", reason="the distributed extra is installed by make test")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from neuronhunter.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(3)
    words = "the river ran past the mill and the baker sold bread to a miller in spring def return class".split()
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 200)))})
                            + "\n" for _ in range(40)))
    return path


def test_killed_driver_resumes_only_unfinished_shards(tiny_folder, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["scan", "--model", str(tiny_folder), "--corpus", str(corpus), "--out", str(out), "--context-length", "24",
            "--batch-size", "3", "--no-compile", "--layers", "0-1"]
    ray_args = [*args, "--engine", "ray", "--workers", "1", "--shards", "8"]
    exe = [sys.executable, "-m", "neuronhunter"]
    driver = subprocess.Popen([*exe, *ray_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    shards = tmp_path / ".run.partial" / "shards"
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and len(list(shards.glob("shard-*.json"))) < 2:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()[-2000:]
    worker = json.loads((shards / "index.json").read_text())["workers"][0]["pid"]
    deadline = time.time() + 120
    while time.time() < deadline and os.path.exists(f"/proc/{worker}"):  # Ray stops a dead driver's workers
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}")
    done = {int(p.name[6:11]) for p in shards.glob("shard-*.json")}  # (the worker may have finished one more)
    assert 2 <= len(done) < 8 and not out.exists()
    # without --resume: refused (one line); with it: only the unfinished shards are scanned
    assert main(ray_args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*ray_args, "--resume"]) == 0
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["resumes"] == 1
    assert {int(k) for k, s in index["shards"].items() if s.get("session") == 1} == set(range(8)) - done
    assert index["timings"]["shards_resumed"] == len(done)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert compare_runs(tmp_path / "one", out) == []


def test_bad_ray_options_are_one_line(tiny_folder, corpus, tmp_path, capsys):
    base = ["scan", "--corpus", str(corpus), "--out", str(tmp_path / "r"), "--engine", "ray"]
    for extra, expected in ((["--workers", "0"], "workers"), (["--engine", "spark"], "engine"),
                            (["--shards", "0"], "shards")):
        assert main([*base, "--model", str(tiny_folder), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    # an error inside a worker (no such model) comes back as the same one line the local engine prints
    assert main([*base, "--model", str(tmp_path / "no-such-model"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-model" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()
