"""Mono-to-poly experiment: determinism, the hypothesis logic, and a fast end-to-end run at reduced size."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from neuronhunter.errors import RunDirError
from neuronhunter.toy import MonopolyConfig, run_monopoly
from neuronhunter.toy.lines import make_lines
from neuronhunter.toy.monopoly import evaluate_hypotheses, load_checkpoint, make_model, train_phase

SMALL = dict(n_train=160, n_test=64, hidden=4, epochs_phase1=2, epochs_phase2=2, batch_size=32, png_samples=2)


def test_make_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(2)
    torch.manual_seed(123)
    a, b, c = make_model(10, seed=1), make_model(10, seed=1), make_model(10, seed=2)
    assert torch.equal(torch.rand(2), before)
    assert torch.equal(a.fc1.weight, b.fc1.weight) and torch.equal(a.fc2.bias, b.fc2.bias)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    assert a.fc1.weight.shape == (10, 3072) and a.fc2.weight.shape == (2, 10)


def test_phase_one_learns_orientation_and_training_is_deterministic():
    config = MonopolyConfig(n_train=600, n_test=200, hidden=6, epochs_phase1=3, batch_size=16, lr=3e-3)
    train, test = make_lines(600, 0, noise=0.0), make_lines(200, 1, noise=0.0)
    runs = []
    for _ in range(2):
        model = make_model(6, seed=0)
        hist, neurons, _ = train_phase(model, train, test, phase=1, seed=0, config=config)
        runs.append((model, hist, neurons))
    (m1, h1, n1), (m2, h2, n2) = runs
    assert torch.equal(m1.fc1.weight, m2.fc1.weight)
    assert h1 == h2 and n1 == n2
    assert [r["epoch"] for r in h1] == [0, 1, 2, 3]
    assert len(n1) == 4 * 6
    assert h1[0]["test_acc"] < 0.65 and h1[-1]["test_acc"] > 0.8  # orientation is learned from chance level


def _fake_final(entropy, norms, verdicts, angle):
    return {
        "weight_entropy": torch.tensor(entropy, dtype=torch.float64),
        "l2_norm": torch.tensor(norms, dtype=torch.float64),
        "verdict": verdicts,
        "mean_pairwise_angle": angle,
    }


def test_hypothesis_logic_on_planted_numbers():
    per_seed = []
    for s in range(5):
        e = 0.01 * s
        per_seed.append(
            {
                "seed": s,
                # phase-1 end: poly entropy 2.0 > mono 1.0; the dead neuron (entropy 9, norm 9) must be ignored
                "final_phase1": _fake_final(
                    [2.0 + e, 1.0, 1.0, 9.0], [1.0, 3.0, 3.0, 9.0], ["poly", "mono", "mono", "dead"], 90.0 + s
                ),
                # phase-2 end: everything alive is poly (no within-phase comparison possible)
                "final_phase2": _fake_final(
                    [5.0, 5.0, 5.0, 9.0],
                    [9.0, 9.0, 9.0, 9.0],
                    ["poly", "poly", "poly", "dead"],
                    85.0 + s - 0.1 * s,
                ),
            }
        )
    h = evaluate_hypotheses(per_seed, alpha=0.05)
    # H1 (stratified): only phase-1 ends count: poly - mono = 1 + e per seed
    assert [p["diff"] for p in h["H1"]["per_seed"]] == pytest.approx([1.0, 1.01, 1.02, 1.03, 1.04])
    assert h["H1"]["verdict"] == "supported"
    assert h["H1"]["alternatives"]["phase2_end"]["n_seeds"] == 0
    # H2: poly norm 1 < mono norm 3 within phase 1 -> not supported, although pooling the phases says otherwise
    assert h["H2"]["mean"] == pytest.approx(-2.0)
    assert h["H2"]["verdict"] == "not supported"
    pooled = h["H2"]["alternatives"]["pooled"]
    assert pooled["mean"] == pytest.approx((9 * 3 + 1) / 4 - 3.0) and pooled["verdict"] == "supported"
    # H3: angle drops by 5 + 0.1 s degrees
    assert [p["diff"] for p in h["H3"]["per_seed"]] == pytest.approx([-5.0, -5.1, -5.2, -5.3, -5.4])
    assert h["H3"]["verdict"] == "supported"


def test_end_to_end_reduced_run_writes_every_file(tmp_path):
    out = tmp_path / "mp"
    config = MonopolyConfig(out=out, seeds=3, **SMALL)
    summary = run_monopoly(config)
    expected = [
        "config.json",
        "summary.json",
        "manifest.json",
        "metrics/crs_phase1.csv",
        "metrics/crs_phase2.csv",
        "metrics/training_history.csv",
        "plots/phase1_samples.png",
        "plots/phase2_samples.png",
        "plots/phase1_weights.png",
        "plots/phase2_weights.png",
        "plots/metrics_training.png",
        "plots/metrics_selectivity.png",
        "plots/metrics_weights.png",
        "plots/metrics_hypotheses.png",
        "samples/train_0000_",
    ]
    for seed in (0, 1, 2):
        expected += [
            f"checkpoints/phase1/seed{seed}.safetensors",
            f"checkpoints/phase2/seed{seed}.safetensors",
        ]
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    for name in expected:
        assert any(f.startswith(name) for f in files), name
    assert not any(f.endswith(".tmp") for f in files)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("H1", "H2", "H3"):
        h = on_disk["hypotheses"][key]
        assert h["verdict"] in ("supported", "not supported")
        assert {"statement", "mean", "std", "p", "sign_p", "n_seeds", "per_seed", "reason"} <= set(h)
        assert len(h["per_seed"]) == 3
    assert on_disk["seeds"] == [0, 1, 2]

    crs1 = pd.read_csv(out / "metrics/crs_phase1.csv")
    assert len(crs1) == 3 * (2 + 1) * 4  # seeds x (epochs + epoch 0) x neurons
    assert {
        "r_vertical",
        "r_horizontal",
        "r_red",
        "r_blue",
        "crs",
        "crs_orientation",
        "crs_color",
        "verdict",
        "verdict_orientation",
        "verdict_color",
        "weight_entropy",
        "l2_norm",
        "alive",
    } <= set(crs1.columns)
    assert set(crs1.verdict) <= {"mono", "poly", "dead"}
    assert crs1.crs.between(0, 1).all()
    hist = pd.read_csv(out / "metrics/training_history.csv")
    assert len(hist) == 3 * (3 + 3)
    assert {"train_loss", "test_loss", "train_acc", "test_acc", "mean_pairwise_angle"} <= set(hist.columns)
    assert set(hist[hist.phase == 2].task) == {"xor"}

    # the phase-2 checkpoint reproduces the last recorded weight norms
    model = load_checkpoint(out / "checkpoints/phase2/seed1.safetensors")
    crs2 = pd.read_csv(out / "metrics/crs_phase2.csv")
    last = crs2[(crs2.seed == 1) & (crs2.epoch == 2)].sort_values("neuron")
    assert model.fc1.weight.norm(dim=1).tolist() == pytest.approx(last.l2_norm.tolist(), rel=1e-5)

    with pytest.raises(RunDirError):
        run_monopoly(config)  # refuses to overwrite a finished run


def test_same_seed_gives_identical_results(tmp_path):
    from safetensors.torch import load_file

    kw = dict(SMALL, seeds=1, plots=False, png_samples=0)
    run_monopoly(MonopolyConfig(out=tmp_path / "a", **kw))
    run_monopoly(MonopolyConfig(out=tmp_path / "b", **kw))
    for phase in (1, 2):
        a = load_file(tmp_path / f"a/checkpoints/phase{phase}/seed0.safetensors")
        b = load_file(tmp_path / f"b/checkpoints/phase{phase}/seed0.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("training_history", "crs_phase1", "crs_phase2"):
        assert (tmp_path / f"a/metrics/{name}.csv").read_bytes() == (
            tmp_path / f"b/metrics/{name}.csv"
        ).read_bytes()
