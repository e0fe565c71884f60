"""Toy Models of Superposition (Elhage et al., 2022), reproduced: the ReLU output model on sparse features.

**Model.** ``n`` features are squeezed through ``m < n`` hidden dimensions and read back::

    h = W x            W: [m, n]  (column W_i is feature i's direction)
    x' = ReLU(Wᵀ h + b)

**Data.** Each feature is independently 0 with probability S (the *sparsity*) and otherwise uniform on [0, 1].
**Loss.** Importance-weighted MSE ``L = E_x Σ_i I_i (x_i − x'_i)²`` with ``I_i = r^i`` (mean over the batch and the
features, as in the paper's notebook). Many *instances* (one per (sparsity, replicate)) are trained at once as a
batch dimension: ``W: [instances, m, n]``; the total loss is the sum over instances, so their gradients are
independent. AdamW (weight decay 0 by default, i.e. Adam) with a constant learning rate, Xavier-normal initial W,
zero bias. Optionally each instance is the best of ``restarts`` independently initialised candidates (lowest loss on
fresh samples after training): random restarts only help the optimiser out of local minima such as five-in-two's
"square with one feature dropped", and the raw success rate over all candidates is reported too.

**Metrics per feature** (computed by :func:`feature_metrics`):

* ``norm`` ``‖W_i‖`` — about 1 when the feature is represented, 0 when it is dropped;
* ``interference`` ``Σ_{j≠i} (Ŵ_i·W_j)²`` — how much other features project onto i's direction (0 = orthogonal
  to all others; the paper's "superposition" colour);
* ``dimensionality`` ``D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²`` — the fraction of a hidden dimension feature i gets
  (1 = a dedicated dimension, 1/2 = an antipodal pair, 2/5 = a pentagon; 0 for a dropped feature, ‖W_i‖ < 1e-6);
* per instance, *dimensions per feature* ``m / ‖W‖_F²``.

**Checks of the paper's findings** (in ``summary.json`` under ``checks``):

* ``dense`` (instances with S = 0): the model keeps exactly the ``m`` most important features (norm ≥
  ``norm_threshold``, default 0.5), orthogonally (pairwise angles within ``90° ± angle_tolerance``), and the other
  features are dropped (norm < ``norm_threshold``);
* ``pentagon`` (five-in-two, instances with S ≥ ``pentagon_min_sparsity`` = 0.9): an instance forms a pentagon when
  all five norms are ≥ ``norm_threshold``, the five neighbouring angles (sorted around the circle) are within
  ``72° ± angle_tolerance`` (default 10°) and every ``|D_i − 2/5| ≤ 0.05``. The check reports every instance's norms,
  neighbouring angles and D_i; its verdict is ``yes`` when at least half of the checked instances form one;
* ``dimensionality`` (instances with S > 0, represented features): each D_i is matched to the nearest of the
  paper's fractions 1, 3/4, 2/3, 1/2, 2/5, 3/8; the share within ``dim_tolerance`` (0.02; narrowed to ±0.0125
  for 2/5 and 3/8, which are only 0.025 apart) is compared with the share expected if the values were spread
  uniformly over ``[0.2, 1]``.

Presets (:data:`PRESETS`): ``five-in-two`` (n=5, m=2, I_i=0.9^i, S ∈ {0, 0.7, 0.8, 0.9, 0.95, 0.99}, 4 replicates,
best of 4 restarts each) and ``twenty-in-five`` (n=20, m=5, I_i=0.7^i, S ∈ {0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999},
3 replicates, no restarts). Both train 10,000 steps of batch 1024 at learning rate 1e-3, as in the paper.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from ..errors import ConfigError
from ..io import write_json
from ._common import (
    ProgressFn,
    ToyRunConfig,
    clean_json,
    mean,
    prepare_run_dir,
    torch_threads,
    write_manifest,
)

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "five-in-two": {
        "n_features": 5,
        "n_hidden": 2,
        "importance_decay": 0.9,
        "sparsities": [0.0, 0.7, 0.8, 0.9, 0.95, 0.99],
        "replicates": 4,
        "restarts": 4,
    },
    "twenty-in-five": {
        "n_features": 20,
        "n_hidden": 5,
        "importance_decay": 0.7,
        "sparsities": [0.0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999],
        "replicates": 3,
        "restarts": 1,
    },
}

PAPER_FRACTIONS: dict[str, float] = {
    "1": 1.0,
    "3/4": 0.75,
    "2/3": 2 / 3,
    "1/2": 0.5,
    "2/5": 0.4,
    "3/8": 0.375,
}
"""Feature dimensionalities the paper finds features sticking to (dedicated, tetrahedron, triangle, digon,
pentagon, square antiprism)."""


class TMSConfig(ToyRunConfig):
    """Configuration of a toy-models-of-superposition run (``neuronhunter toy tms``)."""

    preset: str | None = Field(
        None, description="name of the preset these settings came from (informational)"
    )
    n_features: int = Field(5, ge=2)
    n_hidden: int = Field(2, ge=1)
    importance_decay: float = Field(0.9, gt=0.0, le=1.0, description="I_i = decay**i")
    sparsities: list[float] = Field(default_factory=lambda: list(PRESETS["five-in-two"]["sparsities"]))
    replicates: int = Field(4, ge=1, description="independently initialised instances per sparsity")
    restarts: int = Field(1, ge=1, description="candidates trained per instance; the lowest-loss one is kept")
    eval_samples: int = Field(16_384, ge=1, description="fresh samples for the candidates' final loss")
    steps: int = Field(10_000, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)
    norm_threshold: float = Field(0.5, gt=0, description="a feature with ‖W_i‖ >= this is represented")
    angle_tolerance: float = Field(
        10.0, gt=0, description="degrees, for the orthogonality and pentagon checks"
    )
    dim_tolerance: float = Field(0.02, gt=0, description="|D_i - fraction| counted as sticking to a fraction")
    pentagon_min_sparsity: float = Field(0.9, ge=0, lt=1)
    out: Path | None = Field(None, description="run folder (default runs/toy-tms-<preset>)")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one sparsity is needed")
        bad = [s for s in v if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"sparsities must lie in [0, 1), got {bad}")
        return [float(s) for s in v]

    @model_validator(mode="after")
    def _dims(self) -> TMSConfig:
        if self.n_hidden >= self.n_features:
            raise ValueError(f"n_hidden ({self.n_hidden}) must be below n_features ({self.n_features})")
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TMSConfig:
        """The config of preset ``name`` with ``overrides`` (``None`` values are ignored)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown TMS preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = {**PRESETS[name], "preset": name}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def run_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(f"runs/toy-tms-{self.preset or 'custom'}")

    def instance_table(self) -> tuple[list[float], list[int]]:
        """Sparsity and replicate index of each instance (sparsity-major order)."""
        sp = [s for s in self.sparsities for _ in range(self.replicates)]
        rep = [r for _ in self.sparsities for r in range(self.replicates)]
        return sp, rep

    def importance(self) -> Tensor:
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------- metrics


def feature_metrics(W: Tensor, eps: float = 1e-6) -> dict[str, Tensor]:
    """Norm, interference, dimensionality per feature and dimensions per feature per instance.

    Args:
        W: ``[..., m, n]`` (column ``W[..., :, i]`` is feature i's direction).
        eps: features with a smaller norm count as dropped (dimensionality 0, Ŵ_i = 0).

    Returns:
        ``norm``, ``interference``, ``dimensionality``: ``[..., n]``; ``dims_per_feature``: ``[...]``.
    """
    W = W.detach().to(torch.float64)
    m = W.shape[-2]
    norm = W.norm(dim=-2)  # [..., n]
    unit = W / norm.clamp(min=eps).unsqueeze(-2)
    unit = torch.where((norm > eps).unsqueeze(-2), unit, torch.zeros_like(unit))
    overlap = (unit.transpose(-1, -2) @ W) ** 2  # [..., n, n]: (Ŵ_i · W_j)²
    total = overlap.sum(-1)
    interference = total - overlap.diagonal(dim1=-2, dim2=-1)
    dim = torch.where(norm > eps, norm**2 / total.clamp(min=eps * eps), torch.zeros_like(norm))
    dims_per_feature = m / (W**2).sum(dim=(-2, -1)).clamp(min=eps)
    return {
        "norm": norm,
        "interference": interference,
        "dimensionality": dim,
        "dims_per_feature": dims_per_feature,
    }


def neighbour_angles(w2: Tensor, norm_threshold: float = 0.5) -> tuple[list[float], list[int]]:
    """For a 2-D instance ``w2: [2, n]``: the angles (degrees) between neighbouring represented features.

    Represented features (norm ≥ ``norm_threshold``) are sorted by their polar angle; the gaps between consecutive
    ones (wrapping around) sum to 360°.

    Returns:
        ``(gaps, order)``: the gaps, and the feature indices in angular order (``gaps[k]`` lies between
        ``order[k]`` and ``order[k+1]``).
    """
    w2 = w2.detach().to(torch.float64).cpu()
    if w2.shape[0] != 2:
        raise ValueError("neighbour_angles needs a 2-D instance [2, n]")
    keep = (w2.norm(dim=0) >= norm_threshold).nonzero().flatten()
    if len(keep) < 2:
        return [], keep.tolist()
    theta = torch.rad2deg(torch.atan2(w2[1, keep], w2[0, keep])) % 360.0
    sorted_theta, idx = theta.sort()
    gaps = torch.diff(torch.cat([sorted_theta, sorted_theta[:1] + 360.0]))
    return gaps.tolist(), keep[idx].tolist()


def nearest_fraction(d: float, fractions: dict[str, float] = PAPER_FRACTIONS) -> tuple[str, float]:
    """The paper fraction closest to ``d`` and the absolute distance to it."""
    name = min(fractions, key=lambda k: abs(fractions[k] - d))
    return name, abs(fractions[name] - d)


# --------------------------------------------------------------------------------------------------- training


def sample_batch(sparsity: Tensor, batch: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Sparse features ``[instances, batch, n]``: 0 with probability S (per instance), else uniform on [0, 1].

    One uniform draw ``u`` serves both purposes: ``u < 1 - S`` decides "active", and ``u / (1 - S)`` is then
    uniform on [0, 1).
    """
    p = (1.0 - sparsity).to(torch.float32).view(-1, 1, 1)
    u = torch.rand((sparsity.shape[0], batch, n), generator=generator, device=sparsity.device)
    return torch.where(u < p, u / p, torch.zeros_like(u))


def forward(W: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``x' = ReLU(Wᵀ W x + b)`` for ``W: [I, m, n]``, ``b: [I, n]``, ``x: [I, batch, n]``."""
    h = torch.bmm(x, W.transpose(1, 2))  # [I, batch, m]
    return torch.relu(torch.bmm(h, W) + b.unsqueeze(1))


@torch.no_grad()
def eval_loss(
    W: Tensor,
    b: Tensor,
    sparsity: Tensor,
    importance: Tensor,
    n_samples: int,
    generator: torch.Generator | None,
    chunk: int = 4096,
) -> Tensor:
    """Importance-weighted MSE per instance on ``n_samples`` fresh samples (``[I]``)."""
    total = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    done = 0
    while done < n_samples:
        size = min(chunk, n_samples - done)
        x = sample_batch(sparsity, size, W.shape[-1], generator)
        total += (importance * (x - forward(W, b, x)) ** 2).mean(dim=2).sum(dim=1).double()
        done += size
    return (total / n_samples).float()


def train_tms(config: TMSConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train all instances of ``config`` in parallel and keep the best of ``restarts`` candidates per instance.

    Every (sparsity, replicate) slot is trained from ``restarts`` independent initialisations at once (all as one
    batch dimension); after training each candidate's loss is measured on ``eval_samples`` fresh samples and the
    lowest-loss candidate is kept. This is plain random restarting: it only helps the optimiser past local minima
    (e.g. the "square plus a dropped feature" of five-in-two); the raw candidates are returned too.

    Returns:
        ``W`` ``[I, m, n]`` and ``b`` ``[I, n]`` of the kept candidates, their held-out ``loss`` ``[I]``,
        ``sparsity``/``replicate`` per instance, ``importance`` ``[n]``, and ``candidates``: ``W``, ``b``,
        ``loss`` of all ``I * restarts`` candidates (slot-major) plus ``chosen`` ``[I]`` (index of the kept one).
    """
    device = torch.device(config.device)
    sp, rep = config.instance_table()
    n, m, k = config.n_features, config.n_hidden, config.restarts
    slots = len(sp)
    inst = slots * k
    g = torch.Generator().manual_seed(config.seed)
    W0 = torch.empty(inst, m, n)
    W0.normal_(0.0, math.sqrt(2.0 / (m + n)), generator=g)  # Xavier normal for an [m, n] matrix
    W = W0.to(device).requires_grad_(True)
    b = torch.zeros(inst, n, device=device, requires_grad=True)
    importance = config.importance().to(device)
    sparsity = torch.tensor(sp, device=device).repeat_interleave(k)
    data_gen = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(config.seed + 1)
    with torch_threads(config.threads):
        opt = torch.optim.AdamW([W, b], lr=config.lr, weight_decay=config.weight_decay)
        every = max(1, config.steps // 200)
        desc = f"TMS {config.preset or 'custom'}"
        for step in range(config.steps):
            x = sample_batch(sparsity, config.batch_size, n, data_gen)
            out = forward(W, b, x)
            loss = (
                (importance * (x - out) ** 2).mean(dim=(1, 2)).sum()
            )  # mean over batch/features, sum over instances
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None and ((step + 1) % every == 0 or step + 1 == config.steps):
                progress(desc, step + 1, config.steps)
        W, b = W.detach(), b.detach()
        cand_loss = eval_loss(W, b, sparsity, importance, config.eval_samples, data_gen)
    best = cand_loss.view(slots, k).argmin(dim=1)
    chosen = torch.arange(slots, device=device) * k + best
    return {
        "W": W[chosen].cpu(),
        "b": b[chosen].cpu(),
        "loss": cand_loss[chosen].cpu(),
        "sparsity": sp,
        "replicate": rep,
        "importance": importance.cpu(),
        "candidates": {"W": W.cpu(), "b": b.cpu(), "loss": cand_loss.cpu(), "chosen": chosen.cpu()},
    }


# ----------------------------------------------------------------------------------------------------- checks


def _pairwise_angles(w: Tensor) -> list[float]:
    """Angles (degrees) between all pairs of columns of ``w: [m, k]``."""
    from ..analysis.metrics import angular_distance

    cols = w.T
    k = cols.shape[0]
    return [float(angular_distance(cols[i], cols[j])) for i in range(k) for j in range(i + 1, k)]


def check_dense(result: dict[str, Any], metrics: dict[str, Tensor], config: TMSConfig) -> dict[str, Any]:
    """Dense features (S = 0): the m most important features kept orthogonally, the rest dropped."""
    m = config.n_hidden
    rows = []
    for k, s in enumerate(result["sparsity"]):
        if s != 0.0:
            continue
        norms = metrics["norm"][k]
        kept = [i for i in range(config.n_features) if norms[i] >= config.norm_threshold]
        # with uniform importance any m features are "the most important"
        expected = list(range(m)) if config.importance_decay < 1.0 else kept[:m]
        top = result["W"][k][:, expected] if len(expected) else result["W"][k][:, :0]
        angles = _pairwise_angles(top)
        others = norms[[i for i in range(config.n_features) if i not in expected]]
        ok_set = len(kept) == m and kept == expected
        ok_orth = all(abs(a - 90.0) <= config.angle_tolerance for a in angles)
        rows.append(
            {
                "instance": k,
                "replicate": result["replicate"][k],
                "kept_features": kept,
                "top_m_norms": [round(float(norms[i]), 4) for i in expected],
                "max_dropped_norm": float(others.max()) if len(others) else 0.0,
                "top_m_pairwise_angles": [round(a, 2) for a in angles],
                "keeps_top_m": ok_set,
                "orthogonal": ok_orth,
                "passed": ok_set and ok_orth,
            }
        )
    n_pass = sum(r["passed"] for r in rows)
    return {
        "claim": f"with dense features the model keeps the {m} most important features orthogonally and drops the rest",
        "instances": rows,
        "n_checked": len(rows),
        "n_passed": n_pass,
        "verdict": "n/a" if not rows else ("yes" if n_pass == len(rows) else f"{n_pass}/{len(rows)}"),
    }


def _is_pentagon(
    w2: Tensor, norms: Tensor, dims: Tensor, config: TMSConfig
) -> tuple[bool, list[float], list[int]]:
    gaps, order = neighbour_angles(w2, config.norm_threshold)
    ok_norms = bool((norms >= config.norm_threshold).all())
    ok_angles = len(gaps) == 5 and all(abs(a - 72.0) <= config.angle_tolerance for a in gaps)
    ok_dims = bool(((dims - 0.4).abs() <= 0.05).all())
    return ok_norms and ok_angles and ok_dims, gaps, order


def check_pentagon(
    result: dict[str, Any], metrics: dict[str, Tensor], config: TMSConfig
) -> dict[str, Any] | None:
    """Five features in two dimensions at S ≥ ``pentagon_min_sparsity``: a regular pentagon? (None unless n=5, m=2)."""
    if config.n_features != 5 or config.n_hidden != 2:
        return None
    rows = []
    for k, s in enumerate(result["sparsity"]):
        if s < config.pentagon_min_sparsity:
            continue
        norms, dims = metrics["norm"][k], metrics["dimensionality"][k]
        ok, gaps, order = _is_pentagon(result["W"][k], norms, dims, config)
        rows.append(
            {
                "instance": k,
                "sparsity": s,
                "replicate": result["replicate"][k],
                "loss": float(result["loss"][k]),
                "norms": [round(float(v), 4) for v in norms],
                "neighbour_angles": [round(a, 2) for a in gaps],
                "angular_order": order,
                "dimensionality": [round(float(v), 4) for v in dims],
                "pentagon": ok,
            }
        )
    formed = [r for r in rows if r["pentagon"]]
    all_angles = [a for r in formed for a in r["neighbour_angles"]]
    all_norms = [v for r in formed for v in r["norms"]]
    all_dims = [v for r in formed for v in r["dimensionality"]]
    by_s: dict[str, list[int]] = {}
    for r in rows:
        key = f"{r['sparsity']:g}"
        by_s.setdefault(key, [0, 0])
        by_s[key][0] += int(r["pentagon"])
        by_s[key][1] += 1

    # every trained candidate, before keeping the best of the restarts (the optimiser's raw success rate)
    raw_ok = raw_n = 0
    cand = result.get("candidates")
    if cand is not None:
        k_restarts = cand["W"].shape[0] // len(result["sparsity"])
        cm = feature_metrics(cand["W"])
        for c in range(cand["W"].shape[0]):
            if result["sparsity"][c // k_restarts] < config.pentagon_min_sparsity:
                continue
            raw_n += 1
            raw_ok += int(_is_pentagon(cand["W"][c], cm["norm"][c], cm["dimensionality"][c], config)[0])

    def rng(v: list[float]) -> list[float] | None:
        return [round(min(v), 4), round(max(v), 4)] if v else None

    return {
        "claim": f"with sparse features (S >= {config.pentagon_min_sparsity:g}) five features form a regular pentagon",
        "instances": rows,
        "n_checked": len(rows),
        "n_pentagon": len(formed),
        "by_sparsity": {s: f"{a}/{t}" for s, (a, t) in by_s.items()},
        "raw_candidates": f"{raw_ok}/{raw_n}",
        "pentagon_norm_mean": mean(all_norms),
        "pentagon_norm_range": rng(all_norms),
        "pentagon_angle_mean": mean(all_angles),
        "pentagon_angle_range": rng(all_angles),
        "pentagon_dimensionality_range": rng(all_dims),
        "verdict": "n/a" if not rows else ("yes" if 2 * len(formed) >= len(rows) else "no"),
    }


def fraction_windows(tol: float, fractions: dict[str, float] = PAPER_FRACTIONS) -> dict[str, float]:
    """Half-width of each fraction's window: ``tol``, narrowed to half the gap to the nearest other fraction.

    2/5 and 3/8 are only 0.025 apart, so their windows shrink to ±0.0125 and no value counts for both.
    """
    out = {}
    for name, f in fractions.items():
        gap = min(abs(f - g) for other, g in fractions.items() if other != name)
        out[name] = min(tol, gap / 2)
    return out


def check_dimensionality(features: Any, config: TMSConfig) -> dict[str, Any]:
    """How many represented features (S > 0) have a dimensionality inside the window of a paper fraction.

    Each feature with ``‖W_i‖ >= norm_threshold`` in an instance with S > 0 is matched to the nearest fraction of
    :data:`PAPER_FRACTIONS`; it sticks to it when the distance is within the fraction's window
    (:func:`fraction_windows`). The baseline is the share of ``[0.2, 1]`` the windows cover, i.e. the share
    expected if the values were spread uniformly there.
    """
    rep = features[(features.norm >= config.norm_threshold) & (features.sparsity > 0)]
    windows = fraction_windows(config.dim_tolerance)
    counts = {name: 0 for name in PAPER_FRACTIONS}
    others = []
    for d in rep.dimensionality:
        name, dist = nearest_fraction(float(d))
        if dist <= windows[name] + 1e-12:
            counts[name] += 1
        else:
            others.append(round(float(d), 3))
    covered = sum(
        min(1.0, PAPER_FRACTIONS[k] + w) - max(0.2, PAPER_FRACTIONS[k] - w) for k, w in windows.items()
    )
    total = len(rep)
    return {
        "claim": "feature dimensionalities cluster at the paper's fractions (1, 3/4, 2/3, 1/2, 2/5, 3/8)",
        "n_represented": total,
        "tolerance": config.dim_tolerance,
        "windows": windows,
        "counts_near_fraction": counts,
        "share_near_fraction": sum(counts.values()) / total if total else float("nan"),
        "share_expected_if_uniform_0.2_1": covered / 0.8,
        "other_values": sorted(others),
    }


# ------------------------------------------------------------------------------------------------------- run


def feature_table(result: dict[str, Any], metrics: dict[str, Tensor]) -> Any:
    """One row per (instance, feature): the columns of ``features.csv``."""
    import pandas as pd

    W = result["W"]
    inst, m, n = W.shape
    angle = (
        torch.rad2deg(torch.atan2(W[:, 1], W[:, 0])) % 360.0
        if m == 2
        else torch.full((inst, n), float("nan"))
    )
    rows = []
    for k in range(inst):
        for i in range(n):
            rows.append(
                {
                    "instance": k,
                    "sparsity": result["sparsity"][k],
                    "feature": i,
                    "importance": float(result["importance"][i]),
                    "norm": float(metrics["norm"][k, i]),
                    "interference": float(metrics["interference"][k, i]),
                    "dimensionality": float(metrics["dimensionality"][k, i]),
                    "replicate": result["replicate"][k],
                    "angle_deg": float(angle[k, i]),
                }
            )
    return pd.DataFrame(rows)


def run_tms(config: TMSConfig | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train a TMS preset, measure every feature, check the paper's findings and write the run folder.

    Writes ``features.csv``, ``instances.csv``, ``weights.safetensors`` (W and b of every instance),
    ``config.json``, ``summary.json``, ``plots/*.png`` and finally ``manifest.json``.

    Args:
        config: the run configuration (default: the ``five-in-two`` preset).
        progress: optional ``(description, completed, total)`` callback during training.

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    config = config or TMSConfig.from_preset("five-in-two")
    with torch_threads(config.threads):
        return _run_tms(config, progress)


def _run_tms(config: TMSConfig, progress: ProgressFn | None) -> dict[str, Any]:
    import pandas as pd
    from safetensors.torch import save_file

    from ..io import atomic_path

    t0 = time.time()
    folder = prepare_run_dir(config.run_dir(), config.overwrite, ("plots",))
    out = folder.work
    write_json(out / "config.json", config.model_dump(mode="json"))

    result = train_tms(config, progress)
    metrics = feature_metrics(result["W"])
    features = feature_table(result, metrics)
    instances = pd.DataFrame(
        {
            "instance": range(len(result["sparsity"])),
            "sparsity": result["sparsity"],
            "replicate": result["replicate"],
            "loss": result["loss"].tolist(),
            "chosen_restart": (result["candidates"]["chosen"] % config.restarts).tolist(),
            "dims_per_feature": metrics["dims_per_feature"].tolist(),
            "n_represented": (metrics["norm"] >= config.norm_threshold).sum(-1).tolist(),
        }
    )
    with atomic_path(out / "features.csv") as tmp:
        features.to_csv(tmp, index=False)
    with atomic_path(out / "instances.csv") as tmp:
        instances.to_csv(tmp, index=False)
    with atomic_path(out / "weights.safetensors") as tmp:
        cand = result["candidates"]
        save_file(
            {
                "W": result["W"].contiguous(),
                "b": result["b"].contiguous(),
                "candidates.W": cand["W"].contiguous(),
                "candidates.b": cand["b"].contiguous(),
                "candidates.loss": cand["loss"].contiguous(),
            },
            str(tmp),
            metadata={
                "layout": "W[instance, m, n], b[instance, n]; candidates.*[instance * restarts + r]",
                "preset": str(config.preset),
            },
        )

    checks: dict[str, Any] = {"dense": check_dense(result, metrics, config)}
    pentagon = check_pentagon(result, metrics, config)
    if pentagon is not None:
        checks["pentagon"] = pentagon
    checks["dimensionality"] = check_dimensionality(features, config)

    if config.plots:
        from . import plots

        if config.n_hidden == 2:
            plots.plot_feature_directions(
                result["W"],
                result["sparsity"],
                result["replicate"],
                result["importance"],
                out / "plots" / "feature_directions.png",
            )
        plots.plot_norm_interference(features, out / "plots" / "norms_interference.png")
        plots.plot_dimensionality(
            features, instances, PAPER_FRACTIONS, out / "plots" / "dims_per_feature.png"
        )
        plots.plot_dimensionality_hist(
            features, PAPER_FRACTIONS, out / "plots" / "dimensionality_hist.png", config.norm_threshold
        )

    per_sparsity = {}
    for s, part in instances.groupby("sparsity"):
        per_sparsity[f"{s:g}"] = {
            "dims_per_feature_mean": float(part.dims_per_feature.mean()),
            "n_represented_mean": float(part.n_represented.mean()),
            "loss_mean": float(part.loss.mean()),
        }
    summary = clean_json(
        {
            "experiment": "tms",
            "preset": config.preset,
            "n_features": config.n_features,
            "n_hidden": config.n_hidden,
            "importance": result["importance"],
            "steps": config.steps,
            "per_sparsity": per_sparsity,
            "checks": checks,
            "elapsed_s": round(time.time() - t0, 2),
        }
    )
    write_json(out / "summary.json", summary)
    write_manifest(folder, f"toy tms --preset {config.preset}", config.seed, time.time() - t0)
    return summary
