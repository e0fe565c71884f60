"""The Starlette app: pages, the JSON API, limits, error pages and security headers.

Pages and API reads are plain functions (Starlette runs them in its thread pool; DuckDB queries the Parquet files
in place); live requests await the model thread (:class:`~neuronhunter.serve.live.Live`). Errors are one message:
``{"error": ..., "status": ...}`` under ``/api``, an error page elsewhere, never a traceback.

Safe by default: corpus text is autoescaped, pages load no inline script (a strict Content-Security-Policy), the
``Host`` header must name this machine (no DNS rebinding), POST bodies must be JSON and are capped in size, texts
in length.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ..errors import NeuronHunterError, SiteError
from .live import MAX_SCALE, Live
from .runs import MAX_PER_PAGE, HTTPError, Run, RunSet, SearchQuery

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_QUERY_TEXT = 200  # characters of a search field
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


# ------------------------------------------------------------------------------------------------- middleware
def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


async def _send_json(send: Any, status: int, message: str) -> None:
    body = _error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Pure ASGI middleware: security headers on every response, the ``Host`` check, and the body size limit
    (a POST body is read here, at most ``max_body`` bytes, and handed on whole)."""

    def __init__(self, app: Any, *, max_body: int, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.max_body = max_body
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    def _host_ok(self, scope: dict[str, Any]) -> bool:
        if self.allowed is None:
            return True
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
            else host
        return name.lower() in self.allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if not self._host_ok(scope):
            await _send_json(send_with_headers, 400, "this server only answers requests addressed to "
                             f"{', '.join(sorted(self.allowed or []))} (Host header refused)")
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send_with_headers)
            return
        limit = f"the request body is larger than the limit of {self.max_body:,} bytes"
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _send_json(send_with_headers, 413, limit)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_json(send_with_headers, 413, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)


# ------------------------------------------------------------------------------------------------- parsing
def _int(value: Any, what: str, status: int = 404) -> int:
    text = str(value).strip()
    if not re.fullmatch(r"-?\d{1,9}", text):
        raise HTTPError(status, f"{what} must be a whole number, got {str(value)[:40]!r}")
    return int(text)


def _int_list(text: str, what: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d{1,6})\s*-\s*(\d{1,6})", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo or hi - lo > 10000:
                raise HTTPError(400, f"{what}: bad range {part!r}")
            out.extend(range(lo, hi + 1))
        else:
            out.append(_int(part, what, 400))
    return out


def _field(params: Any, name: str) -> str | None:
    value = params.get(name)
    if value is None or not value.strip():
        return None
    if len(value) > MAX_QUERY_TEXT:
        raise HTTPError(400, f"{name} is longer than {MAX_QUERY_TEXT} characters")
    return value.strip() if name != "token" else value


def search_query(params: Any) -> SearchQuery:
    """A :class:`SearchQuery` from URL parameters (the search page and ``GET /api/neurons`` share them)."""
    sq = SearchQuery()
    layer = _field(params, "layer")
    sq.layers = _int_list(layer, "layer") if layer else None
    verdict = _field(params, "verdict")
    sq.verdicts = [v.strip() for v in verdict.split(",") if v.strip()] if verdict else None
    sq.category, sq.token, sq.text = _field(params, "category"), _field(params, "token"), _field(params, "q")
    sq.direction, sq.flag, sq.sort = _field(params, "direction"), _field(params, "flag"), _field(params, "sort")
    order = (params.get("order") or "desc").lower()
    if order not in ("asc", "desc"):
        raise HTTPError(400, f"order must be asc or desc, got {order[:20]!r}")
    sq.order = order
    sq.page = _int(params.get("page") or 1, "page", 400)
    sq.per_page = _int(params.get("per_page") or 50, "per_page", 400)
    if sq.page < 1 or not 1 <= sq.per_page <= MAX_PER_PAGE:
        raise HTTPError(400, f"page must be >= 1 and per_page between 1 and {MAX_PER_PAGE}")
    for key, value in params.items():
        m = re.fullmatch(r"(min|max)_(\w{1,64})", key)
        if m and value.strip():
            try:
                number = float(value)
            except ValueError:
                raise HTTPError(400, f"{key} must be a number, got {value[:40]!r}") from None
            lo, hi = sq.ranges.get(m.group(2), (None, None))
            sq.ranges[m.group(2)] = (number, hi) if m.group(1) == "min" else (lo, number)
    return sq


async def _json_body(request: Any) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPError(415, "send the request as JSON (Content-Type: application/json)")
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return data


def _json_int(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(422, f"{name!r} must be an integer" + ("" if name in data else " (missing)"))
    return value


def _json_text(data: dict[str, Any], name: str, max_text: int) -> str:
    text = data.get(name)
    if not isinstance(text, str):
        raise HTTPError(422, f"{name!r} must be a string" + ("" if name in data else " (missing)"))
    if len(text) > max_text:
        raise HTTPError(413, f"{name!r} is {len(text):,} characters long; the limit is {max_text:,}")
    if not text.strip():
        raise HTTPError(422, f"{name!r} is empty")
    return text


# ------------------------------------------------------------------------------------------------- the app
def create_app(
    runs: RunSet | Sequence[str | Path],
    *,
    device: str = "cpu",
    model: str | None = None,
    max_text: int = 4000,
    max_body: int = 64 * 1024,
    max_pending: int = 8,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    live: Live | None = None,
    warm_up: bool = True,
) -> Any:
    """The ASGI app over ``runs`` (run folders, addressed by name).

    Args:
        device: where live models are loaded.
        model: the model for live features of every run (default: each run's ``config.json`` model).
        max_text: characters of a live text (longer: 413).
        max_body: bytes of a request body (larger: 413).
        max_pending: live requests running or waiting at once (more: 503).
        allowed_hosts: names the ``Host`` header may carry (None: any; the default: this machine's loopback).
        warm_up: read each run's neurons table, exemplar index and token index in a background thread at start
            (else on the first request that needs them).
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from .render import environment, group_examples, plain_context

    runset = runs if isinstance(runs, RunSet) else RunSet(runs)
    live = live or Live(device=device, model=model, max_pending=max_pending)
    env = environment()

    def page(template: str, code: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(template).render(runs=[r.name for r in runset], **context)
        return HTMLResponse(html, status_code=code)

    def as_json(data: Any, status: int = 200) -> Response:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return Response(body, status_code=status, media_type="application/json")

    def error(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api"):
            return as_json({"error": message, "status": status}, status)
        return page("error.html", status, status=status, message=message, run=None)

    # ---------------------------------------------------------------------------------------------- pages
    def index(request: Request) -> Response:
        return page("index.html", summaries=[r.summary() for r in runset], run=runset.default.name)

    def neuron_page(request: Request) -> Response:
        run = runset.get(request.query_params.get("run"))
        layer = _int(request.path_params["layer"], "layer")
        neuron = _int(request.path_params["neuron"], "neuron")
        data = run.neuron(layer, neuron)
        summary = run.summary()
        examples = data["examples"]
        return page("neuron.html", n=data, summary=summary, run=run.name, max_text=max_text,
                    example_groups=group_examples(examples),
                    default_text=plain_context(examples[0]) if examples else "The red fox ran across the field.",
                    prev=_step(run, summary, layer, neuron, -1), next=_step(run, summary, layer, neuron, 1))

    def goto(request: Request) -> Response:
        params = request.query_params
        run = runset.get(params.get("run"))
        layer, neuron = _int(params.get("layer", ""), "layer", 400), _int(params.get("neuron", ""), "neuron", 400)
        run.check(layer, neuron)
        from .render import neuron_url

        return RedirectResponse(neuron_url(run.name, layer, neuron), status_code=303)

    def search_page(request: Request) -> Response:
        params = dict(request.query_params)
        run = runset.get(params.get("run"))
        params["run"] = run.name
        result = run.search(search_query(request.query_params))
        return page("search.html", result=result, params=params, summary=run.summary(), run=run.name,
                    sortable=run.sortable())

    # ---------------------------------------------------------------------------------------------- API
    def api_runs(request: Request) -> Response:
        return as_json({"runs": [r.summary() for r in runset]})

    def api_search(request: Request) -> Response:
        run = runset.get(request.query_params.get("run"))
        return as_json(run.search(search_query(request.query_params)))

    def api_neuron(request: Request) -> Response:
        run = runset.get(request.query_params.get("run"))
        layer = _int(request.path_params["layer"], "layer")
        neuron = _int(request.path_params["neuron"], "neuron")
        return as_json(run.neuron(layer, neuron))

    def api_health(request: Request) -> Response:
        return as_json({"ok": True, "runs": [r.name for r in runset], "tables_read": warmed.is_set(),
                        "models_loaded": live.loaded, "live_pending": live.pending})

    def _live_args(data: dict[str, Any]) -> tuple[Run, int, int]:
        name = data.get("run")
        if name is not None and not isinstance(name, str):
            raise HTTPError(422, "'run' must be the name of a served run")
        return runset.get(name), _json_int(data, "layer"), _json_int(data, "neuron")

    async def api_activations(request: Request) -> Response:
        data = await _json_body(request)
        run, layer, neuron = _live_args(data)
        text = _json_text(data, "text", max_text)
        run.check(layer, neuron)
        return as_json(await live.call(live.activations, run, layer, neuron, text))

    async def api_steer(request: Request) -> Response:
        data = await _json_body(request)
        run, layer, neuron = _live_args(data)
        text = _json_text(data, "text", max_text)
        scale = data.get("scale", 10.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) <= MAX_SCALE:
            raise HTTPError(422, f"'scale' must be a number between {-MAX_SCALE:g} and {MAX_SCALE:g}")
        top = data.get("top", 10)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 50:
            raise HTTPError(422, "'top' must be an integer between 1 and 50")
        run.check(layer, neuron)
        return as_json(await live.call(live.steer, run, layer, neuron, text, float(scale), top))

    # ---------------------------------------------------------------------------------------------- errors
    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error(request, exc.status, exc.message)

    async def on_starlette(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no page at {request.url.path}", 405: f"{request.method} is not allowed here"}.get(
            exc.status_code, str(exc.detail))
        return error(request, exc.status_code, message)

    async def on_user_error(request: Request, exc: Exception) -> Response:
        return error(request, 404 if isinstance(exc, SiteError) else 422, str(exc))

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(request, 500, f"internal error ({type(exc).__name__}); the server's log has the details")

    warmed = threading.Event()

    def warm() -> None:
        for run in runset:
            try:
                run.warm()
            except Exception:  # a broken table shows up as that page's error, with its message
                log.warning("run %s: could not read its tables ahead of the first request", run.name, exc_info=True)
        warmed.set()

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        if warm_up:
            threading.Thread(target=warm, name="neuronhunter-warm", daemon=True).start()
        yield
        live.close()

    static = Path(__file__).parent / "static"
    routes = [
        Route("/", index), Route("/search", search_page), Route("/neuron", goto),
        Route("/neurons/{layer}/{neuron}", neuron_page),
        Route("/api/runs", api_runs), Route("/api/health", api_health), Route("/api/neurons", api_search),
        Route("/api/neurons/{layer}/{neuron}", api_neuron),
        Route("/api/activations", api_activations, methods=["POST"]),
        Route("/api/steer", api_steer, methods=["POST"]),
        Mount("/static", StaticFiles(directory=static), name="static"),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan,
        middleware=[Middleware(Guard, max_body=max_body, allowed_hosts=allowed_hosts)],
        exception_handlers={HTTPError: on_http_error, HTTPException: on_starlette,
                            NeuronHunterError: on_user_error, Exception: on_crash},
    )
    app.state.runs, app.state.live = runset, live
    return app


def _step(run: Run, summary: dict[str, Any], layer: int, neuron: int, delta: int) -> dict[str, Any] | None:
    """The previous or next neuron of the run (across layers), or None at either end."""
    sizes = {int(r["layer"]): int(r["neurons"]) for r in summary["layers"]}
    layers = summary["layer_ids"]
    n = neuron + delta
    if 0 <= n < sizes.get(layer, 0):
        return {"layer": layer, "neuron": n}
    i = layers.index(layer) + delta if layer in layers else -1
    if not 0 <= i < len(layers):
        return None
    other = layers[i]
    return {"layer": other, "neuron": 0 if delta > 0 else sizes[other] - 1}
