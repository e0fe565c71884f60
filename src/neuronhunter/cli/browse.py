"""CLI command: browse (a static HTML neuron browser for a scan or hunt run)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import LazyProgress, console, parse_int_list


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""

    @app.command("browse")
    def browse(
        run: Path = typer.Argument(Path("runs/scan"), help="Run folder of a scan or hunt"),
        out: Path = typer.Option(None, "--out", "-o", help="Output folder [default: RUN/browser]"),
        layers: str = typer.Option(None, help="Layers to give pages, e.g. '0,5,10-12' [default: all]"),
        examples: int = typer.Option(None, "--examples", help="Top examples shown per neuron [default: all kept]"),
    ) -> None:
        """Write an HTML neuron browser: an index of the run's layers and strongest neurons, and one page per
        layer with every neuron's statistics, histogram and top examples (self-contained, works offline)."""
        from ..report.browser import build_browser

        with LazyProgress("writing pages") as progress:
            index = build_browser(run, out, layers=parse_int_list(layers, "--layers"),
                                  examples_per_neuron=examples, progress=progress)
        console.print(f"Wrote [bold]{index}[/] (open it in a browser; one page per layer beside it)")
