"""HookedModel sites equal plain PyTorch hooks / hand computations on every architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuronhunter.errors import SiteError
from neuronhunter.models import Site


def test_site_roundtrip_and_errors():
    s = Site(3, "mlp.hook_post")
    assert str(s) == "blocks.3.mlp.hook_post"
    assert Site.parse("blocks.3.mlp.hook_post") == s
    assert Site.parse(" blocks.12.attn.hook_pattern ") == Site(12, "attn.hook_pattern")
    with pytest.raises(SiteError):
        Site.parse("blocks.x.mlp.hook_post")
    with pytest.raises(SiteError):
        Site.parse("blocks.1.mlp.hook_nonsense")
    with pytest.raises(SiteError):
        Site(-1, "mlp.hook_post")


def _ids(model, text="The quick brown fox jumps over the lazy dog again and again"):
    return model.to_tokens(text)


def test_neuron_equals_plain_hook_on_output_projection(tiny_any):
    """mlp.hook_post is exactly the input of the MLP's output projection (independent plain hook)."""
    m = tiny_any
    ids = _ids(m)
    seen = {}
    proj = m.module(1, m.adapter.mlp_out_proj)
    h = proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            ref_logits = m.model(ids).logits
    finally:
        h.remove()
    logits, cache = m.run_with_cache(ids, sites=[Site.mlp_post(1)])
    assert torch.equal(cache[Site.mlp_post(1)], seen["x"])
    assert torch.equal(logits, ref_logits)  # capturing does not change the forward pass


def test_gated_neuron_is_act_gate_times_up_by_hand(tiny_llama):
    """For gated MLPs the neuron is act(gate(x)) * up(x), not the gate alone (hand computation)."""
    m = tiny_llama
    ids = _ids(m)
    mlp = m.module(0, m.adapter.mlp)
    captured = {}
    h = mlp.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    try:
        _, cache = m.run_with_cache(ids, sites=[Site.mlp_post(0), Site(0, "mlp.hook_pre")])
    finally:
        h.remove()
    x = captured["x"]
    gate = x @ mlp.gate_proj.weight.T
    up = x @ mlp.up_proj.weight.T
    hand = F.silu(gate) * up
    assert (cache[Site.mlp_post(0)] - hand).abs().max() < 1e-5
    assert (cache[Site(0, "mlp.hook_pre")] - gate).abs().max() < 1e-5
    assert (cache[Site.mlp_post(0)] - F.silu(gate)).abs().max() > 1e-3  # not the gate alone


def test_gpt2_neuron_is_post_gelu_by_hand(tiny_gpt2):
    m = tiny_gpt2
    ids = _ids(m)
    _, cache = m.run_with_cache(ids, sites=[Site.mlp_post(0), Site(0, "mlp.hook_pre")])
    pre = cache[Site(0, "mlp.hook_pre")]
    hand = F.gelu(pre, approximate="tanh")  # gelu_new
    assert (cache[Site.mlp_post(0)] - hand).abs().max() < 1e-5


def test_residual_sites_match_hidden_states(tiny_any):
    m = tiny_any
    ids = _ids(m)
    with torch.no_grad():
        hs = m.model(ids, output_hidden_states=True).hidden_states
    _, cache = m.run_with_cache(ids, sites=[Site.resid_pre(0), Site.resid_post(0), Site.resid_pre(1)])
    assert torch.allclose(cache[Site.resid_pre(0)], hs[0], atol=1e-6)
    assert torch.allclose(cache[Site.resid_post(0)], hs[1], atol=1e-6)
    assert torch.allclose(cache[Site.resid_pre(1)], hs[1], atol=1e-6)


def test_attention_pattern_matches_hf_output_attentions(tiny_any):
    m = tiny_any
    ids = _ids(m)
    _, cache = m.run_with_cache(ids, sites=[Site.attn_pattern(1)])
    pat = cache[Site.attn_pattern(1)]
    assert pat.shape == (1, m.n_heads, ids.shape[1], ids.shape[1])
    assert torch.allclose(pat.sum(-1), torch.ones(pat.shape[:-1]), atol=1e-5)
    assert torch.all(pat.triu(1) == 0)  # causal
    impl = m.model.config._attn_implementation
    m.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = m.model(ids, output_attentions=True).attentions[1]
    finally:
        m.model.set_attn_implementation(impl)
    assert torch.allclose(pat, ref, atol=1e-6)
    assert m.model.config._attn_implementation == impl  # restored


def test_intervention_changes_output_and_hooks_are_removed(tiny_any):
    m = tiny_any
    ids = _ids(m)
    base = m.forward(ids)
    n_hooks = sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.model.modules())
    with m.intervene({Site.mlp_post(0): lambda a, s: torch.zeros_like(a)}):
        ablated = m.forward(ids)
    assert not torch.allclose(base, ablated)
    assert torch.equal(m.forward(ids), base)

    def boom(a, s):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with m.intervene({Site.mlp_post(1): boom}):
            m.forward(ids)
    assert torch.equal(m.forward(ids), base)  # hook removed even after an error
    assert sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in m.model.modules()) == n_hooks


def test_head_z_intervention(tiny_any):
    """Zeroing one head's z equals removing its slice of the output projection input."""
    m = tiny_any
    ids = _ids(m)
    site = Site.attn_z(0)
    _, cache = m.run_with_cache(ids, sites=[site])
    assert cache[site].shape == (1, ids.shape[1], m.n_heads, m.d_head)

    def zero_head(z, s):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with m.capture([site]) as seen, m.intervene({site: zero_head}):
        m.forward(ids)
    # capture hook ran before the intervention (registered first) and saw the original z
    assert torch.equal(seen[site], cache[site])
    with m.intervene({site: zero_head}), m.capture([site]) as seen2:
        m.forward(ids)
    assert torch.all(seen2[site][:, :, 2] == 0)


def test_stop_at_layer_skips_later_blocks(tiny_any):
    m = tiny_any
    ids = _ids(m)
    called = []
    h = m.blocks[1].register_forward_hook(lambda *a: called.append(1))
    try:
        logits, cache = m.run_with_cache(ids, sites=[Site.mlp_post(0)], stop_at_layer=1)
    finally:
        h.remove()
    assert logits is None and not called
    _, full = m.run_with_cache(ids, sites=[Site.mlp_post(0)])
    assert torch.equal(cache[Site.mlp_post(0)], full[Site.mlp_post(0)])


def test_out_of_range_layer_is_a_clear_error(tiny_gpt2):
    with pytest.raises(SiteError, match="out of range"):
        tiny_gpt2.run_with_cache(_ids(tiny_gpt2), sites=[Site.mlp_post(7)])
    with pytest.raises(SiteError):
        tiny_gpt2.check_layers([0, 5])
