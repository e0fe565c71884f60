"""Writing plotly figures: self-contained offline HTML (plotly.js inlined, no CDN), PNG when kaleido is installed.

Both files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_path, write_text


def kaleido_available() -> bool:
    """Whether static image export (kaleido) is installed."""
    return importlib.util.find_spec("kaleido") is not None


def figure_html(fig: Any) -> str:
    """The figure as a complete HTML page with plotly.js inlined (works offline)."""
    return fig.to_html(include_plotlyjs=True, full_html=True, include_mathjax=False)


def write_figure(fig: Any, path: str | Path, *, png: bool | None = None, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` to ``path`` (``.html`` added if missing) and, when possible or asked, a PNG beside it.

    Args:
        png: None = write a PNG when kaleido is installed; True = require it (ConfigError without kaleido);
            False = HTML only.
        scale: PNG resolution multiplier.

    Returns:
        The files written.
    """
    path = Path(path)
    if path.suffix.lower() != ".html":
        path = path.with_name(path.name + ".html")
    if png and not kaleido_available():
        raise ConfigError("PNG export needs kaleido: pip install 'neuronhunter[export]' (HTML still works)")
    written = [write_text(path, figure_html(fig))]
    if png or (png is None and kaleido_available()):
        out = path.with_suffix(".png")
        with atomic_path(out) as tmp:
            fig.write_image(str(tmp), format="png", scale=scale)
        written.append(out)
    return written
