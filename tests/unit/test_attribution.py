"""Direct logit attribution checked by hand for tied and untied embeddings, RMSNorm and LayerNorm."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from neuronhunter.analysis.attribution import (
    LOGITS_COLUMNS,
    direct_logit_weights,
    logits_table,
    top_logit_tokens,
    write_logits,
)
from neuronhunter.errors import RunDirError, SiteError
from neuronhunter.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


@pytest.fixture(scope="module")
def llama():
    """Tied embeddings, RMSNorm with a non-trivial weight."""
    m = tiny_model("llama", seed=5)
    with torch.no_grad():
        m.final_norm().weight.copy_(torch.linspace(0.5, 2.0, m.d_model))
    assert m.tied_embeddings
    return m


@pytest.fixture(scope="module")
def gpt2_untied():
    """Untied embeddings (a separate lm_head), LayerNorm with a non-trivial weight."""
    m = tiny_model("gpt2", seed=6)
    hf = m.model
    with torch.no_grad():
        hf.lm_head.weight = nn.Parameter(hf.transformer.wte.weight.detach().clone() + 0.05 * torch.randn_like(hf.transformer.wte.weight))
        hf.transformer.ln_f.weight.copy_(torch.linspace(2.0, 0.5, m.d_model))
        hf.transformer.ln_f.bias.fill_(0.3)
    assert not m.tied_embeddings
    return m


def test_tied_llama_equals_hand_computation(llama):
    hf = llama.model
    down = hf.model.layers[1].mlp.down_proj.weight  # [d_model, d_mlp]
    w_u = hf.model.embed_tokens.weight.T  # tied: the input embedding is the unembedding
    neurons = [0, 17, 127]
    raw = direct_logit_weights(llama, 1, neurons, through_norm=False)
    hand = torch.stack([down[:, n] @ w_u for n in neurons])
    torch.testing.assert_close(raw, hand, atol=1e-6, rtol=1e-5)
    normed = direct_logit_weights(llama, 1, neurons)
    g = hf.model.norm.weight
    torch.testing.assert_close(normed, torch.stack([(down[:, n] * g) @ w_u for n in neurons]), atol=1e-6, rtol=1e-5)


def test_untied_gpt2_equals_hand_computation(gpt2_untied):
    hf = gpt2_untied.model
    c_proj = hf.transformer.h[0].mlp.c_proj.weight  # Conv1D: [d_mlp, d_model]
    w_u = hf.lm_head.weight.T  # untied
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    raw = direct_logit_weights(gpt2_untied, 0, [3, 4], through_norm=False)
    torch.testing.assert_close(raw, torch.stack([c_proj[n] @ w_u for n in (3, 4)]), atol=1e-6, rtol=1e-5)
    # LayerNorm: centring is exact, the weight is applied, 1/std and the bias are dropped (documented)
    g = hf.transformer.ln_f.weight
    hand = torch.stack([((c_proj[n] - c_proj[n].mean()) * g) @ w_u for n in (3, 4)])
    torch.testing.assert_close(direct_logit_weights(gpt2_untied, 0, [3, 4]), hand, atol=1e-6, rtol=1e-5)


def test_norm_approximation_ranks_like_the_true_direct_effect(llama):
    """Adding a small multiple of w_out[n] to the final residual changes logits ~ proportionally to the
    approximation (the per-token 1/rms is a positive scale)."""
    hf = llama.model
    down = hf.model.layers[1].mlp.down_proj.weight
    resid = torch.randn(1, llama.d_model)
    eps = 1e-3
    with torch.no_grad():
        base = hf.lm_head(hf.model.norm(resid))
        bumped = hf.lm_head(hf.model.norm(resid + eps * down[:, 9]))
    true_effect = ((bumped - base) / eps)[0]
    approx = direct_logit_weights(llama, 1, [9])[0]
    corr = torch.corrcoef(torch.stack([true_effect, approx]))[0, 1]
    assert corr > 0.8


def test_top_and_bottom_tokens(llama):
    df = top_logit_tokens(llama, 0, [2, 5], k=7)
    assert list(df.columns) == LOGITS_COLUMNS
    assert len(df) == 2 * 2 * 7
    full = direct_logit_weights(llama, 0, [5])[0]
    top = df[(df.neuron == 5) & (df.direction == "top")].sort_values("rank")
    bottom = df[(df.neuron == 5) & (df.direction == "bottom")].sort_values("rank")
    assert top.token_id.tolist() == full.topk(7).indices.tolist()
    assert bottom.token_id.tolist() == full.topk(7, largest=False).indices.tolist()
    assert top.value.is_monotonic_decreasing and bottom.value.is_monotonic_increasing
    assert top.token.iloc[0] == llama.tokenizer.decode([int(top.token_id.iloc[0])])


def test_write_logits_for_scanned_neurons(tmp_path, llama):
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"layer": [0, 0, 1], "neuron": [1, 2, 3], "mean": [0.1, 0.2, 0.3]}).to_parquet(run / "neurons.parquet")
    (run / "config.json").write_text(json.dumps({"model": "tiny"}))
    (run / "manifest.json").write_text("{}")
    path = write_logits(run, llama, k=4)
    df = pd.read_parquet(path)
    assert len(df) == 3 * 2 * 4
    assert set(zip(df.layer, df.neuron, strict=True)) == {(0, 1), (0, 2), (1, 3)}
    with pytest.raises(RunDirError):
        write_logits(tmp_path / "nope", llama)


def test_bad_neurons_and_layers(llama):
    with pytest.raises(SiteError, match="neuron 128 is out of range"):
        direct_logit_weights(llama, 0, [128])
    with pytest.raises(SiteError, match="layer 2 is out of range"):
        logits_table(llama, [(2, 0)])
