"""A missing optional dependency is one line naming the extra that installs it (API and CLI)."""

from __future__ import annotations

import sys

import pytest

from neuronhunter.cli.main import main
from neuronhunter.config import ScanConfig
from neuronhunter.extras import EXTRAS, MissingDependency, missing_message, require
from neuronhunter.scan import run_scan


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)  # makes `import duckdb` fail like a missing package
    with pytest.raises(MissingDependency, match=r"pip install 'neuronhunter\[analysis\]'"):
        require("duckdb")
    assert require("json").dumps([1]) == "[1]"
    assert missing_message(ValueError("x")) is None


def test_every_extra_is_declared_in_pyproject():
    from pathlib import Path

    import tomllib

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (package, extra) in EXTRAS.items():
        assert extra in extras, (module, extra)
        assert any(dep.lower().startswith(package.lower()) for dep in extras[extra]), (module, package)


def test_cli_missing_package_is_one_line(tiny_gpt2, tmp_path, monkeypatch, capsys):
    (tmp_path / "c.txt").write_text("The lamp was lit at seven and the ships passed the rocks.")
    run_scan(ScanConfig(model="tiny", corpus=str(tmp_path / "c.txt"), out=str(tmp_path / "run"), layers=[0],
                        context_length=8, compile_stats=False), model=tiny_gpt2)
    monkeypatch.setitem(sys.modules, "duckdb", None)
    assert main(["query", str(tmp_path / "run"), "SELECT 1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: this needs the optional package 'duckdb': pip install 'neuronhunter[analysis]' "
                   "(or `make setup`)")
