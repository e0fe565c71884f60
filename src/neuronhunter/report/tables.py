"""Exporting a run's Parquet tables to CSV, JSON or JSON Lines (``neuronhunter export``).

Runs write their big tables (neurons, examples, concepts, ...) as Parquet only: a full scan of the embedded model
holds 46,080 neuron rows with histograms and about a million example rows, which as CSV and JSON took several times
the disk space. This module converts an existing run's tables on request, streaming them in row batches (memory
bounded by a batch, not by the table), each file written atomically. List-valued columns (the histogram) become
``;``-joined strings in CSV and stay arrays in JSON/JSONL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_path, require_run

FORMATS = ("csv", "json", "jsonl")
BATCH_ROWS = 16_384


def run_tables(run: Path) -> list[str]:
    """Names of the Parquet tables in a run folder (``neurons``, ``examples``, ...), sorted."""
    return sorted(p.stem for p in run.glob("*.parquet"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (math.inf if value > 0 else -math.inf)
    return value


def _rows(batch: Any) -> Iterable[dict[str, Any]]:
    for row in batch.to_pylist():
        yield {k: _jsonable(v) for k, v in row.items()}


def export_table(src: Path, dest: Path, fmt: str) -> Path:
    """Convert one Parquet file to ``fmt`` at ``dest`` (atomic, streamed in row batches)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    with atomic_path(dest) as tmp:
        if fmt == "csv":
            writer = None
            for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                cols = []
                for name, col in zip(batch.schema.names, batch.columns, strict=True):
                    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                        col = pa.array([None if v is None else ";".join(str(x) for x in v) for v in col.to_pylist()],
                                       type=pa.string())
                    cols.append((name, col))
                table = pa.table(dict(cols))
                if writer is None:
                    writer = pcsv.CSVWriter(str(tmp), table.schema)
                writer.write_table(table)
            if writer is None:
                tmp.write_text(",".join(pf.schema_arrow.names) + "\n", encoding="utf-8")
            else:
                writer.close()
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                first = True
                if fmt == "json":
                    fh.write("[")
                for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                    for row in _rows(batch):
                        text = json.dumps(row, ensure_ascii=False, allow_nan=True)
                        if fmt == "json":
                            fh.write(("" if first else ",\n") + text)
                        else:
                            fh.write(text + "\n")
                        first = False
                if fmt == "json":
                    fh.write("]\n")
    return dest


def export_run(run: str | Path, fmt: str, *, tables: Iterable[str] | None = None,
               out: str | Path | None = None) -> list[Path]:
    """Export a complete run's tables as ``fmt`` (csv, json or jsonl) into ``out`` (default ``RUN/export``).

    Args:
        tables: table names (default: every Parquet table of the run).

    Returns:
        The files written.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run = require_run(run)
    available = run_tables(run)
    names = list(tables) if tables is not None else available
    missing = [n for n in names if n not in available]
    if missing:
        raise ConfigError(f"{run} has no table {missing[0]!r} (tables: {', '.join(available) or 'none'})")
    folder = Path(out) if out is not None else run / "export"
    return [export_table(run / f"{name}.parquet", folder / f"{name}.{fmt}", fmt) for name in names]
