"""The scan command end to end (in-process), with a tiny model saved as a local HF folder, and bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neuronhunter.cli.main import main
from neuronhunter.stats import native


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from neuronhunter.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("The river ran past the mill and the baker sold bread to the miller. " * 8)
    return p


def test_scan_cli_writes_run(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["scan", "--model", str(tiny_folder), "--corpus", str(text_file), "--out", str(out),
                 "--context-length", "32", "--top-k", "5", "--layers", "0-1"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "Strongest neuron per layer" in text and "Dead neurons" in text
    neurons = pd.read_parquet(out / "neurons.parquet")
    assert set(neurons.layer) == {0, 1} and len(neurons) == 2 * 128
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == "local" and manifest["context_length"] == 32
    assert manifest["versions"]["stats_kernel"] == "torch.compile"
    assert manifest["versions"]["histograms"] == ("native" if native.library() is not None else "bincount")
    # a second run refuses to clobber it
    assert main(["scan", "--model", str(tiny_folder), "--corpus", str(text_file), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_scan_without_compile_gives_the_same_tables(tiny_folder, text_file, tmp_path):
    args = ["scan", "--model", str(tiny_folder), "--corpus", str(text_file), "--context-length", "16",
            "--layers", "1", "--formats", "parquet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--no-compile"]) == 0
    versions = json.loads((tmp_path / "b" / "manifest.json").read_text())["versions"]
    assert versions["stats_kernel"] == "eager" and versions["histograms"] == "bincount"
    a, b = (pd.read_parquet(tmp_path / r / "neurons.parquet") for r in "ab")
    pd.testing.assert_frame_equal(a.drop(columns=["hist"]), b.drop(columns=["hist"]), rtol=1e-4, atol=1e-5)
    assert (a["hist"].map(list) == b["hist"].map(list)).all()
    pd.testing.assert_frame_equal(*(pd.read_parquet(tmp_path / r / "examples.parquet") for r in "ab"))


def test_scan_with_config_file(tiny_folder, text_file, tmp_path, capsys):
    cfg = tmp_path / "scan.yaml"
    cfg.write_text(f"model: {tiny_folder}\ncorpus: {text_file}\ncontext_length: 24\ntop_k: 2\nlayers: [1]\n"
                   f"formats: [parquet]\nout: {tmp_path / 'r'}\n")
    assert main(["scan", "--config", str(cfg), "--top-k", "3"]) == 0
    ex = pd.read_parquet(tmp_path / "r" / "examples.parquet")
    assert ex["rank"].max() == 2  # the option overrode the file
    assert not (tmp_path / "r" / "neurons.csv").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "someorg/definitely-not-a-model-xyz"], "cannot be reached"),
        (["--corpus", "MISSING.txt"], "corpus not found"),
        (["--corpus", "EMPTY"], "empty"),
        (["--corpus", "BINARY"], "not a text file"),
        (["--layers", "0,9"], "layer 9 is out of range"),
        (["--layers", "a-b"], "--layers must be integers"),
        (["--top-k", "0"], "top_k"),
        (["--config", "BADCFG"], "unknown key"),
        (["--config", "BADYAML"], "not valid YAML"),
        (["--context-length", "1"], "context_length"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_folder, text_file, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "EMPTY").write_text("  \n")
    (tmp_path / "BINARY").write_bytes(b"\x00\xff\x00")
    (tmp_path / "BADCFG").write_text("model: x\nlayerz: [1]\n")
    (tmp_path / "BADYAML").write_text("model: [unclosed\n")
    monkeypatch.chdir(tmp_path)
    base = ["scan", "--model", str(tiny_folder), "--corpus", str(text_file), "--out", str(tmp_path / "bad")]
    code = main(base + args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_interrupt_is_one_line_and_exit_130(tiny_folder, text_file, tmp_path, capsys, monkeypatch):
    import neuronhunter.scan as scan_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_module, "run_scan", interrupted)
    code = main(["scan", "--model", str(tiny_folder), "--corpus", str(text_file), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 130
    assert err.startswith("error: interrupted") and "--resume" in err and len(err.splitlines()) == 1
    assert main(["--help"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "--nope"], "No such option: --nope"),
        (["scan", "--top-k", "abc"], "Invalid value for '--top-k'"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
