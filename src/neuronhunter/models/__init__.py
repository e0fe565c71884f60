"""Model loading, architecture adapters, hook sites and the hooked model wrapper."""

from .adapters import ADAPTERS, ArchitectureAdapter, adapter_for
from .hooked import HookedModel, Intervention
from .loading import DEFAULT_MODEL, load_model
from .sites import KINDS, Site

__all__ = ["ADAPTERS", "DEFAULT_MODEL", "KINDS", "ArchitectureAdapter", "HookedModel", "Intervention", "Site",
           "adapter_for", "load_model"]
