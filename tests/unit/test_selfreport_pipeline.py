"""Evaluation metrics and baselines, drift, and the whole pipeline on a tiny model with a planted neuron."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuronhunter.errors import ConfigError, RunDirError
from neuronhunter.models.tiny import tiny_model
from neuronhunter.selfreport import (
    ActivationDataset,
    SelfReportConfig,
    TargetCodec,
    plant_token_neuron,
    run_selfreport,
    write_toy_corpus,
)
from neuronhunter.selfreport.evaluation import (
    activation_drift,
    classification_metrics,
    mean_baseline,
    probe_baseline,
    regression_metrics,
    token_baseline,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


# ------------------------------------------------------------------------------------------------ metrics
def test_regression_metrics():
    y = np.array([0.0, 1.0, 2.0, 3.0])
    m = regression_metrics(y, y)
    assert m["pearson"] == pytest.approx(1) and m["r2"] == pytest.approx(1) and m["mae"] == 0
    m = regression_metrics(y, np.full(4, y.mean()))
    assert np.isnan(m["pearson"]) and m["r2"] == pytest.approx(0.0) and m["mae"] == pytest.approx(1.0)
    m = regression_metrics(y, -y)
    assert m["pearson"] == pytest.approx(-1) and m["spearman"] == pytest.approx(-1) and m["r2"] < 0


def test_classification_metrics():
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0]), 2)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_codec_bins():
    y = np.arange(100.0)
    q = TargetCodec.fit(y, 4)
    assert q.n_classes == 4 and np.bincount(q.classes_np(y)).tolist() == [25, 25, 25, 25]
    u = TargetCodec.fit(np.array([0.0, 0.0, 0.0, 10.0]), 2, "uniform")
    assert u.edges == [5.0] and u.classes_np(np.array([1.0, 9.0])).tolist() == [0, 1]
    assert TargetCodec.from_json(q.to_json()) == q
    assert torch.equal(q.classes(torch.tensor([0.0, 99.0])), torch.tensor([0, 3]))


def test_baselines():
    codec = TargetCodec.fit(np.array([0.0, 0.0, 5.0, 5.0]), 2)
    p = mean_baseline(np.array([0.0, 0.0, 5.0, 5.0]), 3, codec)
    assert np.allclose(p.score, 2.5)
    p = token_baseline(np.array([1, 1, 2, 2]), np.array([0.0, 0.0, 5.0, 5.0]), np.array([2, 1, 9]), codec)
    assert p.score.tolist() == [5.0, 0.0, 2.5]  # unseen token 9 -> the global mean
    assert p.cls[:2].tolist() == [1, 0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = x @ rng.normal(size=8)
    codec = TargetCodec.fit(y[:200], 3)
    p, info = probe_baseline(x[:200], y[:200], x[200:250], y[200:250], x[250:], codec, kind="regression",
                             alphas=[0.01, 1.0])
    assert regression_metrics(y[250:], p.score)["pearson"] > 0.99 and info["type"] == "ridge"
    p, info = probe_baseline(x[:200], y[:200], x[200:250], y[200:250], x[250:], codec, kind="classification",
                             alphas=[1.0])
    assert (p.cls == codec.classes_np(y[250:])).mean() > 0.7 and info["type"] == "logistic"


def test_drift():
    a = np.array([0.0, 1.0, 2.0])
    d = activation_drift(a, a)
    assert d["mean_abs_change"] == 0 and d["pearson_before_after"] == pytest.approx(1.0)
    d = activation_drift(a, a + 1)
    assert d["mean_abs_change"] == 1 and d["relative_change"] == pytest.approx(1 / a.std())


# ------------------------------------------------------------------------------------------------ pipeline
def planted():
    hm = tiny_model("llama", seed=0)
    plant_token_neuron(hm, layer=0, neuron=3, token_ids=[hm.tokenizer.encode(" cat")[0]])
    return hm


def config(corpus, tmp_path, **sections):
    data = {
        "name": "t", "model": "unused-when-a-model-is-passed", "out": str(tmp_path / "run"),
        "selection": {"source": "explicit", "neurons": ["L0.N3"], "scan_tokens": 100},
        "dataset": {"corpus": str(corpus), "max_tokens": 500, "context_length": 24},
        "predictor": {"head": "regression"},
        "training": {"unfreeze": "last_k", "k": 1, "epochs": 2, "batch_size": 2, "lr": 1e-2, "body_lr": 1e-2},
        "evaluation": {"trace_windows": 2},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return SelfReportConfig.model_validate(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("toy"), n_docs=10, words_per_doc=50, rate=0.3)


def test_pipeline_writes_everything_and_beats_the_mean(corpus, tmp_path):
    hm = planted()
    before = {k: v.clone() for k, v in hm.model.state_dict().items()}
    flags = [p.requires_grad for p in hm.model.parameters()]
    summary = run_selfreport(config(corpus, tmp_path), model=hm)
    run = tmp_path / "run"
    for name in ("config.json", "selection.json", "candidates.csv", "metrics.json", "manifest.json"):
        assert (run / name).is_file(), name
    target = run / "targets" / "L0.N3"
    for name in ("dataset.parquet", "predictions.parquet", "metrics.json", "predictor.safetensors",
                 "scatter.html", "trace.html", "training.html", "logs/metrics.csv", "checkpoints/best.safetensors"):
        assert (target / name).is_file(), name
    assert "<script" in (target / "scatter.html").read_text()[:2_000_000]
    report = json.loads((target / "metrics.json").read_text())
    assert summary["targets"][0]["neuron"] == "L0.N3"
    test = report["test"]
    assert set(test) >= {"loss", "predictor", "mean", "token", "probe"}
    assert test["predictor"]["pearson"] > 0.95
    assert test["predictor"]["r2"] > test["mean"]["r2"]
    assert test["mean"]["pearson"] is None  # a constant has no correlation (strict JSON: null)
    assert report["drift"]["mean_abs_change"] == 0.0  # block 0 (the neuron's) was never trained
    ds = ActivationDataset.load(target / "dataset.parquet")
    preds = pd.read_parquet(target / "predictions.parquet")
    assert len(preds) == report["dataset"]["test_tokens"] == int((ds.split("test")["selected"]).sum())
    assert {"pred", "mean", "token_bag", "probe", "activation_after"} <= set(preds.columns)
    # the model is restored after training
    after = hm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in hm.model.parameters()] == flags
    assert not list(run.rglob(".*.tmp"))


def test_unfreezing_the_neurons_layer_makes_it_drift(corpus, tmp_path):
    cfg = config(corpus, tmp_path, training={"unfreeze": "all", "max_steps": 4, "body_lr": 5e-2},
                 evaluation={"probe": False, "plots": False})
    summary = run_selfreport(cfg, model=planted())
    drift = summary["targets"][0]["drift"]
    assert drift["mean_abs_change"] > 0
    assert "predictor_vs_current_target" in drift


def test_run_folder_protection_and_resume(corpus, tmp_path):
    cfg = config(corpus, tmp_path, evaluation={"plots": False, "probe": False})
    first = run_selfreport(cfg, model=planted())
    with pytest.raises(RunDirError, match="already holds a complete run"):
        run_selfreport(cfg, model=planted())
    with pytest.raises(RunDirError, match="nothing to resume"):  # a finished run is not silently redone
        run_selfreport(cfg, model=planted(), resume=True)
    other = config(corpus, tmp_path, training={"epochs": 3}, evaluation={"plots": False, "probe": False})
    run_selfreport(other, model=planted(), overwrite=True, stop_after="select")  # an interrupted replacement
    assert (tmp_path / "run" / "metrics.json").is_file()  # the finished run is still there, untouched
    with pytest.raises(ConfigError, match="differs"):
        run_selfreport(cfg, model=planted(), resume=True)
    again = run_selfreport(other, model=planted(), resume=True)
    assert again["targets"][0]["test"] != first["targets"][0]["test"]  # 3 epochs instead of the first run's


def test_stop_after_dataset_then_resume(corpus, tmp_path):
    cfg = config(corpus, tmp_path, predictor={"head": "classification", "n_classes": 2, "binning": "uniform"},
                 evaluation={"plots": False})
    out = run_selfreport(cfg, model=planted(), stop_after="dataset")
    assert (tmp_path / ".run.partial" / "targets" / "L0.N3" / "dataset.parquet").is_file()
    assert not (tmp_path / "run").exists()  # not complete: it stays in the working folder
    assert "L0.N3" in out["datasets"]
    summary = run_selfreport(cfg, model=planted(), resume=True)
    assert (tmp_path / "run" / "manifest.json").is_file() and not (tmp_path / ".run.partial").exists()
    test = summary["targets"][0]["test"]
    assert test["predictor"]["accuracy"] > 0.95
    assert test["probe"]["accuracy"] is not None


def test_token_head_pipeline_reports_free_answers(corpus, tmp_path):
    cfg = config(corpus, tmp_path, predictor={"head": "token", "n_classes": 2, "binning": "uniform", "prompt": ""},
                 dataset={"balance": True, "balance_quantile": 0.7},
                 training={"batch_size": 8, "body_lr": 5e-2, "max_steps": 6},
                 evaluation={"plots": False})
    summary = run_selfreport(cfg, model=planted())
    report = summary["targets"][0]
    assert report["predictor"]["head"] == "token" and report["predictor"]["head_parameters"] == 0
    assert 0.0 <= report["token_head"]["answered_a_digit"] <= 1.0
    assert report["dataset"]["balanced_train_tokens"] < report["dataset"]["counts"]["train"]["tokens"]
    assert report["test"]["probe"]["accuracy"] is not None
