"""The documented example script runs (with a tiny local model, so it takes seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs(tmp_path):
    from neuronhunter.models.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", "llama")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--model", str(folder),
                          "--out", str(tmp_path / "run"), "--max-tokens", "300"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "strongest neuron of layer 1" in out.stdout and "zeroed" in out.stdout
    assert (tmp_path / "run" / "manifest.json").exists()
