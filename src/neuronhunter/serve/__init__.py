"""``neuronhunter serve``: a small local web app over run folders.

Pages (server-rendered HTML, corpus text always escaped) and a JSON API read the runs' Parquet tables in place
with DuckDB; live features (a neuron's activation on any text, steering) load the run's model lazily and run it in
a worker thread, one request at a time, so page views never wait for the model.

Modules:

* :mod:`.runs` — the run folders and every query over their tables (columns read generically).
* :mod:`.live` — the lazily loaded models, the worker thread and the live computations.
* :mod:`.app` — the Starlette app: routes, limits, error pages, security headers.
* :mod:`.render` — HTML rendering helpers (number formats, histogram SVG, exemplar contexts).
* :mod:`.server` — running the app with uvicorn (in the foreground, or in a background thread for tests).
* :mod:`.testing` — tiny run folders (with hostile corpus text) for tests, benchmarks and screenshots.

Starlette and uvicorn come with the ``serve`` extra: ``pip install 'neuronhunter[serve]'``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """Build the ASGI app (see :func:`neuronhunter.serve.app.create_app`)."""
    from .app import create_app as _create

    return _create(*args, **kwargs)


def serve(*args: Any, **kwargs: Any) -> None:
    """Serve run folders until interrupted (see :func:`neuronhunter.serve.server.serve`)."""
    from .server import serve as _serve

    _serve(*args, **kwargs)
