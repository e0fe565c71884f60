"""The ``neuronhunter toy`` commands: tiny runs end to end, one-line errors."""

from __future__ import annotations

import json

from neuronhunter.cli.main import main


def test_toy_help(capsys):
    assert main(["toy", "--help"]) == 0
    out = capsys.readouterr().out
    assert "monopoly" in out and "tms" in out
    assert main(["toy", "monopoly", "--help"]) == 0
    assert "--seeds" in capsys.readouterr().out


def test_tms_command_tiny(tmp_path, capsys):
    out = tmp_path / "tms"
    rc = main(
        [
            "toy",
            "tms",
            "--preset",
            "five-in-two",
            "--steps",
            "20",
            "--seeds",
            "1",
            "--sparsities",
            "0,0.9",
            "--batch-size",
            "32",
            "--no-plots",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "five-in-two" and summary["steps"] == 20
    assert (out / "features.csv").is_file() and (out / "manifest.json").is_file()
    assert "pentagon" in capsys.readouterr().out


def test_monopoly_command_tiny(tmp_path):
    out = tmp_path / "mp"
    args = ["toy", "monopoly", "--seeds", "1", "--epochs", "1", "--phase2-epochs", "1", "--n-train", "64",
            "--n-test", "32", "--hidden", "3", "--png-samples", "0", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["hypotheses"]) == {"H1", "H2", "H3"}
    # a second run into the same folder is refused with a one-line error unless --overwrite
    assert main(args) == 2


def test_bad_options_are_one_line_errors(capsys):
    assert main(["toy", "tms", "--preset", "nope"]) == 2
    assert main(["toy", "tms", "--sparsities", "0,abc"]) == 2
    assert main(["toy", "monopoly", "--seeds", "0"]) == 2
    assert main(["toy", "monopoly", "--h12-states", "everything"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err
