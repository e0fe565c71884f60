"""Every family in the adapter table, checked against its own HF forward pass with plain PyTorch hooks.

For each family a tiny random model (norm weights perturbed away from their init, so a dropped or wrong gain
shows) is checked for:

(a) ``hook_resid_post == hook_resid_pre + hook_attn_out + hook_mlp_out`` (the sites are what the block adds);
(b) direct logit attribution: embeddings + attention outputs + every neuron's activation x its attributed
    direction (+ biases) reproduce the real logits once the exact per-token scales of the norms (the part the
    attribution drops, see ``neuronhunter.analysis.attribution``) are put back;
(c) ``mlp.hook_post`` equals ``act(gate(x)) * up(x)`` (or ``act(W_in x)``) computed by hand from the block's own
    weights and the normalised MLP input captured with a plain hook.

Ground truth comes from ``register_forward_hook`` / ``register_forward_pre_hook`` on the HF modules and from the
facts below, written down from the HF modelling code independently of ``neuronhunter.models.adapters``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from neuronhunter.analysis.attribution import direct_logit_weights, write_to_logits
from neuronhunter.errors import ModelLoadError
from neuronhunter.models import ADAPTERS, Site, adapter_for
from neuronhunter.models.tiny import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest

# family: (norm placement, parallel residual, norm type, embedding multiplier is sqrt(d_model), MLP act attribute)
FACTS = {
    "gpt2": ("pre", False, "layernorm", False, "activation_function"),
    "gpt_neox": ("pre", True, "layernorm", False, "hidden_act"),
    "llama": ("pre", False, "rmsnorm", False, "hidden_act"),
    "mistral": ("pre", False, "rmsnorm", False, "hidden_act"),
    "qwen2": ("pre", False, "rmsnorm", False, "hidden_act"),
    "qwen3": ("pre", False, "rmsnorm", False, "hidden_act"),
    "gemma": ("pre", False, "rmsnorm_plus_one", True, "hidden_act"),
    "gemma2": ("sandwich", False, "rmsnorm_plus_one", True, "hidden_activation"),
    "gemma3_text": ("sandwich", False, "rmsnorm_plus_one", True, "hidden_activation"),
    "olmo": ("pre", False, "layernorm_noweight", False, "hidden_act"),
    "olmo2": ("post", False, "rmsnorm", False, "hidden_act"),
}
POST_MLP_NORM = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm",
                 "olmo2": "post_feedforward_layernorm"}
POST_ATTN_NORM = {"gemma2": "post_attention_layernorm", "gemma3_text": "post_attention_layernorm",
                  "olmo2": "post_attention_layernorm"}


def test_every_adapter_has_facts_and_a_tiny_model():
    assert set(ADAPTERS) == set(FACTS) == set(FAMILIES)


def test_unknown_family_is_refused_in_one_line():
    with pytest.raises(ModelLoadError) as err:
        adapter_for("mamba")
    assert "mamba" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("family", sorted(FACTS))
def test_adapter_states_the_family_facts(family):
    a = ADAPTERS[family]
    placement, parallel, norm_type, sqrt_embed, _ = FACTS[family]
    assert (a.norm_placement, a.parallel_residual, a.norm_type) == (placement, parallel, norm_type)
    assert a.embed_scale == ("sqrt_d_model" if sqrt_embed else None)
    assert a.mlp_out_norm == POST_MLP_NORM.get(family) and a.attn_out_norm == POST_ATTN_NORM.get(family)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=sorted(FACTS))
def case(request):
    """(family, HookedModel with perturbed norms, input ids [2, 32])."""
    family = request.param
    m = tiny_model(family, seed=11)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in m.model.modules():
            if "norm" in type(mod).__name__.lower() or isinstance(mod, nn.LayerNorm):
                for name in ("weight", "bias"):
                    p = getattr(mod, name, None)
                    if isinstance(p, torch.Tensor):
                        p.add_(0.4 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, m.model.config.vocab_size, (2, 32), generator=gen)
    return family, m, ids


@contextlib.contextmanager
def plain_hooks(model: nn.Module, spec: dict[str, tuple[str, str]]):
    """``spec``: key -> (module path, "in" | "out"); yields a dict key -> tensor filled by a forward pass."""
    out: dict[str, torch.Tensor] = {}
    handles = []

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    for key, (path, mode) in spec.items():
        mod = model.get_submodule(path)
        if mode == "in":
            def pre(_m, args, kwargs, key=key):
                out[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(_m, _args, output, key=key):
                out[key] = first(output).detach().clone()
            handles.append(mod.register_forward_hook(post))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def own_linear(norm: nn.Module, norm_type: str, x: torch.Tensor) -> torch.Tensor:
    """The test's own linear part of a norm (gain, centring; no division), from the FACTS norm type."""
    if norm_type in ("layernorm", "layernorm_noweight"):
        x = x - x.mean(-1, keepdim=True)
    if norm_type == "rmsnorm_plus_one":
        x = x * (1.0 + norm.weight)
    elif norm_type != "layernorm_noweight":
        x = x * norm.weight
    return x


def exact_scale(norm: nn.Module, norm_type: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token positive scale s with ``norm(x) == s * linear(x) + bias``, fitted and checked to be exact."""
    bias = getattr(norm, "bias", None)
    target = y - bias if isinstance(bias, torch.Tensor) else y
    lin = own_linear(norm, norm_type, x)
    s = (lin * target).sum(-1, keepdim=True) / (lin * lin).sum(-1, keepdim=True)
    torch.testing.assert_close(s * lin, target, atol=1e-5, rtol=1e-4)  # the stated norm type is right
    assert bool((s > 0).all())
    return s


def _block_paths(m, L):
    return f"{m.adapter.layers}.{L}"  # the block ModuleList path is checked by the (a) tests' resid equality


# ------------------------------------------------------------------------------------------------ (a) sites
def test_residual_stream_is_sum_of_sites(case):
    family, m, ids = case
    sites = [Site(L, k) for L in range(m.n_layers)
             for k in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    spec = {f"pre{L}": (_block_paths(m, L), "in") for L in range(m.n_layers)}
    spec.update({f"post{L}": (_block_paths(m, L), "out") for L in range(m.n_layers)})
    with plain_hooks(m.model, spec) as ref:
        _, cache = m.run_with_cache(ids, sites=sites)
    for L in range(m.n_layers):
        pre, post = cache[Site(L, "hook_resid_pre")], cache[Site(L, "hook_resid_post")]
        assert torch.equal(pre, ref[f"pre{L}"]) and torch.equal(post, ref[f"post{L}"])
        total = pre + cache[Site(L, "hook_attn_out")] + cache[Site(L, "hook_mlp_out")]
        torch.testing.assert_close(total, post, atol=1e-5, rtol=1e-5)


def test_embedding_scale_is_as_stated(case):
    family, m, ids = case
    with plain_hooks(m.model, {"x": (_block_paths(m, 0), "in")}) as ref:
        m(ids)
    emb = m.model.get_input_embeddings().weight[ids] * m.adapter.embed_multiplier(m.d_model)
    if family == "gpt2":
        emb = emb + m.model.transformer.wpe.weight[: ids.shape[1]]
    torch.testing.assert_close(ref["x"], emb.detach(), atol=1e-6, rtol=1e-5)


def test_patching_attn_and_mlp_out_replaces_what_is_added(case):
    """Patch the last block's attention and MLP outputs from another input: the final residual stream is the
    clean block input plus the two patched writes, for post-norm families too."""
    family, m, ids = case
    last = m.n_layers - 1
    a_site, m_site, r_site = Site(last, "hook_attn_out"), Site(last, "hook_mlp_out"), Site(last, "hook_resid_pre")
    corrupt_ids = ids.flip(-1)
    _, corrupt = m.run_with_cache(corrupt_ids, sites=[a_site, m_site])
    _, clean = m.run_with_cache(ids, sites=[r_site, a_site, m_site])
    assert not torch.allclose(corrupt[m_site], clean[m_site])
    patch = {a_site: lambda act, s: corrupt[a_site], m_site: lambda act, s: corrupt[m_site]}
    with plain_hooks(m.model, {"x": (m.adapter.final_norm, "in")}) as ref, m.intervene(patch):
        m(ids)
    torch.testing.assert_close(ref["x"], clean[r_site] + corrupt[a_site] + corrupt[m_site], atol=1e-5, rtol=1e-5)
    with plain_hooks(m.model, {"x": (m.adapter.final_norm, "in")}) as ref, \
            m.intervene({m_site: lambda act, s: torch.zeros_like(act)}):
        m(ids)
    torch.testing.assert_close(ref["x"], clean[r_site] + clean[a_site], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ (b) DLA
def _dla_capture(m, ids):
    a = m.adapter
    spec = {"embed": (_block_paths(m, 0), "in"), "x_final": (a.final_norm, "in"), "y_final": (a.final_norm, "out"),
            "logits": ("lm_head" if hasattr(m.model, "lm_head") else "embed_out", "out")}
    for L in range(m.n_layers):
        block = _block_paths(m, L)
        spec[f"act{L}"] = (f"{block}.{a.mlp_out_proj}", "in")
        if m.model.config.model_type in POST_MLP_NORM:
            norm = f"{block}.{POST_MLP_NORM[m.model.config.model_type]}"
            spec[f"ff_in{L}"], spec[f"ff_out{L}"] = (norm, "in"), (norm, "out")
    sites = [Site(L, "hook_attn_out") for L in range(m.n_layers)]
    with plain_hooks(m.model, spec) as ref, m.capture(sites) as cache:
        m(ids)
    return ref, dict(cache)


def _linearised_sum(family, m, ref, cache, *, drop_post_gain=False):
    """Sum of every component's direct logits (before the final norm's per-token scale)."""
    norm_type = FACTS[family][2]
    total = write_to_logits(m, ref["embed"])
    for L in range(m.n_layers):
        total = total + write_to_logits(m, cache[Site(L, "hook_attn_out")])
        # per unit of activation: with the post-norm gain (the library), or without it (a deliberate mistake)
        weights = write_to_logits(m, m.neuron_output_weights(L)) if drop_post_gain else direct_logit_weights(m, L)
        neurons = ref[f"act{L}"] @ weights
        proj = m.module(L, m.adapter.mlp_out_proj)
        if family in POST_MLP_NORM:
            post = m.module(L, POST_MLP_NORM[family])
            assert getattr(proj, "bias", None) is None
            neurons = neurons * exact_scale(post, norm_type, ref[f"ff_in{L}"], ref[f"ff_out{L}"])
        elif getattr(proj, "bias", None) is not None:
            neurons = neurons + write_to_logits(m, proj.bias.detach()[None])
        total = total + neurons
    return total


def test_direct_logit_attribution_sums_to_logits(case):
    family, m, ids = case
    ref, cache = _dla_capture(m, ids)
    total = _linearised_sum(family, m, ref, cache)
    norm = m.final_norm()
    scale = exact_scale(norm, FACTS[family][2], ref["x_final"], ref["y_final"])
    logits = scale * total
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        logits = logits + bias.detach() @ m.unembed_matrix().detach()
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-4)
    if family in POST_MLP_NORM:  # the same sum without the post-norm gain does not add up
        wrong = scale * _linearised_sum(family, m, ref, cache, drop_post_gain=True)
        assert not torch.allclose(wrong, ref["logits"], atol=1e-3, rtol=1e-3)


def test_neuron_direction_is_the_linearised_write(case):
    """Per neuron: linear part of the post-MLP norm (if any), then of the final norm, then W_U."""
    family, m, _ = case
    norm_type = FACTS[family][2]
    neurons = [0, 5, 127]
    L = m.n_layers - 1
    w = m.neuron_output_weights(L).detach()[neurons]
    if family in POST_MLP_NORM:
        w = own_linear(m.module(L, POST_MLP_NORM[family]), norm_type, w)
    hand = own_linear(m.final_norm(), norm_type, w).detach() @ m.unembed_matrix().detach()
    got = direct_logit_weights(m, L, neurons)
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=1e-4)
    if family in POST_MLP_NORM:
        no_gain = own_linear(m.final_norm(), norm_type, m.neuron_output_weights(L).detach()[neurons]).detach()
        assert not torch.allclose(got, no_gain @ m.unembed_matrix().detach(), atol=1e-3, rtol=1e-2)


# ------------------------------------------------------------------------------------------------ (c) neurons
def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    return x @ module.weight + module.bias  # GPT-2 Conv1D: weight [in, out]


def test_neuron_is_act_gate_times_up_by_hand(case):
    family, m, ids = case
    a, cfg = m.adapter, m.model.config
    act = ACT2FN[getattr(cfg, FACTS[family][4])]
    sites = [Site(L, k) for L in range(m.n_layers) for k in ("mlp.hook_post", "mlp.hook_pre")]
    spec = {f"x{L}": (f"{_block_paths(m, L)}.{a.mlp}", "in") for L in range(m.n_layers)}
    with plain_hooks(m.model, spec) as ref:
        _, cache = m.run_with_cache(ids, sites=sites)
    with torch.no_grad():
        for L in range(m.n_layers):
            x = ref[f"x{L}"]
            pre = _linear(m.module(L, a.mlp_in_proj), x)
            hand = act(pre) * _linear(m.module(L, a.mlp_up_proj), x) if a.gated else act(pre)
            torch.testing.assert_close(cache[Site(L, "mlp.hook_pre")], pre, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(cache[Site(L, "mlp.hook_post")], hand, atol=1e-6, rtol=1e-5)
