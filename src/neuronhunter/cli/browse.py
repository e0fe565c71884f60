"""CLI command: browse (a static, compact HTML neuron browser for a scan or hunt run)."""

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
        examples: int = typer.Option(None, "--examples", help="Exemplars per neuron and group (top, bottom, each "
                                     "quantile band) [default: all the scan kept]"),
    ) -> None:
        """Write a static neuron browser (no server needed, works offline and from disk): the run's layers and
        strongest neurons, search over every neuron, and a page per neuron (statistics, histogram, exemplars,
        explanations, claims, logit attribution) with a deep link (index.html#L20.N882). Each layer's data is
        loaded only when one of its pages opens."""
        from ..report.browser import browser_size, build_browser

        with LazyProgress("writing the browser") as progress:
            index = build_browser(run, out, layers=parse_int_list(layers, "--layers"),
                                  examples_per_neuron=examples, progress=progress)
        size = browser_size(index.parent) / 1e6
        console.print(f"Wrote [bold]{index}[/] ({size:.1f} MB with its data; open it in a browser, a neuron "
                      "directly with #L<layer>.N<neuron>)")
