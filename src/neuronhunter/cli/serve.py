"""CLI command: serve (a local web app over run folders: neuron pages, search, live activations, JSON API)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""

    @app.command("serve")
    def serve(
        runs: list[Path] = typer.Argument(..., help="Run folders of scans or hunts (addressed by folder name)"),
        host: str = typer.Option("127.0.0.1", help="Interface to listen on (another than loopback exposes the "
                                 "runs and the model to the network)"),
        port: int = typer.Option(8000, help="Port (0: any free port)"),
        model: str = typer.Option(None, "--model", "-m", help="Model for the live features of every run "
                                  "[default: each run's model, from its config.json]"),
        device: str = typer.Option("cpu", help="Device for the live model: cpu, cuda, cuda:N or auto"),
        max_text: int = typer.Option(4000, help="Longest text of a live request, in characters"),
        access_log: bool = typer.Option(False, "--access-log", help="Log every request"),
    ) -> None:
        """Serve run folders as a local web app: runs and layers, a page per neuron (statistics, histogram,
        verdict, explanations, exemplars, logit attribution, causal results), search over all neurons, and live
        activations and steering with the run's model (loaded on first use). JSON API under /api; see
        docs/serve.md."""
        from ..serve.server import require_serve
        from ..serve.server import serve as run_server

        require_serve()
        run_server(runs, host=host, port=port, device=device, model=model, max_text=max_text,
                   access_log=access_log,
                   announce=lambda url: console.print(f"Serving {len(runs)} run{'s' if len(runs) != 1 else ''} "
                                                      f"at [bold]{url}[/] (Ctrl-C to stop)"))
