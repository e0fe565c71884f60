"""Neurons that fire together: streaming, mergeable co-activation statistics and clusters (``neuronhunter correlate``).

**Within a layer, exact.** :class:`Coactivation` keeps the count, ``Σ a`` and ``Σ a aᵀ`` (float64) of one layer's
``d`` units over the counted tokens; the Pearson correlation of every pair follows exactly
(``cov = Σaaᵀ/n - μμᵀ``). Memory ``d² x 8`` bytes (19 MB for 1,536 neurons); merging two shards adds the sums.

**Across layers, sketched within a memory budget.** ``D`` units over all layers have ``D²`` pairs (46,080 neurons of
SmolLM2: 2 billion); :class:`CrossLayerSketch` keeps a CountSketch of the *token* axis instead: every token ``t``
(identified by its global window id and position, so shards and batch sizes do not matter) is hashed to one of
``m`` buckets ``h(t)`` with a random sign ``s(t)``, and ``S[h(t)] += s(t) a_t`` (``[m, D]`` float32), with
``c[h(t)] += s(t)`` and the exact moments. The centred sketch ``Z = S - c μᵀ`` satisfies
``E[Zᵢ·Zⱼ] = Σ_t (a_ti - μ_i)(a_tj - μ_j)``: an unbiased estimate of every covariance, with a standard error of
about ``1/√m`` on a correlation (0.03 for ``m = 1024``; measured in the tests against the exact matrix).
``m = memory_budget / (4 D)``. Sketches of shards merge by addition.

**Clusters.** Average-linkage agglomerative clustering of a layer's units on the distance ``1 - |r|``, cut where
the average ``|r|`` inside a cluster would fall below ``threshold``. ``|r|`` because a gated-MLP neuron's sign is
arbitrary (negating ``up_proj`` row n and ``down_proj`` column n changes nothing): a pair that always fires in
opposite directions is as much a unit as one that fires together, and a clustering must not change under that
relabelling; each member's sign relative to the cluster is recorded. A cluster's shared explanation is the one most
of its members carry (the hunt's claim, the explain step's best explanation when the run has them) and the tokens
most of its members' strongest exemplars share (read in each member's cluster-aligned direction).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.sites import Site
from ..stats.tokens import counted_tokens

if TYPE_CHECKING:
    import pandas as pd

    from ..models.hooked import HookedModel

log = logging.getLogger(__name__)

CORRELATIONS = "correlations"
CLUSTERS = "clusters"
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------------- exact
@dataclass
class Coactivation:
    """Exact co-activation moments of ``d`` units (see the module docstring)."""

    d: int
    n: int = 0
    total: Tensor | None = None  # [d] float64
    cross: Tensor | None = None  # [d, d] float64

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.d, dtype=torch.float64)
        if self.cross is None:
            self.cross = torch.zeros(self.d, self.d, dtype=torch.float64)

    def update(self, acts: Tensor) -> None:
        """Add the rows ``[n, d]`` (one per counted token)."""
        a = acts.detach().to("cpu", torch.float64)
        self.n += a.shape[0]
        self.total += a.sum(0)
        self.cross.addmm_(a.T, a)

    def merge(self, other: Coactivation) -> Coactivation:
        if other.d != self.d:
            raise ConfigError(f"cannot merge co-activations of {self.d} and {other.d} units")
        self.n += other.n
        self.total += other.total
        self.cross += other.cross
        return self

    def covariance(self) -> Tensor:
        mu = self.total / max(self.n, 1)
        return self.cross / max(self.n, 1) - torch.outer(mu, mu)

    def correlation(self) -> Tensor:
        """Pearson correlations ``[d, d]`` (NaN for a unit that never varies)."""
        cov = self.covariance()
        std = cov.diagonal().clamp(min=0).sqrt()
        std = torch.where(std > 1e-12, std, torch.full_like(std, float("nan")))
        return (cov / std[:, None] / std[None, :]).clamp(-1, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d, "n": self.n, "total": self.total, "cross": self.cross}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Coactivation:
        return cls(int(state["d"]), int(state["n"]), state["total"], state["cross"])


# ---------------------------------------------------------------------------------------------------- sketch
def token_hash(window_ids: Tensor, positions: Tensor, seed: int = 0) -> Tensor:
    """A 64-bit mix (splitmix64) of ``(window id, position, seed)`` per token: the same for a token whatever the
    batch or shard it is read in."""
    x = window_ids.to(torch.int64) * 1_000_003 + positions.to(torch.int64) + _signed((seed * 0x9E3779B97F4A7C15) & _MASK64)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = x ^ _shr(x, shift)
        x = x * _signed(mult)
    return x ^ _shr(x, 31)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 values."""
    return (x >> k) & ((1 << (64 - k)) - 1)


@dataclass
class CrossLayerSketch:
    """CountSketch of the token axis for all units of several layers (see the module docstring)."""

    widths: dict[int, int]
    buckets: int
    seed: int = 0
    n: int = 0
    sketch: Tensor | None = None  # [m, D] float32
    signs: Tensor | None = None  # [m] float64
    total: Tensor | None = None  # [D] float64
    squares: Tensor | None = None  # [D] float64
    offsets: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        start = 0
        for layer in sorted(self.widths):
            self.offsets[layer] = start
            start += self.widths[layer]
        d = start
        if self.sketch is None:
            self.sketch = torch.zeros(self.buckets, d)
            self.signs = torch.zeros(self.buckets, dtype=torch.float64)
            self.total = torch.zeros(d, dtype=torch.float64)
            self.squares = torch.zeros(d, dtype=torch.float64)

    @classmethod
    def within_budget(cls, widths: dict[int, int], memory_bytes: int, seed: int = 0) -> CrossLayerSketch:
        d = sum(widths.values())
        m = max(16, int(memory_bytes // (4 * d)))
        return cls(widths, m, seed)

    def update(self, rows: dict[int, Tensor], window_ids: Tensor, positions: Tensor) -> None:
        """Add the counted tokens: ``rows[layer]`` ``[n, d_layer]``, with each token's window id and position."""
        h = token_hash(window_ids, positions, self.seed)
        bucket = h % self.buckets  # remainder: never negative
        sign = torch.where((_shr(h, 40) & 1) == 1, 1.0, -1.0)
        self.n += int(h.shape[0])
        self.signs.index_add_(0, bucket, sign.double())
        for layer, a in rows.items():
            a = a.detach().float().cpu()
            off = self.offsets[layer]
            sl = slice(off, off + a.shape[1])
            self.sketch[:, sl].index_add_(0, bucket, a * sign[:, None].float())
            self.total[sl] += a.double().sum(0)
            self.squares[sl] += a.double().pow(2).sum(0)

    def merge(self, other: CrossLayerSketch) -> CrossLayerSketch:
        if (other.widths, other.buckets, other.seed) != (self.widths, self.buckets, self.seed):
            raise ConfigError("cannot merge sketches of different layers, sizes or seeds")
        self.n += other.n
        self.sketch += other.sketch
        self.signs += other.signs
        self.total += other.total
        self.squares += other.squares
        return self

    def normalised(self) -> Tensor:
        """``[m, D]`` centred sketch columns divided by ``√n σ``: their dot products estimate correlations."""
        n = max(self.n, 1)
        mu = self.total / n
        var = (self.squares / n - mu * mu).clamp(min=0)
        std = torch.where(var > 1e-18, var.sqrt(), torch.full_like(var, float("nan")))
        z = self.sketch.double() - self.signs[:, None] * mu[None, :]
        return (z / (np.sqrt(n) * std[None, :])).float()

    def unit(self, index: int) -> tuple[int, int]:
        """``(layer, unit)`` of a column."""
        for layer in sorted(self.offsets, reverse=True):
            if index >= self.offsets[layer]:
                return layer, index - self.offsets[layer]
        raise IndexError(index)


# ---------------------------------------------------------------------------------------------------- tables
def top_correlates(corr: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the ``k`` other units of largest ``|r|`` (``(indices [d, k], values [d, k])``)."""
    c = corr.clone().double()
    c.fill_diagonal_(float("nan"))
    score = torch.nan_to_num(c.abs(), nan=-1.0)
    k = min(k, c.shape[1] - 1)
    idx = score.topk(k, dim=1).indices
    return idx.numpy(), torch.gather(c, 1, idx).numpy()


def sketch_correlates(sk: CrossLayerSketch, k: int, block: int = 1024) -> pd.DataFrame:
    """Every unit's ``k`` strongest correlates in *other* layers, from the sketch (blocks of ``block`` units)."""
    import pandas as pd

    z = sk.normalised()
    z = torch.nan_to_num(z, nan=0.0)
    layer_of = torch.empty(z.shape[1], dtype=torch.long)
    for layer, off in sk.offsets.items():
        layer_of[off:off + sk.widths[layer]] = layer
    frames = []
    for lo in range(0, z.shape[1], block):
        hi = min(lo + block, z.shape[1])
        r = (z[:, lo:hi].T @ z).clamp(-1, 1)  # [b, D]
        r[layer_of[lo:hi][:, None] == layer_of[None, :]] = 0.0  # same-layer pairs are exact elsewhere
        kk = min(k, r.shape[1])
        idx = r.abs().topk(kk, dim=1).indices
        val = torch.gather(r, 1, idx)
        for row in range(hi - lo):
            la, ua = sk.unit(lo + row)
            others = [sk.unit(int(j)) for j in idx[row]]
            frames.append(pd.DataFrame({
                "layer": la, "neuron": ua, "rank": np.arange(kk, dtype=np.int16),
                "other_layer": [o[0] for o in others], "other_neuron": [o[1] for o in others],
                "correlation": val[row].double().numpy(), "method": "sketch"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def clusters_of(corr: Tensor, threshold: float, min_size: int = 2) -> list[tuple[list[int], list[int], float]]:
    """Average-linkage clusters on ``1 - |r|`` cut at ``1 - threshold``: ``(members, signs, mean |r|)`` of each
    cluster of at least ``min_size`` units, largest first (units that never vary are left out). ``signs`` are
    each member's sign relative to the cluster's first member."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    c = corr.double()
    alive = torch.nonzero(~torch.isnan(c.diagonal())).flatten()
    if alive.numel() < 2:
        return []
    sub = c[alive][:, alive].abs().nan_to_num(0.0)
    dist = (1.0 - sub).clamp(min=0).numpy()
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method="average"), t=1.0 - threshold,
                      criterion="distance")
    out = []
    for lab in np.unique(labels):
        members = alive[torch.from_numpy(np.nonzero(labels == lab)[0])].tolist()
        if len(members) < min_size:
            continue
        block = c[members][:, members]
        first = block[0]
        signs = [1 if first[i] >= 0 else -1 for i in range(len(members))]
        off = block.abs()[~torch.eye(len(members), dtype=torch.bool)]
        out.append((members, signs, float(off.mean())))
    out.sort(key=lambda t: (-len(t[0]), -t[2], t[0][0]))
    return out


def _shared_tokens(examples: pd.DataFrame | None, layer: int, members: list[int], signs: list[int],
                   top: int = 5) -> tuple[list[str], list[float]]:
    """The tokens most members' strongest exemplars share (each member in its cluster-aligned direction)."""
    if examples is None or not len(examples):
        return [], []
    counts: Counter[str] = Counter()
    ex = examples[examples["layer"] == layer]
    for unit, sign in zip(members, signs, strict=True):
        kind = "top" if sign > 0 else "bottom"
        toks = set(ex[(ex["neuron"] == unit) & (ex["kind"] == kind)]["token"].astype(str))
        counts.update(toks)
    best = counts.most_common(top)
    return [t for t, _ in best], [c / len(members) for _, c in best]


def _shared_label(neurons: pd.DataFrame | None, layer: int, members: list[int], column: str) -> tuple[Any, float]:
    if neurons is None or column not in neurons.columns:
        return None, 0.0
    rows = neurons[(neurons["layer"] == layer) & (neurons["neuron"].isin(members))][column].dropna()
    rows = rows[rows.astype(str) != ""]
    if not len(rows):
        return None, 0.0
    value, count = Counter(rows.astype(str)).most_common(1)[0]
    return value, count / len(members)


def clusters_frame(corrs: dict[int, Tensor], threshold: float, neurons: pd.DataFrame | None = None,
                   examples: pd.DataFrame | None = None, min_size: int = 2) -> pd.DataFrame:
    """One row per cluster of every layer (see :func:`clusters_of`), with the shared explanation."""
    import pandas as pd

    rows = []
    for layer, corr in sorted(corrs.items()):
        for i, (members, signs, mean_r) in enumerate(clusters_of(corr, threshold, min_size)):
            tokens, shares = _shared_tokens(examples, layer, members, signs)
            claim, claim_share = _shared_label(neurons, layer, members, "claim_category")
            expl, expl_share = _shared_label(neurons, layer, members, "explanation")
            verdict, verdict_share = _shared_label(neurons, layer, members, "verdict")
            rows.append({"layer": layer, "cluster": i, "size": len(members), "neurons": members, "signs": signs,
                         "mean_abs_correlation": mean_r, "shared_tokens": tokens, "shared_token_share": shares,
                         "verdict": verdict, "verdict_share": verdict_share, "claim_category": claim,
                         "claim_share": claim_share, "explanation": expl, "explanation_share": expl_share})
    cols = ["layer", "cluster", "size", "neurons", "signs", "mean_abs_correlation", "shared_tokens",
            "shared_token_share", "verdict", "verdict_share", "claim_category", "claim_share", "explanation",
            "explanation_share"]
    return pd.DataFrame(rows, columns=cols)


def correlations_frame(corrs: dict[int, Tensor], k: int) -> pd.DataFrame:
    """The ``k`` strongest within-layer correlates (by ``|r|``) of every unit, exact."""
    import pandas as pd

    frames = []
    for layer, corr in sorted(corrs.items()):
        idx, val = top_correlates(corr, k)
        d, kk = idx.shape
        frames.append(pd.DataFrame({
            "layer": np.full(d * kk, layer, dtype=np.int32), "neuron": np.repeat(np.arange(d, dtype=np.int32), kk),
            "rank": np.tile(np.arange(kk, dtype=np.int16), d), "other_layer": np.full(d * kk, layer, dtype=np.int32),
            "other_neuron": idx.reshape(-1).astype(np.int32), "correlation": val.reshape(-1), "method": "exact"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------------- the pass
@dataclass
class CorrelationResult:
    exact: dict[int, Coactivation]
    sketch: CrossLayerSketch | None
    tokens: int
    seconds: float

    def correlations(self) -> dict[int, Tensor]:
        return {layer: c.correlation() for layer, c in self.exact.items()}


def coactivation_pass(model: HookedModel, scfg: Any, *, sketch_bytes: int | None = None, seed: int = 0,
                      progress: Callable[[int, int | None], None] | None = None) -> CorrelationResult:
    """One streaming pass over the scan's windows of ``scfg`` (a :class:`~neuronhunter.config.ScanConfig`):
    exact co-activations of each layer, and (``sketch_bytes``, more than one layer) the cross-layer sketch."""
    from .training import scan_batches

    t0 = time.perf_counter()
    layers = model.check_layers(scfg.layers if scfg.layers is not None else range(model.n_layers))
    d = min(scfg.neurons_per_layer or model.d_mlp, model.d_mlp)
    exact = {layer: Coactivation(d) for layer in layers}
    sk = None
    if sketch_bytes and len(layers) > 1:
        sk = CrossLayerSketch.within_budget({layer: d for layer in layers}, sketch_bytes, seed)
    store: dict[int, Tensor] = {}

    def record(act: Tensor, site: Site) -> None:
        store[site.layer] = act[..., :d]

    fns = {Site.mlp_post(layer): record for layer in layers}
    tokens = 0
    for _i, batch, _layers in scan_batches(model, scfg):
        with torch.no_grad(), model.hooks(fns):
            model.forward(batch.input_ids, batch.attention_mask, stop_at_layer=max(layers) + 1)
        keep = counted_tokens(batch.attention_mask, include_first=scfg.include_first)
        rows = {layer: store[layer][keep.to(store[layer].device)] for layer in layers}
        for layer in layers:
            exact[layer].update(rows[layer])
        if sk is not None:
            b, p = torch.nonzero(keep, as_tuple=True)
            sk.update(rows, batch.window_ids[b], p)
        tokens += int(keep.sum())
        if progress is not None:
            progress(tokens, scfg.max_tokens)
    if tokens == 0:
        raise ConfigError("the corpus gave no tokens to correlate")
    return CorrelationResult(exact, sk, tokens, time.perf_counter() - t0)


def correlate_run(run: str | Path, *, layers: Sequence[int] | None = None, max_tokens: int | None = 50_000,
                  top: int = 10, threshold: float = 0.5, min_size: int = 2, sketch_mb: float = 64.0,
                  split: str | None = None, model: HookedModel | None = None,
                  progress: Callable[[int, int | None], None] | None = None, write: bool = True
                  ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Co-activations of a run's units (neurons, or features for a feature run) on its corpus and windowing,
    their top correlates and clusters; written into the run in place (``correlations.parquet``,
    ``clusters.parquet``, ``manifest["correlate"]``).

    Args:
        layers: layers to correlate (default: the run's); ``max_tokens``: counted tokens to read.
        top: correlates kept per unit; ``threshold``/``min_size``: cluster cut (mean ``|r|`` inside) and size.
        sketch_mb: memory for the cross-layer sketch (0: no cross-layer pairs).
        split: side of the document split to read (default: the side the run read).
    """
    import pandas as pd

    from ..config import ScanConfig
    from ..io import MANIFEST, read_json, read_table, require_run, write_table
    from ..runfolder import updating
    from .features import model_for_run

    run = require_run(run, "neurons.parquet")
    manifest = read_json(run / MANIFEST)
    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    run_layers = list(manifest.get("layers") or [])
    use = sorted(set(layers)) if layers is not None else run_layers
    bad = sorted(set(use) - set(run_layers))
    if bad:
        raise ConfigError(f"layer {bad[0]} was not scanned in {run} (it has layers {run_layers})")
    if not 0 < threshold <= 1:
        raise ConfigError(f"--threshold must be in (0, 1], got {threshold}")
    model = model_for_run(run, model=model)
    side = split or (manifest.get("corpus", {}).get("split") or {}).get("side") or config.get("split") or "all"
    allowed = set(ScanConfig.model_fields)
    base = {k: v for k, v in config.items() if k in allowed}
    base.update(layers=use, max_tokens=max_tokens, split=side, neurons_per_layer=manifest.get("neurons_per_layer"),
                out="unused", checkpoint_every=0, compile_stats=False, concepts=None, formats=["parquet"])
    scfg = ScanConfig.model_validate(base)
    res = coactivation_pass(model, scfg, sketch_bytes=int(sketch_mb * 2**20) if sketch_mb else None,
                            seed=scfg.seed, progress=progress)
    corrs = res.correlations()
    table = correlations_frame(corrs, top)
    if res.sketch is not None:
        table = pd.concat([table, sketch_correlates(res.sketch, top)], ignore_index=True)
    neurons = read_table(run / "neurons.parquet")
    examples = read_table(run / "examples.parquet") if (run / "examples.parquet").exists() else None
    clusters = clusters_frame(corrs, threshold, neurons, examples, min_size)
    summary = {"layers": use, "tokens": res.tokens, "split": side, "top": top, "threshold": threshold,
               "min_size": min_size, "clusters": int(len(clusters)),
               "units_in_clusters": int(clusters["size"].sum()) if len(clusters) else 0,
               "sketch": None if res.sketch is None else {"buckets": res.sketch.buckets,
                                                          "bytes": res.sketch.sketch.numel() * 4,
                                                          "expected_error": 1 / np.sqrt(res.sketch.buckets)},
               "seconds": res.seconds, "unit": manifest.get("model", {}).get("neuron_site")}
    if write:
        with updating(run) as current:
            write_table(table, run / CORRELATIONS)
            write_table(clusters, run / CLUSTERS)
            current["correlate"] = summary
    return table, clusters, summary
