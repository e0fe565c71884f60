"""CLI command: export (a finished run's Parquet tables as CSV, JSON or JSON Lines)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""

    @app.command("export")
    def export(
        run: Path = typer.Argument(..., help="A complete run folder"),
        fmt: str = typer.Option("csv", "--format", "-f", help="csv, json or jsonl"),
        tables: str = typer.Option(None, "--tables", help="Comma-separated tables, e.g. 'neurons,concepts' "
                                   "[default: all of the run's tables]"),
        out: Path = typer.Option(None, "--out", "-o", help="Folder for the files [default: RUN/export]"),
    ) -> None:
        """Convert a run's tables (Parquet) to CSV, JSON or JSON Lines, streamed (any table size)."""
        from ..report.tables import export_run

        names = [t.strip() for t in tables.split(",") if t.strip()] if tables else None
        paths = export_run(run, fmt, tables=names, out=out)
        for p in paths:
            console.print(f"Wrote [bold]{p}[/] ({p.stat().st_size / 1e6:.1f} MB)")
