"""Helpers shared by the toy experiments: devices, run folders, JSON cleaning, small statistics."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..io import MANIFEST
from ..runfolder import MARKER, RunFolder

ProgressFn = Callable[[str, int, int], None]
"""Progress callback ``(description, completed, total)``."""


def resolve_device(value: str) -> str:
    """Validate a device string; ``"auto"`` picks CUDA when available (raises ``ValueError`` for pydantic)."""
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return value


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads (0 = leave torch's setting), restoring the old value after.

    The toy models are tiny: their ops are too small to gain from several threads, and on a busy machine the
    threads' synchronisation can cost more than the work itself (measured: >10x the CPU time with 2 threads on a
    loaded 2-core box). Both experiments therefore default to one thread.
    """
    old = torch.get_num_threads()
    if n > 0 and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


class ToyRunConfig(BaseModel):
    """Settings every toy experiment has: plots, device, CPU threads, overwrite (unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid")

    plots: bool = True
    device: str = "cpu"
    threads: int = Field(1, ge=0, description="CPU threads for torch during the run (0 = torch's default)")
    overwrite: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return resolve_device(v)


def prepare_run_dir(out: str | Path, overwrite: bool, subdirs: tuple[str, ...]) -> RunFolder:
    """Start a run folder (:class:`~neuronhunter.runfolder.RunFolder`: a finished run is replaced only with
    ``overwrite`` and only if it holds nothing but the tool's files; the new run is written beside it and swapped
    in by :func:`write_manifest`). Returns the folder; write into ``folder.work``."""
    folder = RunFolder(out, kind="toy")
    work = folder.begin(overwrite=overwrite)
    for sub in subdirs:
        (work / sub).mkdir(parents=True, exist_ok=True)
    return folder


def write_manifest(folder: RunFolder, command: str, seeds: Any, elapsed: float) -> None:
    """Write ``manifest.json`` (versions, seeds, file list) last and swap the finished run into place."""
    import platform

    from .. import __version__

    out = folder.work
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.name not in (MANIFEST, MARKER))
    folder.commit({
        "kind": "toy",
        "command": command,
        "neuronhunter": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seeds": seeds,
        "elapsed_s": round(elapsed, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    })


def clean_json(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by ``None`` and tensors/tuples by lists, so JSON stays strict."""
    if isinstance(obj, torch.Tensor):
        return clean_json(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def mean(values: list[float]) -> float:
    """Arithmetic mean; NaN for an empty list."""
    return sum(values) / len(values) if values else float("nan")


def std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); NaN for fewer than two values."""
    if len(values) < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
