"""Toy metrics against hand-computed cases: CRS/entropy/angles of planted neurons, TMS dimensionality, the tests."""

from __future__ import annotations

import math

import pytest
import torch

from neuronhunter.toy.hypotheses import betainc, judge, one_sample_t, sign_test, student_t_sf, welch_t
from neuronhunter.toy.lines import LinesData
from neuronhunter.toy.monopoly import LineMLP, neuron_metrics
from neuronhunter.toy.tms import feature_metrics, nearest_fraction, neighbour_angles

# ------------------------------------------------------------------------------------------- planted neurons


def _four_lines() -> LinesData:
    """Vertical red, horizontal red, vertical blue, horizontal blue; thickness 1, full length, column 5 / row 7."""
    images = torch.zeros(4, 3, 32, 32)
    images[0, 0, :, 5] = 1  # V red
    images[1, 0, 7, :] = 1  # H red
    images[2, 2, :, 5] = 1  # V blue
    images[3, 2, 7, :] = 1  # H blue
    o = torch.tensor([0, 1, 0, 1])
    c = torch.tensor([0, 0, 1, 1])
    ones = torch.ones(4, dtype=torch.long)
    return LinesData(images, o, c, ones, 32 * ones, torch.tensor([5, 7, 5, 7]), 0 * ones)


def _planted_model() -> LineMLP:
    model = LineMLP(hidden=3)
    w = torch.zeros(3, 3, 32, 32)
    b = torch.zeros(3)
    w[0, 0] = 1.0  # n0: sums the red channel -> a pure "red" neuron
    w[1] = -1.0  # n1: all weights -1, bias -1 -> never fires (dead)
    b[1] = -1.0
    w[2, 0, :, 5] = 1.0  # n2: red pixels of column 5, bias -20 -> fires only for the vertical red line
    b[2] = -20.0
    with torch.no_grad():
        model.fc1.weight.copy_(w.reshape(3, -1))
        model.fc1.bias.copy_(b)
    return model


def test_crs_verdicts_of_planted_neurons():
    m = neuron_metrics(_planted_model(), _four_lines(), poly_threshold=0.3)
    # n0 responds 32 to both red lines: r = (V, H, red, blue) = (16, 16, 32, 0)
    assert m["responses"][0].tolist() == pytest.approx([16.0, 16.0, 32.0, 0.0])
    assert float(m["crs"][0]) == pytest.approx((32 - 16) / 32)
    assert float(m["crs_orientation"][0]) == pytest.approx(0.0)
    assert float(m["crs_color"][0]) == pytest.approx(1.0)
    assert (m["verdict"][0], m["verdict_orientation"][0], m["verdict_color"][0]) == ("mono", "poly", "mono")
    # n1 never fires: dead everywhere, not "polysemantic"
    assert not bool(m["alive"][1])
    assert (m["verdict"][1], m["verdict_orientation"][1], m["verdict_color"][1]) == ("dead", "dead", "dead")
    # n2 is a vertical-AND-red conjunction: 32 - 20 = 12 on image 0 only -> r = (6, 0, 6, 0), CRS 0
    assert m["responses"][2].tolist() == pytest.approx([6.0, 0.0, 6.0, 0.0])
    assert float(m["crs"][2]) == pytest.approx(0.0)
    assert float(m["crs_orientation"][2]) == pytest.approx(1.0)
    assert float(m["crs_color"][2]) == pytest.approx(1.0)
    assert m["verdict"][2] == "poly"


def test_weight_entropy_norm_and_angles_of_planted_neurons():
    m = neuron_metrics(_planted_model(), _four_lines())
    # uniform |w| over k inputs -> entropy ln k
    assert m["weight_entropy"].tolist() == pytest.approx([math.log(1024), math.log(3072), math.log(32)])
    assert m["l2_norm"].tolist() == pytest.approx([32.0, math.sqrt(3072), math.sqrt(32)], rel=1e-6)
    a01 = math.degrees(math.acos(-1024 / (32 * math.sqrt(3072))))  # red channel vs all -1
    a02 = math.degrees(math.acos(32 / (32 * math.sqrt(32))))  # red channel vs one red column
    a12 = math.degrees(math.acos(-32 / (math.sqrt(3072) * math.sqrt(32))))
    assert a01 == pytest.approx(125.264, abs=1e-3) and a02 == pytest.approx(79.818, abs=1e-3)
    assert m["mean_pairwise_angle"] == pytest.approx((a01 + a02 + a12) / 3, abs=1e-4)
    assert m["mean_angle"].tolist() == pytest.approx(
        [(a01 + a02) / 2, (a01 + a12) / 2, (a02 + a12) / 2], abs=1e-4
    )
    # over alive neurons only (n0, n2)
    assert m["mean_pairwise_angle_alive"] == pytest.approx(a02, abs=1e-4)


# ------------------------------------------------------------------------------------------------------- TMS


def _pentagon(radius: float = 1.0) -> torch.Tensor:
    th = torch.arange(5, dtype=torch.float64) * 2 * math.pi / 5
    return radius * torch.stack([torch.cos(th), torch.sin(th)])  # [2, 5]


def test_feature_metrics_pentagon():
    out = feature_metrics(_pentagon(1.2))
    # D_i = 1 / (1 + 2 cos²72° + 2 cos²144°) = 1 / 2.5
    assert out["dimensionality"].tolist() == pytest.approx([0.4] * 5)
    assert out["norm"].tolist() == pytest.approx([1.2] * 5)
    # interference = |W|² (2 cos²72° + 2 cos²144°) = 1.44 * 1.5
    assert out["interference"].tolist() == pytest.approx([1.44 * 1.5] * 5)
    assert float(out["dims_per_feature"]) == pytest.approx(2 / (5 * 1.44))


def test_feature_metrics_hand_cases():
    # orthogonal pair plus a dropped feature
    out = feature_metrics(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert out["dimensionality"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert out["interference"].tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert float(out["dims_per_feature"]) == pytest.approx(1.0)
    # antipodal pair in one dimension
    out = feature_metrics(torch.tensor([[1.0, -1.0]]))
    assert out["dimensionality"].tolist() == pytest.approx([0.5, 0.5])
    assert out["interference"].tolist() == pytest.approx([1.0, 1.0])
    # asymmetric: W1 = (1, 0), W2 = (1, 1)
    #   D1 = 1 / (1 + (Ŵ1·W2)²) = 1/2, interference1 = 1
    #   D2 = 2 / (2 + (Ŵ2·W1)²) = 2 / 2.5 = 0.8, interference2 = 1/2;  m/|W|_F² = 2/3
    out = feature_metrics(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert out["dimensionality"].tolist() == pytest.approx([0.5, 0.8])
    assert out["interference"].tolist() == pytest.approx([1.0, 0.5])
    assert float(out["dims_per_feature"]) == pytest.approx(2 / 3)
    # batched over instances
    batch = torch.stack([_pentagon(), torch.cat([_pentagon()[:, :2], torch.zeros(2, 3)], 1)])
    out = feature_metrics(batch)
    assert out["dimensionality"].shape == (2, 5)
    assert out["dimensionality"][1, 2:].tolist() == [0.0, 0.0, 0.0]


def test_neighbour_angles_and_fractions():
    w = _pentagon()[:, [3, 0, 4, 1, 2]]
    gaps, order = neighbour_angles(w)
    assert gaps == pytest.approx([72.0] * 5)
    assert sum(gaps) == pytest.approx(360.0)
    assert sorted(order) == [0, 1, 2, 3, 4]
    w = torch.tensor([[1.0, 0.0, -1.0, 0.1], [0.0, 1.0, 0.0, 0.0]])  # feature 3 is too short to count
    gaps, order = neighbour_angles(w, norm_threshold=0.5)
    assert gaps == pytest.approx([90.0, 90.0, 180.0]) and order == [0, 1, 2]
    assert nearest_fraction(0.41) == ("2/5", pytest.approx(0.01))
    assert nearest_fraction(0.98)[0] == "1"


# ---------------------------------------------------------------------------------------------- statistics


def test_student_t_against_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 10.0):
        assert student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert student_t_sf(2.7764451, 4) == pytest.approx(0.025, abs=1e-6)  # the familiar two-sided 5% point
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-4)


def test_tests_and_judge():
    r = one_sample_t([1.0, 2.0, 3.0, 4.0, 5.0], "greater")
    assert r["t"] == pytest.approx(3 / (math.sqrt(2.5) / math.sqrt(5)))
    assert r["df"] == 4
    assert one_sample_t([1.0, 2.0, 3.0, 4.0, 5.0], "less")["p"] == pytest.approx(1 - r["p"])
    assert sign_test([0.1, 0.2, 0.3, 0.4, 0.5])["p"] == pytest.approx(1 / 32)
    assert sign_test([0.1, -0.2, 0.3, 0.4, 0.5])["p"] == pytest.approx(6 / 32)
    w = welch_t([1.0, 2.0, 3.0], [1.0, 1.5, 2.0, 2.5], "greater")
    # means 2 and 1.75, variances 1 and 5/12: t = 0.25 / sqrt(1/3 + 5/48)
    assert w["t"] == pytest.approx(0.25 / math.sqrt(1 / 3 + 5 / 48))

    ok = judge([0.5, 0.6, 0.4, 0.55, 0.45], "greater")
    assert ok["verdict"] == "supported" and ok["n_seeds"] == 5 and ok["mean"] == pytest.approx(0.5)
    wrong_way = judge([-0.5, -0.6, -0.4, -0.55, -0.45], "greater")
    assert wrong_way["verdict"] == "not supported" and "direction" in wrong_way["reason"]
    noisy = judge([1.0, -0.9, 0.2, -0.1, 0.1], "greater")
    assert noisy["verdict"] == "not supported" and noisy["p"] > 0.05
    too_few = judge([1.0, float("nan"), 2.0], "greater")
    assert too_few["verdict"] == "not supported" and too_few["n_seeds"] == 2
    assert judge([-1.0, -2.0, -1.5], "less")["verdict"] == "supported"
