"""Toy Models of Superposition: data, training determinism, the paper checks on planted weights, reduced runs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from neuronhunter.errors import ConfigError, RunDirError
from neuronhunter.toy import TMSConfig, run_tms, train_tms
from neuronhunter.toy.tms import (
    check_dense,
    check_dimensionality,
    check_pentagon,
    feature_metrics,
    forward,
    sample_batch,
)


def test_sample_batch_sparsity_and_values():
    g = torch.Generator().manual_seed(0)
    x = sample_batch(torch.tensor([0.0, 0.9, 0.99]), 20_000, 5, g)
    assert x.shape == (3, 20_000, 5)
    zero = (x == 0).float().mean(dim=(1, 2))
    assert zero.tolist() == pytest.approx([0.0, 0.9, 0.99], abs=0.01)
    nz = x[x > 0]
    assert nz.max() < 1.0 and float(nz.mean()) == pytest.approx(0.5, abs=0.02)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        sample_batch(torch.tensor([0.5]), 8, 4, g1), sample_batch(torch.tensor([0.5]), 8, 4, g2)
    )


def test_forward_is_relu_of_wtw_x_plus_b():
    W = torch.tensor([[[1.0, 0.5, -1.0], [0.0, 1.0, 0.5]]])  # [1, m=2, n=3]
    b = torch.tensor([[0.1, -0.2, 0.0]])
    x = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]]])  # [1, batch=2, n=3]
    expected = torch.relu(x[0] @ (W[0].T @ W[0]).T + b[0])
    assert torch.allclose(forward(W, b, x)[0], expected)


def test_training_is_deterministic_and_keeps_the_best_restart():
    cfg = TMSConfig(
        n_features=5,
        n_hidden=2,
        sparsities=[0.0, 0.9],
        replicates=2,
        restarts=3,
        steps=30,
        batch_size=64,
        eval_samples=512,
    )
    a, b = train_tms(cfg), train_tms(cfg)
    assert torch.equal(a["W"], b["W"]) and torch.equal(a["candidates"]["W"], b["candidates"]["W"])
    assert a["W"].shape == (4, 2, 5) and a["candidates"]["W"].shape == (12, 2, 5)
    losses = a["candidates"]["loss"].view(4, 3)
    assert torch.equal(a["candidates"]["chosen"], torch.arange(4) * 3 + losses.argmin(1))
    assert torch.equal(a["loss"], losses.min(1).values)
    assert a["sparsity"] == [0.0, 0.0, 0.9, 0.9] and a["replicate"] == [0, 1, 0, 1]
    c = train_tms(cfg.model_copy(update={"seed": 1}))
    assert not torch.equal(a["W"], c["W"])


def test_dense_features_keep_the_two_most_important_orthogonally():
    cfg = TMSConfig(
        n_features=5,
        n_hidden=2,
        importance_decay=0.7,
        sparsities=[0.0],
        replicates=2,
        steps=4000,
        batch_size=256,
        lr=1e-2,
    )
    result = train_tms(cfg)
    metrics = feature_metrics(result["W"])
    check = check_dense(result, metrics, cfg)
    assert check["verdict"] == "yes", check
    assert metrics["norm"][:, :2].min() > 0.9 and metrics["norm"][:, 2:].max() < 0.2


def _pentagon() -> torch.Tensor:
    th = torch.arange(5, dtype=torch.float32) * 2 * math.pi / 5
    return 1.1 * torch.stack([torch.cos(th), torch.sin(th)])


def _planted(W: torch.Tensor, sparsity: list[float]) -> dict:
    return {
        "W": W,
        "sparsity": sparsity,
        "replicate": [0] * len(sparsity),
        "loss": torch.zeros(len(sparsity)),
    }


def test_pentagon_check_on_planted_weights():
    square = torch.tensor([[1.0, 0.0, -1.0, 0.0, 0.01], [0.0, 1.0, 0.0, -1.0, 0.0]])
    skewed = _pentagon().clone()
    skewed[:, 1] = torch.tensor(
        [math.cos(math.radians(50)), math.sin(math.radians(50))]
    )  # 50° instead of 72°
    W = torch.stack([_pentagon()[:, [2, 0, 4, 1, 3]], square, skewed, _pentagon()])
    cfg = TMSConfig(n_features=5, n_hidden=2)
    result = _planted(W, [0.9, 0.95, 0.99, 0.5])
    check = check_pentagon(result, feature_metrics(W), cfg)
    assert check["n_checked"] == 3  # S = 0.5 is not checked
    assert [r["pentagon"] for r in check["instances"]] == [True, False, False]
    assert check["instances"][0]["neighbour_angles"] == pytest.approx([72.0] * 5, abs=1e-3)
    assert check["instances"][0]["dimensionality"] == pytest.approx([0.4] * 5, abs=1e-4)
    assert check["instances"][1]["neighbour_angles"] == pytest.approx([90.0] * 4, abs=1e-3)
    assert check["n_pentagon"] == 1 and check["verdict"] == "no"
    assert check["pentagon_norm_range"] == pytest.approx([1.1, 1.1], abs=1e-4)
    assert check_pentagon(result, feature_metrics(W), TMSConfig(n_features=6, n_hidden=2)) is None


def test_dense_check_on_planted_weights():
    good = torch.tensor([[1.0, 0.0, 0.01, 0.0, 0.0], [0.0, 1.0, 0.0, 0.02, 0.0]])
    wrong_features = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    not_orthogonal = torch.tensor([[1.0, 0.7, 0.0, 0.0, 0.0], [0.0, 0.7, 0.0, 0.0, 0.0]])
    W = torch.stack([good, wrong_features, not_orthogonal])
    cfg = TMSConfig(n_features=5, n_hidden=2)
    check = check_dense(_planted(W, [0.0, 0.0, 0.0]), feature_metrics(W), cfg)
    rows = check["instances"]
    assert [r["passed"] for r in rows] == [True, False, False]
    assert rows[1]["kept_features"] == [0, 2] and not rows[1]["keeps_top_m"]
    assert rows[2]["keeps_top_m"] and not rows[2]["orthogonal"]
    assert rows[2]["top_m_pairwise_angles"] == pytest.approx([45.0], abs=1e-3)
    assert check["verdict"] == "1/3"


def test_dimensionality_check_counts_fractions():
    df = pd.DataFrame(
        {
            "sparsity": [0.9] * 6 + [0.0],
            "norm": [1.0, 1.0, 1.0, 1.0, 0.1, 1.0, 1.0],
            "dimensionality": [
                0.5,
                0.41,
                0.999,
                0.6,
                0.4,
                0.376,
                1.0,
            ],  # 0.41: 2/5 (window narrowed to 0.0125)
        }
    )
    check = check_dimensionality(df, TMSConfig(dim_tolerance=0.02))
    # S = 0 and the short feature are excluded; 0.6 is not near any fraction
    assert check["n_represented"] == 5
    assert check["counts_near_fraction"] == {"1": 1, "3/4": 0, "2/3": 0, "1/2": 1, "2/5": 1, "3/8": 1}
    assert check["share_near_fraction"] == pytest.approx(4 / 5)
    assert check["other_values"] == [0.6]
    # windows: ±0.02 for 1 (clipped at 1), 3/4, 2/3, 1/2; ±0.0125 for 2/5 and 3/8 -> (0.02 + 3 * 0.04 + 2 * 0.025) / 0.8
    assert check["share_expected_if_uniform_0.2_1"] == pytest.approx(0.19 / 0.8)
    assert check["windows"]["2/5"] == pytest.approx(0.0125) and check["windows"]["1/2"] == pytest.approx(0.02)
    # values are claimed by the nearest fraction only: 0.388 and 0.39 are 2/5, 0.386 is 3/8
    df2 = pd.DataFrame({"sparsity": [0.9] * 3, "norm": [1.0] * 3, "dimensionality": [0.388, 0.39, 0.386]})
    counts = check_dimensionality(df2, TMSConfig())["counts_near_fraction"]
    assert (counts["2/5"], counts["3/8"]) == (2, 1)


def test_presets_and_config_errors(tmp_path):
    cfg = TMSConfig.from_preset("twenty-in-five")
    assert (cfg.n_features, cfg.n_hidden, cfg.importance_decay) == (20, 5, 0.7)
    assert cfg.sparsities[0] == 0.0 and cfg.sparsities[-1] == 0.999
    assert cfg.run_dir().as_posix() == "runs/toy-tms-twenty-in-five"
    assert TMSConfig.from_preset("five-in-two", steps=None).steps == 10_000
    with pytest.raises(ConfigError):
        TMSConfig.from_preset("three-in-one")
    with pytest.raises(ValueError):
        TMSConfig(n_features=3, n_hidden=3)
    with pytest.raises(ValueError):
        TMSConfig(sparsities=[1.0])
    with pytest.raises(ValueError):
        TMSConfig(bogus=1)


def test_end_to_end_reduced_five_in_two(tmp_path):
    out = tmp_path / "tms"
    cfg = TMSConfig.from_preset(
        "five-in-two",
        out=out,
        steps=200,
        batch_size=128,
        replicates=1,
        restarts=2,
        sparsities=[0.0, 0.9],
        eval_samples=1024,
    )
    summary = run_tms(cfg)
    for name in (
        "features.csv",
        "instances.csv",
        "weights.safetensors",
        "config.json",
        "summary.json",
        "manifest.json",
        "plots/feature_directions.png",
        "plots/norms_interference.png",
        "plots/dims_per_feature.png",
        "plots/dimensionality_hist.png",
    ):
        assert (out / name).is_file(), name
    features = pd.read_csv(out / "features.csv")
    assert list(features.columns[:7]) == [
        "instance",
        "sparsity",
        "feature",
        "importance",
        "norm",
        "interference",
        "dimensionality",
    ]
    assert len(features) == 2 * 5
    assert features.importance.tolist()[:5] == pytest.approx([0.9**i for i in range(5)])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert {"dense", "pentagon", "dimensionality"} <= set(on_disk["checks"])
    assert on_disk["checks"]["pentagon"]["n_checked"] == 1
    assert set(on_disk["per_sparsity"]) == {"0", "0.9"}
    with pytest.raises(RunDirError):
        run_tms(cfg)


def test_end_to_end_reduced_twenty_in_five(tmp_path):
    cfg = TMSConfig.from_preset(
        "twenty-in-five",
        out=tmp_path / "t",
        steps=50,
        batch_size=64,
        replicates=1,
        sparsities=[0.0, 0.99],
        plots=False,
        eval_samples=256,
    )
    summary = run_tms(cfg)
    features = pd.read_csv(tmp_path / "t/features.csv")
    assert len(features) == 2 * 20 and features.angle_deg.isna().all()
    assert "pentagon" not in summary["checks"]
    assert not (tmp_path / "t/plots/feature_directions.png").exists()
