"""``neuronhunter selfreport ...`` end to end, in process, on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import yaml

from neuronhunter.cli.main import main
from neuronhunter.models.tiny import save_tiny_model
from neuronhunter.selfreport import write_toy_corpus

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread_module")]  # 1 thread, see conftest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "model", "gpt2", seed=3)
    corpus = write_toy_corpus(root / "corpus", n_docs=8, words_per_doc=40)
    cfg = {
        "name": "cli", "model": str(model),
        "selection": {"source": "scan", "layers": [1], "criterion": "variance", "scan_tokens": 100},
        "dataset": {"corpus": str(corpus), "max_tokens": 300, "context_length": 16},
        "predictor": {"head": "regression"},
        "training": {"unfreeze": "last_k", "k": 1, "epochs": 1, "batch_size": 4},
        "evaluation": {"trace_windows": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def test_run_writes_a_complete_run(setup, capsys):
    root, cfg = setup
    out = root / "run"
    assert main(["selfreport", "run", str(cfg), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "held-out test tokens" in stdout and "linear probe" in stdout and "token baseline" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "selfreport run"
    summary = json.loads((out / "metrics.json").read_text())
    (target,) = summary["targets"]
    assert target["layer"] == 1
    tdir = out / "targets" / target["neuron"]
    for name in ("dataset.parquet", "predictions.parquet", "metrics.json", "scatter.html", "trace.html"):
        assert (tdir / name).is_file()
    # a second run into the same folder is refused with one line, exit 2
    assert main(["selfreport", "run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err  # fails before loading anything
    # --resume of a finished run: nothing to resume, one line
    assert main(["selfreport", "run", str(cfg), "--out", str(out), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_bad_config_is_one_line_exit_2(setup, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  unfreez: all\n")
    assert main(["selfreport", "run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: bad.yaml: training.unfreez: unknown option"
    assert main(["selfreport", "run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    _, cfg = setup
    assert main(["selfreport", "run", str(cfg), "--set", "training.epochs=0"]) == 2
    assert "training.epochs" in capsys.readouterr().err


def test_select_dataset_and_example(setup, capsys):
    root, cfg = setup
    assert main(["selfreport", "select", str(cfg), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "chosen: L1.N" in out
    assert main(["selfreport", "dataset", str(cfg), "--out", str(root / "ds")]) == 0
    assert "train:" in capsys.readouterr().out
    assert list((root / ".ds.partial" / "targets").glob("*/dataset.parquet"))  # unfinished until `run --resume`
    assert main(["selfreport", "example"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["model"] == "smollm2-135m"
