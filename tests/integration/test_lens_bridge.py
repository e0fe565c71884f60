"""TransformerLens interop (optional extra ``lens``): the bridge over the embedded model gives the same neuron
activations and logits as neuronhunter's own hooks. Skipped where TransformerLens is not installed (CI installs
the core and dev extras only); run with ``pip install -e '.[lens]'``."""

from __future__ import annotations

import pytest
import torch

from neuronhunter.errors import ModelLoadError
from neuronhunter.models import Site


def test_missing_transformer_lens_is_one_clear_error(tiny_llama, monkeypatch):
    import builtins

    from neuronhunter.models.lens import to_transformer_lens

    real_import = builtins.__import__

    def no_lens(name, *args, **kwargs):
        if name.startswith("transformer_lens"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lens)
    with pytest.raises(ModelLoadError, match=r"pip install 'neuronhunter\[lens\]'"):
        to_transformer_lens(tiny_llama)


def test_bridge_matches_neuronhunter_hooks(embedded):
    pytest.importorskip("transformer_lens")
    from neuronhunter.models.lens import to_transformer_lens

    ids = embedded.to_tokens("The capital of France is Paris, and the capital of Italy is")
    sites = [Site.mlp_post(3), Site.mlp_post(20), Site.parse("blocks.5.hook_resid_post")]
    logits, ours = embedded.run_with_cache(ids, sites=sites)
    bridge = to_transformer_lens(embedded)
    lens_logits, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in {str(s) for s in sites})
    for site in sites:
        assert torch.allclose(cache[str(site)], ours[site], atol=1e-4), site
    assert torch.allclose(lens_logits, logits, atol=1e-3)
    # the weights are shared, not copied; the model's own modules are left alone (no bridge components in it)
    assert bridge.original_model is not embedded.model
    w = embedded.model.model.embed_tokens.weight
    assert bridge.original_model.model.embed_tokens.weight.data_ptr() == w.data_ptr()
    assert type(embedded.final_norm()).__module__.startswith("transformers.")
    assert torch.equal(embedded.run_with_cache(ids, sites=sites)[0], logits)
