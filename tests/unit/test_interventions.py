"""Interventions on tiny models with planted ground truth: ablation, patching, steering, loss effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neuronhunter.analysis.attribution import direct_logit_weights
from neuronhunter.causal import interventions as I
from neuronhunter.data.corpus import Document
from neuronhunter.errors import ConfigError, SiteError
from neuronhunter.models import Site
from neuronhunter.models.tiny import tiny_model

TEXTS = [
    "The cat and the dog sat by the red door while the blue bird sang in the green tree.",
    "A red fox ran past the dog; the cat watched from the blue chair near the door.",
    "Green leaves fell on the red roof, and the bird flew to the tree beside the cat.",
    "The dog barked at a blue car, then the fox hid under the green hedge by the road.",
]


class WordLabeller:
    """Labels tokens whose stripped, lower-cased text is in a category's word set."""

    def __init__(self, sets: dict[str, set[str]]):
        self.categories = list(sets)
        self.sets = sets

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        out = np.zeros((len(offsets), len(self.categories)), dtype=bool)
        for i, (s, e) in enumerate(offsets):
            word = text[s:e].strip().lower()
            for c, name in enumerate(self.categories):
                out[i, c] = word in self.sets[name]
        return out


pytestmark = pytest.mark.usefixtures("one_thread_module")  # one torch thread, see conftest


LABELLER = WordLabeller({"animal": {"cat", "dog", "fox", "bird"}, "color": {"red", "blue", "green"}})


@pytest.fixture(scope="module")
def planted():
    """A tiny GPT-2 whose final LayerNorm is the identity and whose neuron (1, 7) writes along W_U[:, TOKEN]."""
    m = tiny_model("gpt2", seed=3)
    m.model.transformer.ln_f = nn.Identity()
    token = 1000  # ' current' in GPT-2's vocabulary; any ordinary token works
    with torch.no_grad():
        w_u = m.unembed_matrix()  # [d_model, vocab]
        m.neuron_output_weights(1)[7] = 5.0 * w_u[:, token]  # Conv1D weight is [d_mlp, d_model]: a view
        m.neuron_output_weights(1)[9] = 0.0  # a neuron that writes nothing
    return m, token


@pytest.fixture(scope="module")
def batches(planted):
    m, _ = planted
    docs = [Document(i, t, f"t{i}") for i, t in enumerate(TEXTS)]
    return I.corpus_batches(m, docs, context_length=16, max_tokens=None, batch_size=3, labeller=LABELLER)


def _no_hooks(m) -> bool:
    return all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.model.modules())


def test_zero_ablating_planted_neuron_changes_exactly_its_direct_logits(planted):
    m, token = planted
    ids = m.to_tokens("The cat sat on the warm mat today")
    site = Site(1, "mlp.hook_post")
    logits, cache = m.run_with_cache(ids, sites=[site])
    p = 4
    act = cache[site][0, p, 7]
    assert abs(float(act)) > 1e-3
    ablated = I.run_with_interventions(m, ids, None, I.neuron_ablation(m, [(1, 7)], "zero", positions=[p]))
    diff = (logits - ablated)[0]
    expected = act * direct_logit_weights(m, 1, [7], through_norm=False)[0]
    torch.testing.assert_close(diff[p], expected, atol=1e-5, rtol=1e-4)
    others = [q for q in range(ids.shape[1]) if q != p]
    assert float(diff[others].abs().max()) == 0.0  # last layer: no other position can see the change
    assert int((diff[p] * torch.sign(act)).argmax()) == token  # it writes along W_U[:, token]
    assert _no_hooks(m)


def test_zero_and_positions_only_touch_selected_units(planted):
    m, _ = planted
    ids = m.to_tokens(["red cat", "blue dog"])
    site = Site(0, "mlp.hook_post")
    _, clean = m.run_with_cache(ids, sites=[site])
    with m.hooks({site: [I.zero_ablate([3, 5], positions=[1]), lambda a, s: seen.update(a=a.clone())]}):
        seen: dict = {}
        m.forward(ids)
    got, ref = seen["a"], clean[site]
    assert float(got[:, 1, [3, 5]].abs().max()) == 0.0
    mask = torch.ones_like(ref, dtype=torch.bool)
    mask[:, 1, [3, 5]] = False
    torch.testing.assert_close(got[mask], ref[mask])


def test_mean_ablation_uses_reference_corpus_mean(planted, batches):
    m, _ = planted
    site = Site(0, "mlp.hook_post")
    means = I.reference_means(m, [site], batches)[site]
    # hand computation: all real tokens, BOS excluded
    acts = []
    for bt in batches:
        _, c = m.run_with_cache(bt.input_ids, bt.attention_mask, sites=[site])
        keep = bt.attention_mask.bool().clone()
        keep[:, 0] = False
        acts.append(c[site][keep])
    torch.testing.assert_close(means, torch.cat(acts).mean(0), atol=1e-5, rtol=1e-5)
    ids = m.to_tokens("the green tree")
    seen = {}
    with m.hooks({site: [I.neuron_ablation(m, [(0, 2), (0, 11)], "mean", means={site: means})[site],
                         lambda a, s: seen.update(a=a.clone())]}):
        m.forward(ids)
    torch.testing.assert_close(seen["a"][0, :, 2], means[2].expand(ids.shape[1]))
    torch.testing.assert_close(seen["a"][0, :, 11], means[11].expand(ids.shape[1]))
    with pytest.raises(ConfigError, match="reference means"):
        I.neuron_ablation(m, [(0, 2)], "mean")


def test_resample_and_patch_use_activations_from_another_input(planted):
    m, _ = planted
    target, source = m.to_tokens("the red cat sat"), m.to_tokens("a blue dog ran")
    site = Site(1, "mlp.hook_post")
    src = I.capture_sources(m, source, None, [site])
    _, tgt = m.run_with_cache(target, sites=[site])
    seen = {}
    fns = I.neuron_ablation(m, [(1, 4)], "resample", sources=src)
    with m.hooks({site: [fns[site], lambda a, s: seen.update(a=a.clone())]}):
        m.forward(target)
    torch.testing.assert_close(seen["a"][..., 4], src[site][..., 4])
    torch.testing.assert_close(seen["a"][..., :4], tgt[site][..., :4])
    # patching the whole residual stream entering layer 0 reproduces the source run exactly
    r0 = Site(0, "hook_resid_pre")
    src0 = I.capture_sources(m, source, None, [r0])
    patched = I.run_with_interventions(m, target, None, {r0: I.patch(src0[r0])})
    torch.testing.assert_close(patched, m.forward(source), atol=1e-5, rtol=1e-5)
    with pytest.raises(SiteError, match="positions"):
        I.run_with_interventions(m, m.to_tokens("a b c d e f g"), None, {r0: I.patch(src0[r0])})


def test_head_ablation_zeroes_one_head(planted):
    m, _ = planted
    ids = m.to_tokens("the dog and the fox")
    z = Site(1, "attn.hook_z")
    _, clean = m.run_with_cache(ids, sites=[z])
    seen = {}
    with m.hooks({z: [I.head_ablation(m, [(1, 2)])[z], lambda a, s: seen.update(a=a.clone())]}):
        logits = m.forward(ids)
    assert float(seen["a"][:, :, 2].abs().max()) == 0.0
    torch.testing.assert_close(seen["a"][:, :, [0, 1, 3]], clean[z][:, :, [0, 1, 3]])
    assert not torch.equal(logits, m.forward(ids))
    with pytest.raises(SiteError, match="head 4 is out of range"):
        I.head_ablation(m, [(1, 4)])


def test_steering_adds_direction_times_scale(planted):
    m, _ = planted
    ids = m.to_tokens("steer me")
    site = Site(1, "hook_resid_post")  # the last block: logits = resid @ W_U (identity final norm)
    d = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    steered = I.run_with_interventions(m, ids, None, {site: I.steer(d, 3.0)})
    expected = 3.0 * (d @ m.unembed_matrix())
    torch.testing.assert_close((steered - m.forward(ids))[0], expected.expand(ids.shape[1], -1), atol=1e-4, rtol=1e-4)


def test_hooks_removed_even_when_forward_raises(planted):
    m, _ = planted
    ids = m.to_tokens("boom")
    clean = m.forward(ids)

    def explode(act, site):
        raise RuntimeError("planted failure")

    with pytest.raises(RuntimeError, match="planted failure"):
        I.run_with_interventions(m, ids, None, I.combine(I.neuron_ablation(m, [(0, 1)]), {Site(1, "mlp.hook_post"): explode}))
    assert _no_hooks(m)
    torch.testing.assert_close(m.forward(ids), clean)


def test_ablation_effect_per_category_and_top_tokens(planted, batches):
    m, _ = planted
    none = I.ablation_effect(m, batches, neurons=[(1, 9)], method="zero", categories=LABELLER.categories)
    assert np.all(none.delta == 0.0)  # neuron 9 writes nothing
    eff = I.ablation_effect(m, batches, neurons=[(1, 7)], method="mean", categories=LABELLER.categories)
    s = eff.summary()
    assert s["n_tokens"] == len(eff.tokens) > 50
    assert s["delta_loss"] != 0.0
    by = eff.by_category()
    assert list(by.category) == ["animal", "color"]
    n_animal = sum(int(b.labels[:, :-1, 0][(b.attention_mask[:, 1:] & b.attention_mask[:, :-1]).bool()].sum())
                   for b in batches)
    assert int(by.n_tokens.iloc[0]) == n_animal > 0
    top = eff.top_tokens(m.tokenizer, batches, k=5)
    assert len(top) == 5
    assert np.all(np.diff(np.abs(top.logprob_change.to_numpy())) <= 1e-12)
    res = I.ablation_effect(m, batches, neurons=[(1, 7)], heads=[(0, 1)], method="resample")
    assert res.summary()["delta_loss"] != 0.0


def test_bad_inputs(planted):
    m, _ = planted
    with pytest.raises(SiteError, match="neuron 128 is out of range"):
        I.neuron_ablation(m, [(0, 128)])
    with pytest.raises(SiteError, match="layer 5 is out of range"):
        I.neuron_ablation(m, [(5, 0)])
    with pytest.raises(ConfigError, match="unknown ablation method"):
        I.neuron_ablation(m, [(0, 1)], "banana")
    with pytest.raises(ConfigError, match="pairs"):
        I.parse_units([1, 2, 3])
    assert I.parse_units([1, 2, 3, 4]) == [(1, 2), (3, 4)]
    with pytest.raises(ConfigError, match="nothing to ablate"):
        I.ablation_factory(m)


def test_corpus_batches_tokens_per_doc(planted):
    m, _ = planted
    docs = [Document(i, t, f"t{i}") for i, t in enumerate(TEXTS)]
    bts = I.corpus_batches(m, docs, context_length=16, max_tokens=None, batch_size=8, tokens_per_doc=5)
    assert len(bts) == 1 and bts[0].doc_ids.tolist() == [0, 1, 2, 3]
    assert bts[0].input_ids.shape[1] == 6 and int(bts[0].attention_mask.sum()) == 4 * 6
    capped = I.corpus_batches(m, docs, context_length=16, max_tokens=12, batch_size=8, tokens_per_doc=5)
    assert int(capped[0].attention_mask.sum()) - len(capped[0].doc_ids) == 12  # BOS rows excluded
    assert capped[0].doc_ids.tolist() == [0, 1, 2]
