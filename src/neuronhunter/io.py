"""Atomic file output and run folders.

All artifacts are written to a temporary file in the destination folder and then renamed into place, so an
interrupted run never leaves a half-written file that looks complete. A run folder is marked complete by its
``manifest.json``, which is written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RunDirError

MANIFEST = "manifest.json"
UPDATING = ".manifest.updating.json"  # a complete run's manifest, moved aside while the run is updated in place
PARQUET_COMPRESSION = "zstd"  # every Parquet table the tool writes (about a third smaller than snappy here)


def cache_dir() -> Path:
    """Where converted models, tokenizer files and built helpers are kept: ``$NEURONHUNTER_CACHE`` or the
    platform user cache."""
    env = os.environ.get("NEURONHUNTER_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("neuronhunter"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically (indented, UTF-8, NaN written as null-safe floats by the caller)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def compact_floats(df: Any, *, keep: tuple[str, ...] = ("p_value", "q_value")) -> Any:
    """``df`` with its float64 columns stored as float32 (seven significant digits, half the bytes), except columns
    whose names start with one of ``keep`` (p- and q-values, which can be far below float32's range). For big
    output tables of scores (explanations, per-category responses); measurement state (``stats.pt``) stays exact."""
    cols = [c for c in df.columns if df[c].dtype == "float64" and not str(c).startswith(keep)]
    return df.astype({c: "float32" for c in cols}) if cols else df


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1


def write_table(df: Any, path: str | os.PathLike[str], *, formats: tuple[str, ...] = ("parquet",)) -> list[Path]:
    """Write a pandas DataFrame atomically as ``path`` with each suffix in ``formats`` (parquet, csv, json).

    List-valued columns are kept in Parquet and JSON; in CSV they are joined with ``;``.
    """
    path = Path(path)
    written = []
    for fmt in formats:
        out = path.with_suffix("." + fmt)
        with atomic_path(out) as tmp:
            if fmt == "parquet":
                df.to_parquet(tmp, index=False, compression=PARQUET_COMPRESSION)
            elif fmt == "csv":
                flat = df.copy()
                for col in flat.columns:
                    if len(flat) and _is_sequence(flat[col].iloc[0]):
                        flat[col] = flat[col].map(lambda v: ";".join(str(x) for x in v))
                flat.to_csv(tmp, index=False)
            elif fmt == "json":
                df.to_json(tmp, orient="records")
            else:
                raise ValueError(f"unknown table format {fmt!r}")
        written.append(out)
    return written


def read_table(path: str | os.PathLike[str]) -> Any:
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise RunDirError(f"missing file: {path}")
    return pd.read_parquet(path)


def require_run(run: str | os.PathLike[str], *files: str) -> Path:
    """Check that ``run`` is a complete run folder (has a manifest) and holds ``files``; return its path."""
    run = Path(run)
    partial = run.parent / f".{run.name}.partial"
    hint = f" (an interrupted run is in {partial}: continue it with --resume)" if partial.is_dir() else ""
    if not run.is_dir():
        if hint:
            raise RunDirError(f"{run} is not a complete run folder yet{hint}")
        raise RunDirError(f"run folder not found: {run}")
    if not (run / MANIFEST).exists():
        if (run / UPDATING).exists():
            raise RunDirError(f"an update of {run} was interrupted (its tables may be half rewritten); rerun the "
                              "command that updated it (verify, hunt --rescore), or the run itself")
        raise RunDirError(f"{run} is not a complete run folder (no {MANIFEST}){hint}")
    for name in files:
        if not (run / name).exists():
            raise RunDirError(f"{run} has no {name}; run the command that produces it first")
    return run
