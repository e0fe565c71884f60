"""Hook sites: where in a transformer an activation lives.

A :class:`Site` names one activation with TransformerLens' hook names, which researchers already know::

    >>> str(Site(3, "mlp.hook_post"))
    'blocks.3.mlp.hook_post'
    >>> Site.parse("blocks.3.attn.hook_pattern")
    Site(layer=3, kind='attn.hook_pattern')

Kinds and their meaning (shapes for a batch of ``[batch, pos]`` tokens):

==================  =========================================================  ==========================
kind                what it is                                                 shape
==================  =========================================================  ==========================
hook_resid_pre      residual stream entering block ``layer``                   ``[batch, pos, d_model]``
hook_resid_post     residual stream leaving block ``layer``                    ``[batch, pos, d_model]``
hook_attn_out       attention output added to the residual stream              ``[batch, pos, d_model]``
hook_mlp_out        MLP output added to the residual stream                    ``[batch, pos, d_model]``
mlp.hook_pre        MLP pre-activation (GELU MLPs: ``W_in x``; gated: gate)    ``[batch, pos, d_mlp]``
mlp.hook_post       **the neuron**: input of the MLP output projection         ``[batch, pos, d_mlp]``
attn.hook_z         per-head attention output before the output projection     ``[batch, pos, n_heads, d_head]``
attn.hook_pattern   attention probabilities                                    ``[batch, n_heads, q, k]``
==================  =========================================================  ==========================

For gated MLPs (Llama, SmolLM2, Gemma) the neuron is ``act(gate(x)) * up(x)``, the input of ``down_proj`` —
not the gate alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SiteError

KINDS = (
    "hook_resid_pre",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_pre",
    "mlp.hook_post",
    "attn.hook_z",
    "attn.hook_pattern",
)

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One activation site: ``(layer, kind)``, printed as ``blocks.{layer}.{kind}``."""

    layer: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}; known: {', '.join(KINDS)}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise SiteError(f"layer must be a non-negative integer, got {self.layer!r}")

    def __str__(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, name: str | Site) -> Site:
        """Parse ``"blocks.3.mlp.hook_post"`` into ``Site(3, "mlp.hook_post")``."""
        if isinstance(name, Site):
            return name
        m = _SITE_RE.match(name.strip())
        if not m:
            raise SiteError(f"malformed site name {name!r}; expected e.g. 'blocks.3.mlp.hook_post'")
        return cls(int(m.group(1)), m.group(2))

    # Convenience constructors -------------------------------------------------------------------------------
    @classmethod
    def mlp_post(cls, layer: int) -> Site:
        return cls(layer, "mlp.hook_post")

    @classmethod
    def resid_post(cls, layer: int) -> Site:
        return cls(layer, "hook_resid_post")

    @classmethod
    def resid_pre(cls, layer: int) -> Site:
        return cls(layer, "hook_resid_pre")

    @classmethod
    def attn_z(cls, layer: int) -> Site:
        return cls(layer, "attn.hook_z")

    @classmethod
    def attn_pattern(cls, layer: int) -> Site:
        return cls(layer, "attn.hook_pattern")


_FEATURE_RE = re.compile(r"^(blocks\.\d+\.mlp\.hook_post)\.(sae|transcoder)\.(\d+)$")


@dataclass(frozen=True, order=True)
class FeatureSite:
    """One feature of a sparse dictionary over a site's units, a unit like a neuron::

        >>> str(FeatureSite(Site(3, "mlp.hook_post"), "sae", 17))
        'blocks.3.mlp.hook_post.sae.17'

    ``dictionary`` is ``sae`` (features of the neurons) or ``transcoder`` (features of the MLP's input that write
    its output); see :mod:`neuronhunter.circuits.features`.
    """

    site: Site
    dictionary: str
    feature: int

    def __str__(self) -> str:
        return f"{self.site}.{self.dictionary}.{self.feature}"

    @classmethod
    def parse(cls, name: str) -> FeatureSite:
        """Parse ``"blocks.3.mlp.hook_post.sae.17"``."""
        m = _FEATURE_RE.match(name.strip())
        if not m:
            raise SiteError(f"malformed feature name {name!r}; expected e.g. 'blocks.3.mlp.hook_post.sae.17'")
        return cls(Site.parse(m.group(1)), m.group(2), int(m.group(3)))
