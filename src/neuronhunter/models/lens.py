"""TransformerLens 4 interop: the same loaded model, wrapped in TransformerLens's ``TransformerBridge``.

neuronhunter's own hot paths (scan, hunt, verify) use plain PyTorch hooks on the HF model and never need
TransformerLens. For its analysis tools (``ActivationCache`` utilities, its hook API, its notebooks), wrap an
already loaded model without loading or copying weights (the module tree is copied, the tensors shared)::

    import neuronhunter as nh
    from neuronhunter.models.lens import to_transformer_lens

    model = nh.load_model()                     # embedded SmolLM2-135M, offline
    bridge = to_transformer_lens(model)
    logits, cache = bridge.run_with_cache("The capital of France is")
    cache["blocks.3.mlp.hook_post"]             # equals model.run_with_cache(..., sites=["blocks.3.mlp.hook_post"])

Needs the optional extra: ``pip install 'neuronhunter[lens]'`` (TransformerLens >= 4 pulls wandb, datasets and
accelerate, and imports in several seconds, hence optional). Hook names are the same on both sides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from .hooked import HookedModel


def to_transformer_lens(model: HookedModel) -> Any:
    """Wrap ``model``'s HF model and tokenizer in ``transformer_lens.model_bridge.TransformerBridge``.

    The bridge shares the weights (no copy) but wraps a copy of the module tree: TransformerLens replaces
    submodules (norms, attention) with its bridge components and switches attention to eager in place, which would
    otherwise change ``model`` itself under neuronhunter's own hooks and attribution.
    """
    import copy

    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise ModelLoadError("TransformerLens is not installed: pip install 'neuronhunter[lens]'") from None
    info = model.info
    # the bridge reads the model's config from here (no download: a local folder, or the HF cache entry)
    source = info.get("converted_dir") or info.get("path") or info.get("hub_id") or model.name
    if info.get("source") == "gguf":
        raise ModelLoadError("a .gguf model cannot be wrapped by TransformerLens; convert it to an HF folder first")
    shared = {id(t): t for t in (*model.model.parameters(), *model.model.buffers())}
    hf_model = copy.deepcopy(model.model, memo=shared)  # new modules, the same weight tensors
    return TransformerBridge.boot_transformers(source, hf_model=hf_model, tokenizer=model.tokenizer,
                                               device=str(model.device))
