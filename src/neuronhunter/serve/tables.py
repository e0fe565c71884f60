"""Fast per-neuron reads of a run's Parquet tables: a row index built from the ``layer`` and ``neuron`` columns
alone, and the file's row groups read (with pyarrow, strings dictionary-encoded) only when a neuron in them is
asked for.

Why: DuckDB answers ``WHERE layer = ? AND neuron = ?`` over a Parquet file by decoding whole row groups, which
for the default hunt run (46,080 neurons; 3 million exemplars, 1.8 million logit rows) costs 50-250 ms a query on
a 2-core machine: too slow for a neuron page that reads four tables. Here a row group is read once (about a layer
of exemplars, ~100-300 ms), by the first request that touches it or by the server's warm-up, which reads them
all in the background after start; every neuron in it is then a slice (~1-5 ms). Held in memory: the tables in
Arrow, strings dictionary-encoded (~400 MB for the default run's exemplars, logit attribution and concepts). The files are never copied or rewritten; a changed file (new modification time or size)
is read afresh.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

KEY_SHIFT = 32  # key = layer << 32 | neuron


def neuron_key(layer: Any, neuron: Any) -> Any:
    """The int64 key of (layer, neuron) (arrays or scalars)."""
    return (np.asarray(layer, dtype=np.int64) << KEY_SHIFT) | np.asarray(neuron, dtype=np.int64)


def _string_columns(schema: Any) -> list[str]:
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


class NeuronRows:
    """Row ranges of every (layer, neuron) of one Parquet table, and its row groups read on demand.

    Args:
        path: the Parquet file (with ``layer`` and ``neuron`` columns).
        columns: read only these columns (default: all).
    """

    def __init__(self, path: str | Path, columns: list[str] | None = None) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.file = pq.ParquetFile(self.path)
        schema = self.file.schema_arrow
        self.columns = columns or list(schema.names)
        self.dictionary = [c for c in _string_columns(schema) if c in self.columns]
        ids = self.file.read(columns=["layer", "neuron"])
        keys = neuron_key(ids["layer"].to_numpy(), ids["neuron"].to_numpy())
        self._lock = threading.Lock()
        self._groups: dict[int, Any] = {}
        if len(keys) and not bool((np.diff(keys) >= 0).all()):
            # not sorted by (layer, neuron): read it whole once, sorted, as one "row group"
            order = np.argsort(keys, kind="stable")
            table = pq.read_table(self.path, columns=self.columns, read_dictionary=self.dictionary).take(order)
            self._groups[0] = table
            self.bounds = np.array([0, len(keys)], dtype=np.int64)
            keys = keys[order]
        else:
            sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
            self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.keys, self.starts, self.counts = np.unique(keys, return_index=True, return_counts=True)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _group(self, i: int) -> Any:
        table = self._groups.get(i)
        if table is None:
            with self._lock:
                table = self._groups.get(i)
                if table is None:
                    table = self.file.read_row_group(i, columns=self.columns)
                    if self.dictionary:  # read_row_group has no read_dictionary: encode here
                        import pyarrow.compute as pc

                        for name in self.dictionary:
                            at = table.schema.get_field_index(name)
                            table = table.set_column(at, name, pc.dictionary_encode(table[name]))
                    self._groups[i] = table
        return table

    def read_all(self) -> None:
        """Read every row group now (the server's warm-up does this in the background)."""
        for i in range(len(self.bounds) - 1):
            self._group(i)

    def rows(self, layer: int, neuron: int) -> list[dict[str, Any]]:
        """The table's rows of one neuron, in file order ([] when it has none)."""
        key = int(neuron_key(layer, neuron))
        at = int(np.searchsorted(self.keys, key))
        if at >= len(self.keys) or int(self.keys[at]) != key:
            return []
        start, stop = int(self.starts[at]), int(self.starts[at] + self.counts[at])
        out: list[dict[str, Any]] = []
        group = int(np.searchsorted(self.bounds, start, side="right")) - 1
        while start < stop:
            lo, hi = int(self.bounds[group]), int(self.bounds[group + 1])
            take = min(stop, hi) - start
            out.extend(self._group(group).slice(start - lo, take).to_pylist())
            start += take
            group += 1
        return out

    def has(self, layer: int, neuron: int) -> bool:
        key = int(neuron_key(layer, neuron))
        at = int(np.searchsorted(self.keys, key))
        return at < len(self.keys) and int(self.keys[at]) == key


class TokenIndex:
    """Which neurons have a given token at the peak of one of their top exemplars (the token search), and each
    neuron's strongest exemplar's token. Tokens match case-insensitively, ignoring surrounding whitespace."""

    def __init__(self, path: str | Path) -> None:
        import pandas as pd
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        cols = ["layer", "neuron", "rank", "token", *(["kind"] if "kind" in names else [])]
        frame = pd.read_parquet(path, columns=cols)
        if "kind" in frame.columns:
            frame = frame[frame["kind"] == "top"]
        keys = neuron_key(frame["layer"].to_numpy(), frame["neuron"].to_numpy())
        norm = frame["token"].astype(str).str.strip().str.lower()
        grouped = pd.Series(keys).groupby(norm.to_numpy()).unique()
        self.by_token: dict[str, np.ndarray] = {str(t): np.sort(v) for t, v in grouped.items()}
        first = frame.assign(_key=keys).sort_values(["_key", "rank"], kind="stable").drop_duplicates("_key")
        self.top: dict[int, str] = dict(zip(first["_key"].tolist(), first["token"].astype(str).tolist(), strict=True))

    def neurons(self, token: str) -> np.ndarray:
        """Keys of the neurons with ``token`` at a top exemplar's peak."""
        return self.by_token.get(token.strip().lower(), np.zeros(0, dtype=np.int64))
