"""The curated public API resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import neuronhunter


def test_every_public_name_resolves():
    for name in neuronhunter.__all__:
        assert getattr(neuronhunter, name) is not None, name


def test_import_is_light():
    code = "import sys, neuronhunter; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
