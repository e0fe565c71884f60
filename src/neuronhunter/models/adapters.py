"""Architecture adapters: where each hook site lives in an unmodified Hugging Face model, and what the block does.

An adapter is data, not code: a table of module paths and facts per HF ``model_type``. :class:`HookedModel` reads
the table and attaches plain PyTorch hooks; :mod:`neuronhunter.analysis.attribution` reads the norm facts. Adding an
architecture means adding one entry (and a tiny config in :mod:`neuronhunter.models.tiny`, so that the conformance
tests in ``tests/unit/test_adapter_conformance.py`` cover it). A ``model_type`` not in the table is refused with a
one-line :class:`ModelLoadError`.

The MLP neuron (``mlp.hook_post``) is always captured as the *input* of the MLP's output projection, which is
the post-activation for GELU MLPs (GPT-2, GPT-NeoX/Pythia) and ``act(gate(x)) * up(x)`` for gated MLPs (Llama
family). ``mlp.hook_pre`` is the output of the input projection (GELU MLPs) or of the gate projection (gated).

``hook_attn_out`` and ``hook_mlp_out`` are exactly what the block adds to the residual stream: the output of the
attention / MLP module for pre-norm blocks, the output of the post-attention / post-feed-forward norm for post-norm
and sandwich-norm blocks. So ``resid_post == resid_pre + attn_out + mlp_out`` holds for every family below.

How each family normalises (``h`` is the residual stream, ``N``/``N'`` two different norm modules)::

    pre       h = h + attn(N(h));            h = h + mlp(N'(h))
    post      h = h + N(attn(h));            h = h + N'(mlp(h))
    sandwich  h = h + N2(attn(N1(h)));       h = h + N4(mlp(N3(h)))
    parallel  h = h + attn(N(h)) + mlp(N'(h))          (pre-norm, both read the block's input)

==============  ==========  ========  ====================  =============  =====================================
model_type      placement   parallel  norm type             embed scale    post-attn / post-MLP norm modules
==============  ==========  ========  ====================  =============  =====================================
gpt2            pre         no        layernorm             --             --
gpt_neox        pre         yes [1]   layernorm             --             --
llama, mistral  pre         no        rmsnorm               --             --
qwen2, qwen3    pre         no        rmsnorm [2]           --             --
gemma           pre         no        rmsnorm_plus_one      sqrt_d_model   -- [3]
gemma2          sandwich    no        rmsnorm_plus_one      sqrt_d_model   post_attention_layernorm /
gemma3_text                                                                post_feedforward_layernorm
olmo            pre         no        layernorm_noweight    --             --
olmo2           post        no        rmsnorm [2]           --             post_attention_layernorm /
                                                                           post_feedforward_layernorm
==============  ==========  ========  ====================  =============  =====================================

Norm types: ``layernorm`` is ``g * (x - mean) / std + b``; ``rmsnorm`` is ``g * x / rms``; ``rmsnorm_plus_one``
(Gemma) is ``(1 + w) * x / rms``; ``layernorm_noweight`` (OLMo v1) is ``(x - mean) / std`` with no parameters.
``sqrt_d_model``: the token embedding is multiplied by ``sqrt(d_model)`` before block 0 (Gemma does this inside
its embedding module, so ``hook_resid_pre`` of block 0 already includes it).

[1] GPT-NeoX reads ``config.use_parallel_residual`` (Pythia: true); :meth:`ArchitectureAdapter.resolved` sets the
flag from the config. Either way the sites are the same modules. [2] Qwen3 and OLMo2 also normalise queries and
keys inside attention; that changes no site. [3] In Llama-style blocks (Llama, Gemma v1, Qwen, Mistral) the module
named ``post_attention_layernorm`` is the *pre*-MLP norm; only Gemma 2/3 and OLMo2 have true post norms.
Gemma 2 also soft-caps attention scores and final logits (``tanh``); the logit soft-cap is applied after the
unembedding and is outside the direct-logit-attribution linearisation (it is monotonic per logit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ModelLoadError

NORM_PLACEMENTS = ("pre", "post", "sandwich")
NORM_TYPES = ("layernorm", "rmsnorm", "rmsnorm_plus_one", "layernorm_noweight")
EMBED_SCALES = (None, "sqrt_d_model")


@dataclass(frozen=True, kw_only=True)
class ArchitectureAdapter:
    """Module paths (relative to the ``*ForCausalLM`` model) and block facts for one family of architectures."""

    family: str
    layers: str  # the ModuleList of blocks
    final_norm: str
    embed: str
    attn: str  # relative to a block
    attn_out_proj: str  # relative to a block; its input is attn.hook_z
    mlp: str  # relative to a block
    mlp_out_proj: str  # relative to a block; its input is the neuron (mlp.hook_post)
    mlp_in_proj: str  # relative to a block; its output is mlp.hook_pre (gate for gated MLPs)
    norm_placement: str  # "pre" | "post" | "sandwich" (pre and post)
    parallel_residual: bool  # attention and MLP both read the block's input and are added together
    norm_type: str  # one of NORM_TYPES; every norm of the model (blocks and final) is of this type
    embed_scale: str | None  # None | "sqrt_d_model"
    attn_out_norm: str | None = None  # relative to a block: post-attention norm (its output is hook_attn_out)
    mlp_out_norm: str | None = None  # relative to a block: post-MLP norm (its output is hook_mlp_out)
    parallel_residual_flag: str | None = None  # config attribute that overrides parallel_residual, if any
    gated: bool = False
    mlp_up_proj: str | None = None  # gated MLPs only
    pos_embed: str | None = None  # learned absolute position embedding, if any

    def __post_init__(self) -> None:
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"{self.family}: norm_placement must be one of {NORM_PLACEMENTS}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"{self.family}: norm_type must be one of {NORM_TYPES}")
        if self.embed_scale not in EMBED_SCALES:
            raise ValueError(f"{self.family}: embed_scale must be one of {EMBED_SCALES}")
        has_post = self.norm_placement in ("post", "sandwich")
        if has_post != (self.attn_out_norm is not None and self.mlp_out_norm is not None):
            raise ValueError(f"{self.family}: post/sandwich norms need attn_out_norm and mlp_out_norm, pre has none")
        if self.gated != (self.mlp_up_proj is not None):
            raise ValueError(f"{self.family}: gated MLPs (and only they) name mlp_up_proj")

    @property
    def has_post_norms(self) -> bool:
        """True when attention and MLP outputs pass through a norm before the residual add."""
        return self.norm_placement in ("post", "sandwich")

    def embed_multiplier(self, d_model: int) -> float:
        """The factor applied to token embeddings before block 0 (1.0 unless ``embed_scale`` says otherwise)."""
        return float(d_model) ** 0.5 if self.embed_scale == "sqrt_d_model" else 1.0

    def resolved(self, config: Any) -> ArchitectureAdapter:
        """This adapter with config-dependent facts (``parallel_residual``) read from an HF config."""
        if self.parallel_residual_flag is None or config is None:
            return self
        value = getattr(config, self.parallel_residual_flag, None)
        if value is None or bool(value) == self.parallel_residual:
            return self
        return dataclasses.replace(self, parallel_residual=bool(value))


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
    norm_placement="pre",
    parallel_residual=False,
    norm_type="layernorm",
    embed_scale=None,
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
    norm_placement="pre",
    parallel_residual=True,
    parallel_residual_flag="use_parallel_residual",
    norm_type="layernorm",
    embed_scale=None,
)

_LLAMA_PATHS: dict[str, Any] = dict(
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
    parallel_residual=False,
)

# Llama, Mistral, Qwen2 and Qwen3 (whose q/k norms change no site) share module names and block structure.
LLAMA = ArchitectureAdapter(family="llama", norm_placement="pre", norm_type="rmsnorm", embed_scale=None,
                            **_LLAMA_PATHS)

GEMMA = ArchitectureAdapter(family="gemma", norm_placement="pre", norm_type="rmsnorm_plus_one",
                            embed_scale="sqrt_d_model", **_LLAMA_PATHS)

# Gemma 2 and Gemma 3 (text): input_layernorm -> attn -> post_attention_layernorm, then
# pre_feedforward_layernorm -> mlp -> post_feedforward_layernorm.
GEMMA2 = ArchitectureAdapter(family="gemma2", norm_placement="sandwich", norm_type="rmsnorm_plus_one",
                             embed_scale="sqrt_d_model", attn_out_norm="post_attention_layernorm",
                             mlp_out_norm="post_feedforward_layernorm", **_LLAMA_PATHS)

GEMMA3 = dataclasses.replace(GEMMA2, family="gemma3_text")

OLMO = ArchitectureAdapter(family="olmo", norm_placement="pre", norm_type="layernorm_noweight", embed_scale=None,
                           **_LLAMA_PATHS)

OLMO2 = ArchitectureAdapter(family="olmo2", norm_placement="post", norm_type="rmsnorm", embed_scale=None,
                            attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
                            **_LLAMA_PATHS)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "gpt2": GPT2,
    "gpt_neox": NEOX,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
    "olmo": OLMO,
    "olmo2": OLMO2,
}


def adapter_for(model_type: str, config: Any = None) -> ArchitectureAdapter:
    """Return the adapter for an HF ``config.model_type`` (resolved against ``config`` when given) or raise a
    clear one-line error."""
    try:
        adapter = ADAPTERS[model_type]
    except KeyError:
        raise ModelLoadError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
    return adapter.resolved(config)
