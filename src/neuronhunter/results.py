"""Scan results as tables: ``neurons``, ``examples`` and ``concepts``, and the run folder they are written to.

Run folder layout (every file written atomically; ``manifest.json`` last marks the run complete)::

    neurons.parquet / .csv / .json    one row per neuron: layer, neuron, count, mean, std, min, max, frac_active,
                                      skew, kurtosis, first_* (position 0, tracked separately), hist (list of counts)
    examples.parquet / .csv / .json   one row per top example: layer, neuron, rank, activation, doc, pos, token,
                                      context (the max token marked as [[token]]), window, window_pos, source
    concepts.parquet / .csv / .json   (with a lexicon) layer, neuron, category, mean, std, max, count
    stats.pt                          the mergeable accumulator state (torch.load(..., weights_only=True))
    config.json                       the resolved configuration
    manifest.json                     model, corpus hash, context length, BOS, versions, seed, timings, schema
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .io import atomic_path, write_json, write_table

if TYPE_CHECKING:
    import pandas as pd

    from .config import ScanConfig
    from .models.hooked import HookedModel
    from .runfolder import RunFolder
    from .stats.state import ScanState

UNLABELLED = "unlabelled"


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
                "skew": s["skew"].numpy(),
                "kurtosis": s["kurtosis"].numpy(),
                "first_mean": means[0].numpy(),
                "first_max": pos.first_max.double().numpy(),
                "first_frac_active": (pos.first_active.double() / first_n).numpy(),
                "pos_mean_max": torch.nan_to_num(rest, nan=float("-inf")).amax(0).numpy() if rest.shape[0] else np.nan,
                "top_activation": ls.topk.values[0].double().numpy(),
                "hist": list(ls.hist.counts.numpy()),
            }))
        return pd.concat(frames, ignore_index=True)

    def examples_frame(self) -> pd.DataFrame:
        import pandas as pd

        text = TokenText(self.model.tokenizer)
        left, right = self.config.context_tokens
        bos = 1 if self.bos_token_id is not None else 0
        cols: dict[str, list[Any]] = {k: [] for k in ("layer", "neuron", "rank", "activation", "doc", "pos", "token",
                                                       "context", "window", "window_pos", "source")}
        context_cache: dict[tuple[int, int], tuple[str, str]] = {}
        for layer, ls in sorted(self.state.layers.items()):
            values, windows, positions = ls.topk.values, ls.topk.window, ls.topk.pos
            valid = windows >= 0
            ranks, neurons = torch.nonzero(valid, as_tuple=True)
            order = torch.argsort(neurons * ls.topk.k + ranks)
            for r, n in zip(ranks[order].tolist(), neurons[order].tolist(), strict=True):
                wid, wpos = int(windows[r, n]), int(positions[r, n])
                win = self.state.windows[wid]
                key = (wid, wpos)
                if key not in context_cache:
                    context_cache[key] = render_example(text, win.ids, wpos, left=left, right=right, first=bos)
                tok, ctx = context_cache[key]
                cols["layer"].append(layer)
                cols["neuron"].append(n)
                cols["rank"].append(r)
                cols["activation"].append(float(values[r, n]))
                cols["doc"].append(win.doc_id)
                cols["pos"].append(win.start + wpos - bos)
                cols["token"].append(tok)
                cols["context"].append(ctx)
                cols["window"].append(wid)
                cols["window_pos"].append(wpos)
                cols["source"].append(win.source)
        df = pd.DataFrame(cols)
        for c, t in (("layer", "int32"), ("neuron", "int32"), ("rank", "int16"), ("window_pos", "int32")):
            df[c] = df[c].astype(t)
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
                "count": np.repeat(cs.count.numpy(), d),
            }))
        return pd.concat(frames, ignore_index=True) if frames else None

    # ---------------------------------------------------------------------------------------------- output
    def write(self, out: Path) -> None:
        """Write tables, stats and config into ``out`` (not the manifest: :meth:`RunFolder.commit` writes it last)."""
        formats = tuple(self.config.formats)
        write_table(self.neurons_frame(), out / "neurons", formats=formats)
        write_table(self.examples_frame(), out / "examples", formats=formats)
        concepts = self.concepts_frame()
        if concepts is not None:
            write_table(concepts, out / "concepts", formats=formats)
        with atomic_path(out / "stats.pt") as tmp:
            torch.save(self.state.state_dict(), tmp)
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
                       "skipped_documents": self.skipped_documents},
            "model_fingerprint": self.state.model_fp,
            "context_length": self.config.context_length,
            "prepend_bos": self.bos_token_id is not None,
            "bos_token_id": self.bos_token_id,
            "include_first": self.config.include_first,
            "layers": sorted(self.state.layers),
            "neurons_per_layer": ls0.d,
            "tokens": self.state.tokens,
            "windows": self.state.n_windows,
            "categories": self.categories,
            "hist_edges": ls0.hist.edges.tolist(),
            "seed": self.config.seed,
            "versions": self.environment,
            "timings": self.timings,
        }

