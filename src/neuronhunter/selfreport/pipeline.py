"""The self-report pipeline: select neurons -> record activations -> train a predictor -> evaluate.

:func:`run_selfreport` runs a whole experiment from a :class:`~neuronhunter.selfreport.config.SelfReportConfig`
and writes a run folder::

    <out>/config.json                 the resolved config
    <out>/selection.json              the chosen neurons and why (+ candidates.csv: the best-ranked candidates)
    <out>/targets/<L.N>/dataset.parquet     tokens, activations, targets, splits (model/neuron/site recorded)
    <out>/targets/<L.N>/checkpoints/  last.safetensors + last.json (resume), best.safetensors
    <out>/targets/<L.N>/logs/         metrics.csv, tensorboard/ (events)
    <out>/targets/<L.N>/predictor.safetensors  the trained head and unfrozen blocks (final weights)
    <out>/targets/<L.N>/predictions.parquet    test tokens: truth, prediction, baselines, drifted activation
    <out>/targets/<L.N>/metrics.json  held-out metrics vs baselines, drift, training summary
    <out>/targets/<L.N>/{scatter,trace,training}.html   offline Plotly figures
    <out>/metrics.json                all targets' metrics
    <out>/manifest.json               written last: the run is complete

The model is fine-tuned in place and restored to its original weights after each target, so several targets (and
a caller's model) never see each other's training.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..io import MANIFEST, read_json, write_json, write_table
from ..models import HookedModel
from ..runfolder import MARKER, RunFolder
from .config import NeuronRef, SelfReportConfig
from .dataset import ActivationDataset, ActivationDatasetGenerator, SplitTensors
from .evaluation import (
    activation_drift,
    current_targets,
    mean_baseline,
    neuron_activations,
    probe_baseline,
    regression_metrics,
    score,
    summarize,
    token_baseline,
)
from .predictor import ActivationPredictor, TargetCodec
from .selection import NeuronScanner, Selection

log = logging.getLogger(__name__)
ProgressFn = Callable[[str, int, int], None]


def clean_json(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------------------------------- run folder
def prepare_run_dir(config: SelfReportConfig, out: Path, *, overwrite: bool, resume: bool) -> RunFolder:
    """Start the run folder (:class:`~neuronhunter.runfolder.RunFolder`: a finished run is replaced only with
    ``overwrite``, only if it holds nothing but the tool's files, and stays readable until the new one is complete);
    a resumed run must have the same config as the interrupted one. Returns the folder; write into ``folder.work``."""
    folder = RunFolder(out, kind="selfreport")
    work = folder.begin(overwrite=overwrite, resume=resume)
    cfg_file = work / "config.json"
    if resume and cfg_file.exists():
        old = read_json(cfg_file)
        new = config.model_dump(mode="json")
        old.pop("out", None)
        new.pop("out", None)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"cannot resume {out}: the config differs from the first run's "
                              f"(section {', '.join(changed)}); use --overwrite to start again")
    return folder


def load_selection(out: Path) -> list[NeuronRef]:
    data = read_json(out / "selection.json")
    return [NeuronRef(layer=n["layer"], neuron=n["index"]) for n in data["neurons"]]


def write_selection(out: Path, sel: Selection) -> None:
    write_json(out / "selection.json", clean_json(sel.to_json()))
    write_table(sel.candidates, out / "candidates", formats=("csv",))


# --------------------------------------------------------------------------------------------------- stages
def select_neurons(config: SelfReportConfig, hooked: HookedModel, progress: ProgressFn | None = None) -> Selection:
    """Stage 1 only (what ``neuronhunter selfreport select`` prints)."""
    return NeuronScanner(hooked, config.selection, config.dataset, progress=progress).select()


def _features_at_selected(predictor: ActivationPredictor, split: SplitTensors, batch_size: int) -> np.ndarray:
    feats = predictor.compute_features(split, batch_size)
    return feats[split.selected.to(feats.device)].float().cpu().numpy()


def _predictions_frame(ds: ActivationDataset, split: SplitTensors) -> Any:
    df = ds.split("test")
    df = df[df["selected"]].sort_values(["window_id", "position"]).reset_index(drop=True)
    assert len(df) == split.n_targets
    return df[["doc_id", "window_id", "position", "token_id", "token", "activation", "target"]].copy()


def run_target(config: SelfReportConfig, hooked: HookedModel, ds: ActivationDataset, out: Path, *,
               resume: bool = False, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train and evaluate the predictor of one target neuron; writes ``out`` (the target's folder)."""
    from . import plots

    t0 = time.perf_counter()
    pad = hooked.tokenizer.pad_token_id or 0
    train, val, test = (ds.tensors(s, pad) for s in ("train", "val", "test"))
    pcfg, ecfg = config.predictor, config.evaluation
    train_y = train.target[train.selected].numpy().astype(np.float64)
    codec = TargetCodec.fit(train_y, pcfg.n_classes, pcfg.binning)
    grad_flags = {name: p.requires_grad for name, p in hooked.model.named_parameters()}
    predictor = ActivationPredictor(hooked, ds.neuron, pcfg, codec, seed=config.seed)
    from .trainer import PredictorTrainer

    trainer = PredictorTrainer(predictor, train, val, config.training, out_dir=out, progress=progress,
                               run_name=f"{config.name}-{ds.neuron}", eval_batch_size=ecfg.batch_size)
    snapshot = {k: p.detach().clone() for k, p in trainer.params.items() if k.startswith("model.")}
    timings: dict[str, float] = {}
    try:
        # Frozen-model features for the linear probe, before any weight changes.
        probe_data = None
        if ecfg.probe:
            t = time.perf_counter()
            probe_data = tuple(_features_at_selected(predictor, s, ecfg.batch_size) for s in (train, val, test))
            timings["probe_features_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result = trainer.train(resume=resume)
        timings["train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        report = (lambda done, total: progress("testing", done, total)) if progress else None  # noqa: E731
        preds, test_loss = predictor.predict(test, batch_size=ecfg.batch_size, progress=report)
        test_y = test.target[test.selected].numpy().astype(np.float64)
        frame = _predictions_frame(ds, test)
        frame["pred"] = preds.score
        frame["pred_bin"] = preds.cls
        frame["true_bin"] = codec.classes_np(test_y)
        train_tokens = train.input_ids[train.selected].numpy()
        baselines = {
            "mean": mean_baseline(train_y, len(test_y), codec),
            "token": token_baseline(train_tokens, train_y, test.input_ids[test.selected].numpy(), codec),
        }
        probe_info = None
        if probe_data is not None:
            val_y = val.target[val.selected].numpy().astype(np.float64)
            kind = "regression" if pcfg.head == "regression" else "classification"
            baselines["probe"], probe_info = probe_baseline(probe_data[0], train_y, probe_data[1], val_y,
                                                            probe_data[2], codec, kind=kind,
                                                            alphas=ecfg.probe_alphas, seed=config.seed)
        frame["mean"] = baselines["mean"].score
        frame["token_bag"] = baselines["token"].score
        if "probe" in baselines:
            frame["probe"] = baselines["probe"].score
        metrics = {"predictor": score(test_y, preds.score, preds.cls, codec)}
        metrics.update({name: score(test_y, b.score, b.cls, codec) for name, b in baselines.items()})
        extra: dict[str, Any] = {}
        if preds.free_cls is not None:
            extra["free_accuracy"] = float((preds.free_cls == codec.classes_np(test_y)).mean())
            extra["answered_a_digit"] = float((preds.free_cls >= 0).mean())
        drift = None
        if ecfg.drift:
            after = neuron_activations(hooked, test, ds.neuron.layer, ds.neuron.neuron, batch_size=ecfg.batch_size)
            before = test.activation[test.selected].numpy()
            now = after[test.selected].numpy()
            frame["activation_after"] = now
            drift = activation_drift(before, now)
            cur = current_targets(after, test, config.dataset.target, config.dataset.window)
            drift["predictor_vs_current_target"] = regression_metrics(cur, preds.score)
        timings["evaluate_s"] = time.perf_counter() - t
        _save_predictor(predictor, trainer, out / "predictor.safetensors")
    finally:
        with torch.no_grad():
            for k, v in snapshot.items():
                trainer.params[k].copy_(v)
        for name, p in hooked.model.named_parameters():
            p.requires_grad_(grad_flags[name])
    write_table(frame, out / "predictions", formats=("parquet",))
    report = {
        "neuron": str(ds.neuron), "layer": ds.neuron.layer, "index": ds.neuron.neuron, "site": ds.meta["site"],
        "model": hooked.name,
        "dataset": {"counts": ds.meta["counts"], "target": config.dataset.target,
                    "balanced_train_tokens": ds.meta.get("balanced_train_tokens"),
                    "test_tokens": int(len(test_y)),
                    "test_target": {"mean": float(test_y.mean()), "std": float(test_y.std()),
                                    "max": float(test_y.max()), "min": float(test_y.min())}},
        "predictor": predictor.describe(),
        "unfreeze": config.training.unfreeze,
        "training": result.to_json(),
        "test": {"loss": test_loss, **metrics},
        "predictor_minus_baseline": summarize(metrics),
        "probe": probe_info,
        "token_head": extra or None,
        "drift": drift,
        "timings_s": {k: round(v, 2) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 2)},
    }
    report = clean_json(report)
    write_json(out / "metrics.json", report)
    if ecfg.plots:
        title = f"{hooked.name} {ds.neuron} ({pcfg.head} head, unfreeze {config.training.unfreeze})"
        plots.write_html(plots.scatter_figure(frame, title=f"Self-report of {title}: test tokens",
                                              max_points=ecfg.scatter_max_points, seed=config.seed),
                         out / "scatter.html")
        plots.write_html(plots.trace_figure(frame, title=f"Per-token traces, {title}",
                                            n_windows=ecfg.trace_windows), out / "trace.html")
        plots.write_html(plots.training_figure(result.history, title=f"Training, {title}"), out / "training.html")
    return report


def _save_predictor(predictor: ActivationPredictor, trainer: Any, path: Path) -> None:
    import json

    from safetensors.torch import save_file

    from ..io import atomic_path

    tensors = {k: p.detach().cpu().clone().contiguous() for k, p in trainer.params.items()
               if k.startswith("head.") or p.requires_grad}
    meta = {"predictor": json.dumps(clean_json(predictor.describe())), "neuron": str(predictor.neuron)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def run_selfreport(config: SelfReportConfig, *, out: str | Path | None = None, overwrite: bool = False,
                   resume: bool = False, progress: ProgressFn | None = None,
                   model: HookedModel | None = None, stop_after: str | None = None) -> dict[str, Any]:
    """Run a whole self-report experiment and write its run folder (see the module docstring).

    Args:
        config: the experiment.
        out: the run folder (default ``config.out`` or ``runs/selfreport-<name>``).
        overwrite: replace an existing run in ``out``.
        resume: continue an interrupted run (same config) from its files and checkpoints.
        progress: optional ``(description, done, total)`` callback.
        model: an already loaded model to use instead of loading ``config.model`` (restored afterwards).
        stop_after: ``"select"`` or ``"dataset"`` to stop after that stage.

    Returns:
        The summary written to ``metrics.json`` (or the selection/dataset summary when stopped early).
    """
    t0 = time.perf_counter()
    out_dir = Path(out) if out is not None else config.out_dir
    if stop_after not in (None, "select", "dataset"):
        raise ConfigError(f"stop_after must be 'select' or 'dataset', got {stop_after!r}")
    folder = prepare_run_dir(config, out_dir, overwrite=overwrite, resume=resume)
    final_dir, out_dir = out_dir, folder.work
    if model is None:
        from ..models import load_model

        if progress:
            progress("loading model", 0, 1)
        model = load_model(config.model, device=config.device, dtype=config.dtype)
        if progress:
            progress("loading model", 1, 1)
    hooked = model
    write_json(out_dir / "config.json", config.model_dump(mode="json"))
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}

    # 1. neurons
    t = time.perf_counter()
    if resume and (out_dir / "selection.json").is_file():
        neurons = load_selection(out_dir)
        selection_info = read_json(out_dir / "selection.json")
    else:
        sel = select_neurons(config, hooked, progress)
        write_selection(out_dir, sel)
        neurons, selection_info = sel.neurons, clean_json(sel.to_json())
    timings["select_s"] = time.perf_counter() - t
    if stop_after == "select":
        return {"selection": selection_info, "out": str(out_dir)}  # an interrupted run: --resume continues it

    # 2. datasets
    t = time.perf_counter()
    paths = {n: out_dir / "targets" / n.slug / "dataset.parquet" for n in neurons}
    datasets: dict[NeuronRef, ActivationDataset] = {}
    if resume and all(p.is_file() for p in paths.values()):
        datasets = {n: ActivationDataset.load(p) for n, p in paths.items()}
    else:
        gen = ActivationDatasetGenerator(hooked, config.dataset, batch_size=config.evaluation.batch_size,
                                         progress=progress)
        datasets = gen.generate(neurons, seed=config.seed)
        for n, ds in datasets.items():
            ds.save(paths[n])
    timings["dataset_s"] = time.perf_counter() - t
    if stop_after == "dataset":
        return {"selection": selection_info, "datasets": {str(n): ds.meta["counts"] for n, ds in datasets.items()},
                "out": str(out_dir)}

    # 3-5. per target: train, evaluate, plot
    reports = []
    for n in neurons:
        reports.append(run_target(config, hooked, datasets[n], out_dir / "targets" / n.slug, resume=resume,
                                  progress=progress))
    timings["targets_s"] = time.perf_counter() - t - timings["dataset_s"]
    elapsed = time.perf_counter() - t0
    summary = clean_json({
        "name": config.name, "model": hooked.name, "out": str(final_dir), "selection": selection_info,
        "targets": reports, "elapsed_s": round(elapsed, 2),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    })
    write_json(out_dir / "metrics.json", summary)
    _write_manifest(folder, config, elapsed)
    return summary


def _write_manifest(folder: RunFolder, config: SelfReportConfig, elapsed: float) -> None:
    from .. import __version__

    out = folder.work
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in (MANIFEST, MARKER))
    folder.commit({
        "kind": "selfreport", "command": "selfreport run", "neuronhunter": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "model": config.model, "seed": config.seed,
        "config_sha256": config.fingerprint(), "elapsed_s": round(elapsed, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files,
    })
