"""Activation patching sweep: exact ground truth at layer 0, agreement with a hand-made patch, bad input."""

from __future__ import annotations

import pytest
import torch

from neuronhunter.causal.interventions import capture_sources, patch, run_with_interventions
from neuronhunter.causal.patching import answer_token, logit_diff, patching_frame, patching_sweep
from neuronhunter.errors import ConfigError, SiteError
from neuronhunter.models import Site
from neuronhunter.models.tiny import tiny_model

CLEAN, CORRUPTED = "The cat sat on the mat", "The dog sat on the mat"


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=11)


@pytest.fixture(scope="module")
def result(model):
    return patching_sweep(model, CLEAN, CORRUPTED, " mat", " rug", batch_size=3)


def test_layer0_residual_patch_is_exact(model, result):
    # the prompts differ only at position 2 (' cat' vs ' dog'): the layer-0 residual there carries everything
    assert result.resid.shape == (model.n_layers, 7)
    assert result.clean_tokens[2] == " cat" and result.corrupted_tokens[2] == " dog"
    torch.testing.assert_close(result.resid[0, 2], torch.tensor(1.0), atol=1e-4, rtol=0)
    others = [p for p in range(7) if p != 2]
    assert float(result.resid[0, others].abs().max()) < 1e-4
    # positions before the difference carry nothing at any layer (causal attention)
    assert float(result.resid[:, :2].abs().max()) < 1e-4


def test_head_sweep_matches_a_hand_patch(model, result):
    assert result.heads is not None and result.heads.shape == (model.n_layers, model.n_heads)
    c_ids, x_ids = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    z = Site(1, "attn.hook_z")
    src = capture_sources(model, c_ids, None, [z])
    logits = run_with_interventions(model, x_ids, None, {z: patch(src[z], units=[2])})
    a, w = answer_token(model, " mat"), answer_token(model, " rug")
    raw = float(logit_diff(logits, a, w)[0])
    assert raw == pytest.approx(float(result.heads_raw[1, 2]), abs=1e-4)
    expected = (raw - result.corrupted_metric) / (result.clean_metric - result.corrupted_metric)
    assert float(result.heads[1, 2]) == pytest.approx(expected, abs=1e-4)
    df = patching_frame(result)
    assert set(df.kind) == {"resid", "head"}
    assert len(df) == model.n_layers * (7 + model.n_heads)


def test_layers_subset_and_figure(model):
    res = patching_sweep(model, CLEAN, CORRUPTED, " mat", " rug", layers=[1], heads=False)
    assert res.resid.shape == (1, 7) and res.heads is None and res.layers == [1]
    from neuronhunter.report.figures_verify import patching_figure

    fig = patching_figure(res)
    assert len(fig.data) == 1


def test_bad_inputs(model):
    with pytest.raises(ConfigError, match="same number of tokens"):
        patching_sweep(model, CLEAN, "The big dog sat on the mat", " mat", " rug")
    with pytest.raises(ConfigError, match="single token"):
        patching_sweep(model, CLEAN, CORRUPTED, " matterhorn mountain", " rug")
    with pytest.raises(SiteError, match="layer 9 is out of range"):
        patching_sweep(model, CLEAN, CORRUPTED, " mat", " rug", layers=[9])
    with pytest.raises(ConfigError, match="out of range"):
        answer_token(model, 10**7)
