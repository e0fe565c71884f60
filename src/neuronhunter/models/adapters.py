"""Architecture adapters: where each hook site lives in an unmodified Hugging Face model.

An adapter is data, not code: a table of module paths per HF ``model_type``. :class:`HookedModel` reads the table
and attaches plain PyTorch hooks. Adding an architecture means adding one entry.

The MLP neuron (``mlp.hook_post``) is always captured as the *input* of the MLP's output projection, which is
the post-activation for GELU MLPs (GPT-2, GPT-NeoX/Pythia) and ``act(gate(x)) * up(x)`` for gated MLPs (Llama
family). ``mlp.hook_pre`` is the output of the input projection (GELU MLPs) or of the gate projection (gated).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelLoadError


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths (relative to the ``*ForCausalLM`` model) for one family of architectures."""

    family: str
    layers: str  # the ModuleList of blocks
    final_norm: str
    embed: str
    attn: str  # relative to a block
    attn_out_proj: str  # relative to a block; its input is attn.hook_z
    mlp: str  # relative to a block
    mlp_out_proj: str  # relative to a block; its input is the neuron (mlp.hook_post)
    mlp_in_proj: str  # relative to a block; its output is mlp.hook_pre (gate for gated MLPs)
    gated: bool = False
    mlp_up_proj: str | None = None  # gated MLPs only
    pos_embed: str | None = None  # learned absolute position embedding, if any


GPT2 = ArchitectureAdapter(
    family="gpt2",
    layers="transformer.h",
    final_norm="transformer.ln_f",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    attn="attn",
    attn_out_proj="attn.c_proj",
    mlp="mlp",
    mlp_out_proj="mlp.c_proj",
    mlp_in_proj="mlp.c_fc",
)

NEOX = ArchitectureAdapter(
    family="gpt_neox",
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    embed="gpt_neox.embed_in",
    attn="attention",
    attn_out_proj="attention.dense",
    mlp="mlp",
    mlp_out_proj="mlp.dense_4h_to_h",
    mlp_in_proj="mlp.dense_h_to_4h",
)

LLAMA = ArchitectureAdapter(
    family="llama",
    layers="model.layers",
    final_norm="model.norm",
    embed="model.embed_tokens",
    attn="self_attn",
    attn_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_out_proj="mlp.down_proj",
    mlp_in_proj="mlp.gate_proj",
    mlp_up_proj="mlp.up_proj",
    gated=True,
)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "gpt2": GPT2,
    "gpt_neox": NEOX,
    # Llama-family gated MLPs share module names.
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "gemma3_text": LLAMA,
    "olmo": LLAMA,
    "olmo2": LLAMA,
}


def adapter_for(model_type: str) -> ArchitectureAdapter:
    """Return the adapter for an HF ``config.model_type`` or raise a clear error."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ModelLoadError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
