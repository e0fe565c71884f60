"""Running the app with uvicorn: in the foreground (``neuronhunter serve``) or in a background thread (tests,
benchmarks). The listening socket is bound here first, so a port in use is one clear error line."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..extras import MissingDependency

log = logging.getLogger(__name__)


def require_serve() -> None:
    """Fail with one line naming the ``serve`` extra when Starlette, uvicorn, Jinja2 or DuckDB is missing."""
    import importlib

    for module, package in (("starlette", "starlette"), ("uvicorn", "uvicorn"), ("jinja2", "jinja2"),
                            ("duckdb", "duckdb")):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            raise MissingDependency(f"this needs the optional package {package!r}: pip install 'neuronhunter[serve]' "
                                    "(or `make setup`)") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); a clear error when it cannot be had."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror or exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = "; choose another with --port" if exc.errno in (98, 48, 10048) else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _config(app: Any, *, access_log: bool = False) -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="on", server_header=False,
                          timeout_keep_alive=5, limit_concurrency=256, timeout_graceful_shutdown=3)


def serve(
    runs: Sequence[str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    model: str | None = None,
    max_text: int = 4000,
    access_log: bool = False,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve ``runs`` until interrupted (Ctrl-C). Binds the loopback interface unless ``host`` says otherwise;
    then only requests addressed to this machine's loopback names are answered."""
    require_serve()
    import uvicorn

    from .app import create_app
    from .runs import RunSet

    runset = RunSet(runs)  # one-line errors for missing or incomplete runs, before the port is taken
    if max_text < 1:
        raise ConfigError("--max-text must be at least 1")
    loopback = is_loopback(host)
    app = create_app(runset, device=device, model=model, max_text=max_text,
                     allowed_hosts=("127.0.0.1", "localhost", "::1", host) if loopback else None)
    sock = bind(host, port)
    if not loopback:
        log.warning("listening on %s: anyone who can reach this address can read these runs and run the model", host)
    if announce is not None:
        announce(url_of(sock))
    uvicorn.Server(_config(app, access_log=access_log)).run(sockets=[sock])


class ServerThread:
    """The app served by uvicorn in a background thread on 127.0.0.1 (a free port unless given); a context
    manager: ``with ServerThread(app) as url: ...`` stops the server on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(_config(app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="neuronhunter-serve")

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
