"""Scan results as tables: ``neurons``, ``examples`` and ``concepts``, and the run folder they are written to.

Run folder layout (every file written atomically; ``manifest.json`` last marks the run complete)::

    neurons.parquet / .csv / .json    one row per neuron: layer, neuron, count, mean, std, min, max, frac_active,
                                      skew, kurtosis, first_* (position 0, tracked separately), hist (list of counts)
    examples.parquet / .csv / .json   one row per top example: layer, neuron, rank, activation, doc, pos, token,
                                      context (the max token marked as [[token]]), window, window_pos, source
    concepts.parquet / .csv / .json   (with a lexicon) layer, neuron, category, mean, std, max, count
    stats.pt                          the mergeable accumulator state (stats.state.load_state; compressed)
    config.json                       the resolved configuration
    manifest.json                     model, corpus hash, context length, BOS, versions, seed, timings, schema
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .io import PARQUET_COMPRESSION, atomic_path, write_json, write_table
from .stats.state import save_state

if TYPE_CHECKING:
    import pandas as pd

    from .config import ScanConfig
    from .models.hooked import HookedModel
    from .runfolder import RunFolder
    from .stats.state import ScanState

UNLABELLED = "unlabelled"
EXAMPLE_COLUMNS = ["layer", "neuron", "kind", "direction", "band", "band_lo", "rank", "activation", "doc", "pos",
                   "token", "context", "window", "window_pos", "source"]
KINDS = ("top", "bottom", "band")


def _exemplar_sources(ls: Any) -> Iterator[tuple[str, str, int, Tensor, Tensor, Tensor]]:
    """``(kind, direction, band, values [r, d], window [r, d], pos [r, d])`` of every exemplar list of a layer
    (values in the direction's convention: ``-activation`` for ``-``)."""
    yield "top", "+", -1, ls.topk.values, ls.topk.window, ls.topk.pos
    yield "bottom", "-", -1, ls.bottomk.values, ls.bottomk.window, ls.bottomk.pos
    for direction, bands in (("+", ls.bands_pos), ("-", ls.bands_neg)):
        for b in range(bands.n_bands):
            yield "band", direction, b, bands.value[b], bands.window[b], bands.pos[b]


def _decoded(table: Any) -> Any:
    """A table with its dictionary-encoded columns as plain ones."""
    import pyarrow as pa

    cols = {name: (col.cast(col.type.value_type) if pa.types.is_dictionary(col.type) else col)
            for name, col in zip(table.column_names, table.columns, strict=True)}
    return pa.table(cols)


EXAMPLES_DICTIONARY_BYTES = 64 << 20


def write_examples(tables: Iterable[Any], path: Path) -> Path:
    """Write the examples table layer by layer (one Parquet row group each; memory bounded by a layer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        writer = None
        for table in tables:
            table = _decoded(table)
            if writer is None:
                # text columns repeat a few thousand contexts millions of times: a dictionary page big enough for
                # them halves the file (pyarrow's default 1 MB limit falls back to plain strings)
                writer = pq.ParquetWriter(str(tmp), table.schema, compression=PARQUET_COMPRESSION,
                                          dictionary_pagesize_limit=EXAMPLES_DICTIONARY_BYTES)
            writer.write_table(table)
        if writer is None:
            empty = pa.table({c: pa.array([], pa.string()) for c in EXAMPLE_COLUMNS})
            pq.write_table(empty, str(tmp))
        else:
            writer.close()
    return path


class TokenText:
    """Decodes token ids to text pieces, each id once (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id])
            self.cache[token_id] = s
        return s

    def join(self, ids: list[int]) -> str:
        return "".join(self(i) for i in ids)


def render_example(text: TokenText, ids: list[int], pos: int, *, left: int, right: int,
                   first: int) -> tuple[str, str]:
    """``(token, context)`` of the token at ``pos`` of a window: up to ``left`` tokens before it (not before
    position ``first``, so a prepended BOS is never shown) and ``right`` after, the token marked ``[[token]]``.
    The one rendering of an example: the examples table, the hunt's summaries and the browser all use it."""
    tok = text(ids[pos])
    lo = max(first, pos - left)
    return tok, text.join(ids[lo:pos]) + "[[" + tok + "]]" + text.join(ids[pos + 1: pos + 1 + right])


@dataclass
class ScanResult:
    """The outcome of a scan: the accumulated state plus what is needed to turn it into tables."""

    model: HookedModel
    config: ScanConfig
    state: ScanState
    categories: list[str]
    bos_token_id: int | None
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    skipped_documents: int = 0
    folder: RunFolder | None = None  # the run folder being written (None when nothing is written)

    @property
    def run_dir(self) -> Path | None:
        """Where the run's files are now: the working folder until the run is committed, then the run folder."""
        if self.folder is None:
            return None
        return self.folder.work if self.folder.work.exists() else self.folder.out

    # ---------------------------------------------------------------------------------------------- tables
    def neurons_frame(self) -> pd.DataFrame:
        import pandas as pd

        frames = []
        for layer, ls in sorted(self.state.layers.items()):
            m = ls.moments
            s = m.summary()
            pos = ls.positions
            first_n = max(int(pos.count[0]), 1)
            means = pos.means()
            rest = means[1:]
            d = ls.d
            frames.append(pd.DataFrame({
                "layer": np.full(d, layer, dtype=np.int32),
                "neuron": np.arange(d, dtype=np.int32),
                "count": np.full(d, m.count, dtype=np.int64),
                "mean": s["mean"].numpy(),
                "std": s["std"].numpy(),
                "min": m.min.double().numpy(),
                "max": m.max.double().numpy(),
                "frac_active": s["frac_active"].numpy(),
                "frac_active_neg": s["frac_active_neg"].numpy(),
                "skew": s["skew"].numpy(),
                "kurtosis": s["kurtosis"].numpy(),
                "first_mean": means[0].numpy(),
                "first_max": pos.first_max.double().numpy(),
                "first_min": pos.first_min.double().numpy(),
                "first_frac_active": (pos.first_active.double() / first_n).numpy(),
                "pos_mean_max": torch.nan_to_num(rest, nan=float("-inf")).amax(0).numpy() if rest.shape[0] else np.nan,
                "top_activation": ls.topk.values[0].double().numpy(),
                "bottom_activation": (-ls.bottomk.values[0]).double().numpy(),
                "hist_lo": ls.hist.lo.numpy(),
                "hist_hi": ls.hist.hi.numpy(),
                "hist": list(ls.hist.counts.numpy()),
            }))
        return pd.concat(frames, ignore_index=True)

    def examples_tables(self) -> Iterator[Any]:
        """The examples table one layer at a time (pyarrow Tables; text columns dictionary-encoded).

        One row per exemplar: ``kind`` ``top`` (the top-k windows by maximum, direction ``+``), ``bottom`` (the
        bottom-k by minimum, direction ``-``) or ``band`` (band samples of either direction, ``band`` = the band's
        index, its lower edge as a fraction of the neuron's calibrated scale in ``band_lo``); ``rank`` orders the
        rows of one kind, direction and band; ``activation`` is the neuron's signed activation at ``window_pos``.
        """
        import pyarrow as pa

        text = TokenText(self.model.tokenizer)
        left, right = self.config.context_tokens
        bos = 1 if self.bos_token_id is not None else 0
        keys: dict[tuple[int, int], int] = {}  # (window, pos) -> row of the rendered examples
        tokens: list[str] = []
        contexts: list[str] = []
        for layer, ls in sorted(self.state.layers.items()):
            parts = []
            for kind, direction, band, values, window, pos in _exemplar_sources(ls):
                valid = window >= 0
                ranks, neurons = torch.nonzero(valid, as_tuple=True)
                if not len(ranks):
                    continue
                parts.append({
                    "neuron": neurons.numpy().astype(np.int32), "rank": ranks.numpy().astype(np.int16),
                    # float32 as measured (exact; half the bytes of float64 on disk)
                    "activation": values[valid].float().numpy() * np.float32(1 if direction == "+" else -1),
                    "window": window[valid].numpy().astype(np.int64), "window_pos": pos[valid].numpy().astype(np.int32),
                    "kind": kind, "direction": direction, "band": band,
                    # band 0 holds everything below the second edge (the near-silent windows)
                    "band_lo": np.nan if band < 0 else (-np.inf if band == 0 else ls.spec.band_fractions[band]),
                })
            if not parts:
                continue
            col = {k: np.concatenate([p[k] for p in parts]) for k in ("neuron", "rank", "activation", "window",
                                                                         "window_pos")}
            n_rows = len(col["neuron"])
            kind = np.concatenate([np.full(len(p["neuron"]), p["kind"], dtype=object) for p in parts])
            kind_rank = np.concatenate([np.full(len(p["neuron"]), KINDS.index(p["kind"]), dtype=np.int8)
                                        for p in parts])
            direction = np.concatenate([np.full(len(p["neuron"]), p["direction"], dtype=object) for p in parts])
            band = np.concatenate([np.full(len(p["neuron"]), p["band"], dtype=np.int8) for p in parts])
            band_lo = np.concatenate([np.full(len(p["neuron"]), p["band_lo"]) for p in parts])
            order = np.lexsort((col["rank"], band, (direction == "-").astype(np.int8), kind_rank, col["neuron"]))
            codes = np.empty(n_rows, dtype=np.int32)
            docs = np.empty(n_rows, dtype=np.int64)
            starts = np.empty(n_rows, dtype=np.int64)
            sources = []
            for i, (wid, wpos) in enumerate(zip(col["window"].tolist(), col["window_pos"].tolist(), strict=True)):
                code = keys.get((wid, wpos))
                win = self.state.windows[wid]
                if code is None:
                    tok, ctx = render_example(text, win.ids, wpos, left=left, right=right, first=bos)
                    code = keys[(wid, wpos)] = len(tokens)
                    tokens.append(tok)
                    contexts.append(ctx)
                codes[i] = code
                docs[i], starts[i] = win.doc_id, win.start
                sources.append(win.source)
            codes, docs, starts = codes[order], docs[order], starts[order]
            sources = [sources[i] for i in order]
            token_dict, context_dict = pa.array(tokens, pa.string()), pa.array(contexts, pa.string())
            yield pa.table({
                "layer": pa.array(np.full(n_rows, layer, dtype=np.int32)),
                "neuron": pa.array(col["neuron"][order]),
                "kind": pa.array(kind[order].tolist()).dictionary_encode(),
                "direction": pa.array(direction[order].tolist()).dictionary_encode(),
                "band": pa.array(band[order]),
                "band_lo": pa.array(band_lo[order]),
                "rank": pa.array(col["rank"][order]),
                "activation": pa.array(col["activation"][order]),
                "doc": pa.array(docs),
                "pos": pa.array(starts + col["window_pos"][order] - bos),
                "token": pa.DictionaryArray.from_arrays(pa.array(codes), token_dict),
                "context": pa.DictionaryArray.from_arrays(pa.array(codes), context_dict),
                "window": pa.array(col["window"][order]),
                "window_pos": pa.array(col["window_pos"][order]),
                "source": pa.array(sources).dictionary_encode(),
            })

    def examples_frame(self) -> pd.DataFrame:
        """The examples table as a DataFrame (see :meth:`examples_tables`; text columns as plain strings)."""
        import pandas as pd
        import pyarrow as pa

        tables = list(self.examples_tables())
        if not tables:
            return pd.DataFrame(columns=EXAMPLE_COLUMNS)
        df = pa.concat_tables(_decoded(t) for t in tables).to_pandas()
        return df

    def concepts_frame(self) -> pd.DataFrame | None:
        import pandas as pd

        if not self.categories:
            return None
        names = [*self.categories, UNLABELLED]
        frames = []
        for layer, ls in sorted(self.state.layers.items()):
            cs = ls.concepts
            if cs is None:
                continue
            c, d = cs.sum.shape
            frames.append(pd.DataFrame({
                "layer": np.full(c * d, layer, dtype=np.int32),
                "neuron": np.tile(np.arange(d, dtype=np.int32), c),
                "category": np.repeat(np.array(names, dtype=object), d),
                "mean": cs.means().reshape(-1).numpy(),
                "std": cs.stds().reshape(-1).numpy(),
                "max": cs.max.double().reshape(-1).numpy(),
                "min": cs.min.double().reshape(-1).numpy(),  # the negative direction's extreme
                "count": np.repeat(cs.count.numpy(), d),
            }))
        return pd.concat(frames, ignore_index=True) if frames else None

    # ---------------------------------------------------------------------------------------------- output
    def write(self, out: Path) -> None:
        """Write tables, stats and config into ``out`` (not the manifest: :meth:`RunFolder.commit` writes it last)."""
        formats = tuple(self.config.formats)
        write_table(self.neurons_frame(), out / "neurons", formats=formats)
        write_examples(self.examples_tables(), out / "examples.parquet")
        extra = tuple(f for f in formats if f != "parquet")
        if extra:
            from .report.tables import export_table

            for fmt in extra:
                export_table(out / "examples.parquet", out / f"examples.{fmt}", fmt)
        concepts = self.concepts_frame()
        if concepts is not None:
            write_table(concepts, out / "concepts", formats=formats)
        save_state(self.state, out / "stats.pt")  # read it with neuronhunter.stats.state.load_state
        write_json(out / "config.json", self.config.model_dump(mode="json"))

    def manifest(self) -> dict[str, Any]:
        ls0 = next(iter(self.state.layers.values()))
        return {
            "kind": "scan",
            "model": {**self.model.info, "name": self.model.name, "family": self.model.adapter.family,
                      "n_layers": self.model.n_layers, "d_mlp": self.model.d_mlp, "d_model": self.model.d_model,
                      "neuron_site": "blocks.{layer}.mlp.hook_post"},
            "corpus": {"spec": self.config.corpus or "default", "fingerprint": self.state.corpus_fingerprint,
                       "fingerprint_method": "sum mod 2**256 of BLAKE2b-256(source, start, token ids) per window read",
                       "documents": self.state.documents, "tokens": self.state.tokens,
                       "skipped_documents": self.skipped_documents,
                       "split": self.config.document_split().manifest(self.config.split)},
            "model_fingerprint": self.state.model_fp,
            "context_length": self.config.context_length,
            "prepend_bos": self.bos_token_id is not None,
            "bos_token_id": self.bos_token_id,
            "bos": (self.model.bos_policy.manifest() if self.bos_token_id is not None
                    else {"bos_token_id": None, "bos_rule": "off", "bos_reason": "no BOS (--no-bos)"}),
            "include_first": self.config.include_first,
            "layers": sorted(self.state.layers),
            "neurons_per_layer": ls0.d,
            "tokens": self.state.tokens,
            "windows": self.state.n_windows,
            "categories": self.categories,
            "hist_edges": list(np.linspace(*ls0.hist.shared_range, ls0.hist.n_bins + 1))
            if ls0.hist.shared_range else None,
            "histogram": {"bins": ls0.hist.n_bins, "per_neuron": ls0.hist.shared_range is None,
                          "edges": "neurons.hist_lo .. neurons.hist_hi in equal bins, plus under- and overflow",
                          "calibration_windows": ls0.calibration.windows,
                          "calibration_tokens": ls0.calibration.tokens},
            "exemplars": {"top_k": ls0.topk.k, "bottom_k": ls0.bottomk.k,
                          "band_fractions": list(ls0.spec.band_fractions), "band_samples": ls0.bands_pos.r,
                          "band_scale": "the neuron's largest activation in that direction on the calibration "
                                        "windows"},
            "seed": self.config.seed,
            "versions": self.environment,
            "timings": self.timings,
        }

