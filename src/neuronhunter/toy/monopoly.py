"""Mono-to-poly weight dynamics: does learning a XOR task make toy neurons polysemantic, and does it show in the weights?

**Setup.** A ``3072 → hidden (ReLU) → 2`` MLP (hidden = 10 by default) reads 32×32 RGB line images
(:mod:`neuronhunter.toy.lines`) with two binary features, orientation (vertical/horizontal) and colour (red/blue).

* Phase 1 trains it to report the **orientation** (colour random and irrelevant).
* Phase 2 **continues from the phase-1 weights** (fresh AdamW state) on the **XOR** task: class 1 =
  vertical+red or horizontal+blue, class 2 = vertical+blue or horizontal+red.

**Tracked every epoch** (epoch 0 of a phase is the state before that phase's first update), per seed:
train/test loss and accuracy (full-set evaluations after the epoch), and per hidden neuron on the *test* set:

* the mean post-ReLU response ``r_c`` to each concept group c ∈ (vertical, horizontal, red, blue);
* ``crs`` — :func:`~neuronhunter.analysis.metrics.crs` over the four concept responses. Every image has one
  orientation *and* one colour, so a perfectly orientation- or colour-selective neuron scores exactly 0.5 (e.g.
  pure vertical: r = (a, 0, a/2, a/2)), while a conjunction neuron (vertical∧red: r = (a/2, 0, a/2, 0)) or a
  neuron responding to all four alike scores 0. 0.5 is the ceiling on this balanced dataset;
* ``crs_orientation`` over (vertical, horizontal) and ``crs_color`` over (red, blue), each in ``[0, 1]``;
* verdicts: a neuron is **dead** if it never fires on the test set (max activation ≤ 0); dead neurons get the
  verdict ``dead`` everywhere and are excluded from H1/H2 (their CRS of 0 would otherwise count them as
  polysemantic). An alive neuron is **polysemantic** (``poly``) if ``crs < poly_threshold`` (default 0.3) and
  **monosemantic** (``mono``) otherwise. Per feature, ``verdict_orientation``/``verdict_color`` say ``mono`` if the
  neuron prefers one value of that feature (``crs_<feature> >= poly_threshold``) and ``poly`` if it responds to both
  values alike;
* the incoming weights' entropy (:func:`~neuronhunter.analysis.metrics.weight_entropy`, nats, of the normalised
  absolute weights), their L2 norm, and the neuron's mean angle to the other neurons' weight vectors;
* per model: the mean pairwise angular distance (degrees) between all hidden neurons' incoming weight vectors
  (:func:`~neuronhunter.analysis.metrics.mean_pairwise_angle`; also over alive neurons only, for reference).

**Hypotheses**, each measured once per seed (default 5 seeds; seed s draws its own dataset and initialisation) and
judged across seeds with :func:`neuronhunter.toy.hypotheses.judge`:

* **H1** polysemantic neurons have higher weight entropy. Measured on the alive neurons' states at the end of
  phase 1 and at the end of phase 2. Phase 2 turns almost every neuron polysemantic, so the end of phase 2 alone
  rarely has a monosemantic neuron to compare with, and pooling both phase ends would confound "polysemantic" with
  "trained longer, on XOR" (norms grow with training). The default (``h12_states="stratified"``) therefore compares
  poly and mono *within* each phase end: per seed, the value is the mean over the phase ends that have both groups
  of ``mean entropy(poly) - mean entropy(mono)``; a seed with no such phase end has no value and is skipped. The
  pooled comparison and each phase end alone are reported alongside (``alternatives``);
* **H2** polysemantic neurons have a larger L2 norm: the same with the weight norm;
* **H3** the mean pairwise angular distance decreases in phase 2: per seed, ``angle(end of phase 2) - angle(end of
  phase 1)`` (predicted < 0).

A hypothesis is **supported** when the mean of its per-seed values has the predicted sign *and* a one-sided
one-sample t test over seeds gives ``p < alpha`` (0.05) with at least 3 usable seeds; otherwise it is **not
supported**. An exact sign test and, for H1/H2, a Welch t test on neurons pooled over seeds are reported alongside.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..analysis.metrics import angular_distance, crs, mean_pairwise_angle, weight_entropy
from ..errors import ConfigError
from ..io import atomic_path, write_json
from ._common import (
    ProgressFn,
    ToyRunConfig,
    clean_json,
    mean,
    prepare_run_dir,
    std,
    torch_threads,
    write_manifest,
)
from .hypotheses import judge, welch_t
from .lines import CONCEPTS, LinesData, make_lines, save_png_samples

log = logging.getLogger(__name__)

PHASE_TASKS = {1: "orientation", 2: "xor"}


class MonopolyConfig(ToyRunConfig):
    """Configuration of the mono-to-poly experiment (``neuronhunter toy monopoly``)."""

    out: Path = Field(Path("runs/toy-monopoly"), description="run folder")
    seeds: int = Field(5, ge=1, description="number of seeds (base_seed, base_seed+1, ...)")
    base_seed: int = Field(0, ge=0, description="first seed")
    n_train: int = Field(5000, ge=8)
    n_test: int = Field(1000, ge=8)
    noise: float = Field(0.1, ge=0.0, description="std of the Gaussian pixel noise")
    thickness: tuple[int, int] = (1, 3)
    length: tuple[int, int] = (16, 32)
    hidden: int = Field(10, ge=2, description="hidden ReLU neurons")
    epochs_phase1: int = Field(20, ge=1)
    epochs_phase2: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    poly_threshold: float = Field(0.3, ge=0.0, le=1.0, description="CRS below this is polysemantic")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="significance level of the hypothesis tests")
    h12_states: Literal["stratified", "pooled", "phase1_end", "phase2_end"] = Field(
        "stratified", description="neuron states compared in H1/H2 (see the module docstring)"
    )
    png_samples: int = Field(
        16, ge=0, description="PNG files of train images saved under samples/ (first seed)"
    )
    checkpoint_every_epoch: bool = False

    def seed_list(self) -> list[int]:
        return list(range(self.base_seed, self.base_seed + self.seeds))


class LineMLP(nn.Module):
    """``3072 → hidden (ReLU) → 2``; ``fc1.weight[i]`` is hidden neuron i's incoming weight vector (C, H, W order)."""

    def __init__(self, hidden: int = 10, n_in: int = 3 * 32 * 32, n_out: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def hidden_acts(self, x: Tensor) -> Tensor:
        """Post-ReLU hidden activations ``[batch, hidden]``."""
        return torch.relu(self.fc1(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden_acts(x))


def make_model(hidden: int, seed: int, device: str = "cpu") -> LineMLP:
    """A freshly initialised :class:`LineMLP`, deterministic in ``seed`` (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LineMLP(hidden)
    return model.to(device)


@torch.no_grad()
def evaluate(model: LineMLP, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    return loss, acc


@torch.no_grad()
def neuron_metrics(model: LineMLP, data: LinesData, poly_threshold: float = 0.3) -> dict[str, Any]:
    """Per-neuron selectivity and weight metrics on ``data`` (see the module docstring for the definitions).

    Returns:
        A dict of per-neuron tensors/lists (``responses [h, 4]``, ``crs``, ``crs_orientation``, ``crs_color``,
        ``alive``, ``verdict``, ``verdict_orientation``, ``verdict_color``, ``weight_entropy``, ``l2_norm``,
        ``mean_angle``) and the model-level ``mean_pairwise_angle`` and ``mean_pairwise_angle_alive``.
    """
    acts = model.hidden_acts(data.flat())  # [n, h]
    masks = data.concept_masks().to(acts.dtype)  # [n, 4]
    responses = (masks.T @ acts / masks.sum(0).clamp(min=1)[:, None]).T  # [h, 4]
    alive = acts.max(0).values > 0
    c_all = crs(responses)
    c_orient = crs(responses[:, :2])
    c_color = crs(responses[:, 2:])

    def verdict(score: Tensor) -> list[str]:
        return [
            "dead" if not a else ("poly" if s < poly_threshold else "mono")
            for a, s in zip(alive.tolist(), score.tolist(), strict=True)
        ]

    w = model.fc1.weight.detach()
    h = w.shape[0]
    angles = angular_distance(w[:, None, :], w[None, :, :])  # [h, h]
    mean_angle = (angles.sum(1) - angles.diagonal()) / max(h - 1, 1)
    return {
        "responses": responses.cpu(),
        "crs": c_all.cpu(),
        "crs_orientation": c_orient.cpu(),
        "crs_color": c_color.cpu(),
        "alive": alive.cpu(),
        "verdict": verdict(c_all),
        "verdict_orientation": verdict(c_orient),
        "verdict_color": verdict(c_color),
        "weight_entropy": weight_entropy(w).cpu(),
        "l2_norm": w.norm(dim=-1).cpu(),
        "mean_angle": mean_angle.cpu(),
        "mean_pairwise_angle": mean_pairwise_angle(w),
        "mean_pairwise_angle_alive": mean_pairwise_angle(w[alive]) if int(alive.sum()) >= 2 else float("nan"),
    }


def _neuron_rows(seed: int, phase: int, epoch: int, m: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(m["verdict"])):
        row: dict[str, Any] = {"seed": seed, "phase": phase, "epoch": epoch, "neuron": i}
        for c, name in enumerate(CONCEPTS):
            row[f"r_{name}"] = float(m["responses"][i, c])
        for key in ("crs", "crs_orientation", "crs_color"):
            row[key] = float(m[key][i])
        row["alive"] = bool(m["alive"][i])
        for key in ("verdict", "verdict_orientation", "verdict_color"):
            row[key] = m[key][i]
        for key in ("weight_entropy", "l2_norm", "mean_angle"):
            row[key] = float(m[key][i])
        rows.append(row)
    return rows


def _save_checkpoint(model: LineMLP, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})


def load_checkpoint(path: str | Path, hidden: int | None = None) -> LineMLP:
    """Load a :class:`LineMLP` saved by :func:`run_monopoly` (``checkpoints/phase*/seed*.safetensors``)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    model = LineMLP(hidden or state["fc1.weight"].shape[0])
    model.load_state_dict(state)
    return model


def train_phase(
    model: LineMLP,
    train: LinesData,
    test: LinesData,
    *,
    phase: int,
    seed: int,
    config: MonopolyConfig,
    step: Callable[[], None] | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Train ``model`` in place for one phase, evaluating every epoch.

    Args:
        model: the MLP (phase 2 passes the phase-1 model).
        train: training images (on the model's device).
        test: test images (on the model's device).
        phase: 1 (orientation task) or 2 (XOR task).
        seed: seeds the minibatch order of this phase.
        config: epochs, batch size, optimiser settings, poly threshold.
        step: called once per finished epoch (progress).
        checkpoint_dir: where per-epoch checkpoints go when ``config.checkpoint_every_epoch``.

    Returns:
        ``(history_rows, neuron_rows, final_metrics)``: one history row per epoch (0 = before training), one
        neuron row per (epoch, neuron), and :func:`neuron_metrics` of the final state.
    """
    with torch_threads(config.threads):
        task = PHASE_TASKS[phase]
        epochs = config.epochs_phase1 if phase == 1 else config.epochs_phase2
        x_train, y_train = train.flat(), train.labels(task)
        x_test, y_test = test.flat(), test.labels(task)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        g = torch.Generator().manual_seed(seed * 1000 + phase)
        history: list[dict[str, Any]] = []
        neurons: list[dict[str, Any]] = []

        def record(epoch: int) -> dict[str, Any]:
            model.eval()
            train_loss, train_acc = evaluate(model, x_train, y_train)
            test_loss, test_acc = evaluate(model, x_test, y_test)
            m = neuron_metrics(model, test, config.poly_threshold)
            alive = m["alive"]
            history.append(
                {
                    "seed": seed,
                    "phase": phase,
                    "epoch": epoch,
                    "task": task,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "mean_pairwise_angle": m["mean_pairwise_angle"],
                    "mean_pairwise_angle_alive": m["mean_pairwise_angle_alive"],
                    "n_alive": int(alive.sum()),
                    "n_dead": int((~alive).sum()),
                    "n_poly": m["verdict"].count("poly"),
                    "n_mono": m["verdict"].count("mono"),
                    "mean_crs_alive": float(m["crs"][alive].mean()) if alive.any() else float("nan"),
                    "mean_weight_entropy": float(m["weight_entropy"].mean()),
                    "mean_l2_norm": float(m["l2_norm"].mean()),
                }
            )
            neurons.extend(_neuron_rows(seed, phase, epoch, m))
            if checkpoint_dir is not None and config.checkpoint_every_epoch:
                meta = {"seed": seed, "phase": phase, "epoch": epoch, "task": task, "hidden": config.hidden}
                _save_checkpoint(model, checkpoint_dir / f"seed{seed}_epoch{epoch:03d}.safetensors", meta)
            return m

        final = record(0)
        n = x_train.shape[0]
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(n, generator=g).to(x_train.device)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            final = record(epoch)
            if step is not None:
                step()
        return history, neurons, final


def _group_values(m: dict[str, Any], key: str, verdict: str) -> list[float]:
    return [float(v) for v, d in zip(m[key].tolist(), m["verdict"], strict=True) if d == verdict]


def _poly_vs_mono(per_seed: list[dict[str, Any]], metric: str, states: str, alpha: float) -> dict[str, Any]:
    """Per-seed poly-minus-mono difference of ``metric`` over alive neuron states, judged across seeds.

    ``states``: ``"stratified"`` (mean over the two phase ends of the within-phase-end differences, using the phase
    ends where both groups exist), ``"pooled"`` (states at both phase ends pooled), ``"phase1_end"`` or
    ``"phase2_end"``.
    """
    phases = {"phase1_end": (1,), "phase2_end": (2,)}.get(states, (1, 2))
    diffs, poly_all, mono_all, per = [], [], [], []
    for s in per_seed:
        poly, mono, within = [], [], []
        for p in phases:
            pp = _group_values(s[f"final_phase{p}"], metric, "poly")
            mm = _group_values(s[f"final_phase{p}"], metric, "mono")
            poly, mono = poly + pp, mono + mm
            if pp and mm:
                within.append(mean(pp) - mean(mm))
        poly_all, mono_all = poly_all + poly, mono_all + mono
        if states == "stratified":
            diff = mean(within)
        else:
            diff = mean(poly) - mean(mono) if poly and mono else float("nan")
        diffs.append(diff)
        per.append(
            {
                "seed": s["seed"],
                "n_poly": len(poly),
                "n_mono": len(mono),
                "mean_poly": mean(poly),
                "mean_mono": mean(mono),
                "diff": diff,
            }
        )
    return {
        "states": states,
        "per_seed": per,
        "n_poly": len(poly_all),
        "n_mono": len(mono_all),
        "mean_poly": mean(poly_all),
        "mean_mono": mean(mono_all),
        "pooled_welch": welch_t(poly_all, mono_all, "greater"),
        **judge(diffs, "greater", alpha),
    }


H12_STATES = ("stratified", "pooled", "phase1_end", "phase2_end")
_BRIEF = ("n_poly", "n_mono", "mean_poly", "mean_mono", "mean", "std", "n_seeds", "p", "sign_p", "verdict")


def evaluate_hypotheses(
    per_seed: list[dict[str, Any]], alpha: float = 0.05, h12_states: str = "stratified"
) -> dict[str, Any]:
    """Judge H1–H3 from per-seed end-of-phase metrics.

    Args:
        per_seed: one dict per seed with ``seed`` and ``final_phase1``/``final_phase2`` (:func:`neuron_metrics`).
        alpha: significance level of the one-sided tests.
        h12_states: which neuron states H1/H2 compare (see :class:`MonopolyConfig`); the others are reported too.

    Returns:
        ``{"H1": ..., "H2": ..., "H3": ...}``, each with the statement, the per-seed values, :func:`judge`'s
        numbers and verdict; H1/H2 add group sizes and means, a Welch test on neuron states pooled over seeds, and
        the same comparison under the other state choices (``alternatives``).
    """
    if h12_states not in H12_STATES:
        raise ConfigError(f"h12_states must be one of {H12_STATES}, got {h12_states!r}")
    out: dict[str, Any] = {}
    for key, metric, statement in (
        (
            "H1",
            "weight_entropy",
            "polysemantic neurons have higher incoming-weight entropy than monosemantic ones",
        ),
        (
            "H2",
            "l2_norm",
            "polysemantic neurons have a larger incoming-weight L2 norm than monosemantic ones",
        ),
    ):
        res = _poly_vs_mono(per_seed, metric, h12_states, alpha)
        alternatives = {}
        for other in H12_STATES:
            if other != h12_states:
                r = _poly_vs_mono(per_seed, metric, other, alpha)
                alternatives[other] = {k: r[k] for k in _BRIEF} | {
                    "per_seed_diff": [p["diff"] for p in r["per_seed"]]
                }
        out[key] = {
            "statement": statement,
            "metric": metric,
            "direction": "poly - mono > 0",
            **res,
            "alternatives": alternatives,
        }
    diffs, per = [], []
    for s in per_seed:
        a1, a2 = s["final_phase1"]["mean_pairwise_angle"], s["final_phase2"]["mean_pairwise_angle"]
        diffs.append(a2 - a1)
        per.append({"seed": s["seed"], "angle_phase1": a1, "angle_phase2": a2, "diff": a2 - a1})
    out["H3"] = {
        "statement": "the mean pairwise angular distance between hidden neurons' weight vectors decreases in phase 2",
        "metric": "mean_pairwise_angle (degrees, all hidden neurons)",
        "direction": "angle(end of phase 2) - angle(end of phase 1) < 0",
        "per_seed": per,
        "mean_phase1": mean([p["angle_phase1"] for p in per]),
        "mean_phase2": mean([p["angle_phase2"] for p in per]),
        **judge(diffs, "less", alpha),
    }
    return out


def _final_summary(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "verdict": m["verdict"],
        "crs": [round(float(v), 4) for v in m["crs"]],
        "weight_entropy": [round(float(v), 4) for v in m["weight_entropy"]],
        "l2_norm": [round(float(v), 4) for v in m["l2_norm"]],
        "mean_pairwise_angle": m["mean_pairwise_angle"],
    }


def run_monopoly(config: MonopolyConfig | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the full mono-to-poly experiment over all seeds and write the run folder.

    Writes ``checkpoints/phase{1,2}/seed<s>.safetensors``, ``metrics/crs_phase{1,2}.csv``,
    ``metrics/training_history.csv``, ``samples/*.png``, ``plots/*.png``, ``config.json``, ``summary.json`` and
    finally ``manifest.json``.

    Args:
        config: the experiment configuration (defaults if None).
        progress: optional ``(description, completed, total)`` callback, called after every epoch.

    Returns:
        The summary dict (also written to ``summary.json``).
    """
    config = config or MonopolyConfig()
    with torch_threads(config.threads):
        return _run_monopoly(config, progress)


def _run_monopoly(config: MonopolyConfig, progress: ProgressFn | None) -> dict[str, Any]:
    import pandas as pd

    if config.thickness[1] >= config.length[0]:
        raise ConfigError("thickness max must be below length min, or orientation is ambiguous")
    t0 = time.time()
    folder = prepare_run_dir(
        config.out, config.overwrite, ("checkpoints/phase1", "checkpoints/phase2", "metrics", "plots")
    )
    out = folder.work
    write_json(out / "config.json", config.model_dump(mode="json"))
    seeds = config.seed_list()
    total = len(seeds) * (config.epochs_phase1 + config.epochs_phase2)
    done = 0

    def step(desc: str) -> Callable[[], None]:
        def _s() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(desc, done, total)

        return _s

    history: list[dict[str, Any]] = []
    neurons: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    per_seed: list[dict[str, Any]] = []
    weights: dict[int, list[tuple[int, Tensor, list[str]]]] = {1: [], 2: []}
    samples: LinesData | None = None
    for seed in seeds:
        train = make_lines(
            config.n_train, seed, noise=config.noise, thickness=config.thickness, length=config.length
        )
        test = make_lines(
            config.n_test,
            seed + 10_000_019,
            noise=config.noise,
            thickness=config.thickness,
            length=config.length,
        )
        if samples is None:
            samples = test
            if config.png_samples:
                save_png_samples(train, out / "samples", config.png_samples, prefix="train")
        train, test = train.to(config.device), test.to(config.device)
        model = make_model(config.hidden, seed, config.device)
        record: dict[str, Any] = {"seed": seed}
        for phase in (1, 2):
            ckpt = out / "checkpoints" / f"phase{phase}"
            h, nrows, final = train_phase(
                model,
                train,
                test,
                phase=phase,
                seed=seed,
                config=config,
                step=step(f"seed {seed} phase {phase}"),
                checkpoint_dir=ckpt,
            )
            history += h
            neurons[phase] += nrows
            record[f"final_phase{phase}"] = final
            record[f"accuracy_phase{phase}"] = {"train": h[-1]["train_acc"], "test": h[-1]["test_acc"]}
            meta = {
                "seed": seed,
                "phase": phase,
                "epoch": h[-1]["epoch"],
                "task": PHASE_TASKS[phase],
                "hidden": config.hidden,
            }
            _save_checkpoint(model, ckpt / f"seed{seed}.safetensors", meta)
            weights[phase].append((seed, model.fc1.weight.detach().cpu().clone(), final["verdict"]))
        per_seed.append(record)
        log.info(
            "seed %d: test acc phase 1 %.3f, phase 2 %.3f; phase-2 verdicts %s",
            seed,
            record["accuracy_phase1"]["test"],
            record["accuracy_phase2"]["test"],
            {v: record["final_phase2"]["verdict"].count(v) for v in ("mono", "poly", "dead")},
        )

    hist_df = pd.DataFrame(history)
    crs_dfs = {p: pd.DataFrame(neurons[p]) for p in (1, 2)}
    for name, df in (("training_history", hist_df), ("crs_phase1", crs_dfs[1]), ("crs_phase2", crs_dfs[2])):
        with atomic_path(out / "metrics" / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)

    hyps = evaluate_hypotheses(per_seed, config.alpha, config.h12_states)
    if config.plots:
        from . import plots

        assert samples is not None
        for phase in (1, 2):
            plots.plot_line_samples(samples, PHASE_TASKS[phase], out / "plots" / f"phase{phase}_samples.png")
            plots.plot_neuron_weights(
                weights[phase],
                out / "plots" / f"phase{phase}_weights.png",
                title=f"Incoming weights at the end of phase {phase}",
            )
        plots.plot_monopoly_metrics(
            hist_df, pd.concat([crs_dfs[1], crs_dfs[2]]), hyps, out / "plots", config.poly_threshold
        )

    def acc(phase: int, split: str) -> dict[str, float]:
        vals = [r[f"accuracy_phase{phase}"][split] for r in per_seed]
        return {"mean": mean(vals), "std": std(vals)}

    summary = {
        "experiment": "monopoly",
        "seeds": seeds,
        "poly_threshold": config.poly_threshold,
        "accuracy": {f"phase{p}": {s: acc(p, s) for s in ("train", "test")} for p in (1, 2)},
        "hypotheses": hyps,
        "per_seed": [
            {
                "seed": r["seed"],
                "accuracy_phase1": r["accuracy_phase1"],
                "accuracy_phase2": r["accuracy_phase2"],
                "final_phase1": _final_summary(r["final_phase1"]),
                "final_phase2": _final_summary(r["final_phase2"]),
            }
            for r in per_seed
        ],
        "elapsed_s": round(time.time() - t0, 2),
    }
    summary = clean_json(summary)
    write_json(out / "summary.json", summary)
    write_manifest(folder, "toy monopoly", seeds, time.time() - t0)
    return summary
