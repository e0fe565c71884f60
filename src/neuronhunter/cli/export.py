"""CLI command: export (a finished run's Parquet tables as CSV, JSON or JSON Lines, or in Neuronpedia's layout)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console


def register(app: typer.Typer) -> None:
    """Add this module's commands to app."""

    @app.command("export")
    def export(
        run: Path = typer.Argument(..., help="A complete run folder"),
        fmt: str = typer.Option("csv", "--format", "-f", help="csv, json, jsonl or neuronpedia"),
        tables: str = typer.Option(None, "--tables", help="Comma-separated tables, e.g. 'neurons,concepts' "
                                   "[default: all of the run's tables]"),
        out: Path = typer.Option(None, "--out", "-o", help="Folder for the files [default: RUN/export, "
                                 "RUN/export/neuronpedia for neuronpedia]"),
        model_id: str = typer.Option(None, "--model-id", help="neuronpedia: the model's id [default: from the "
                                     "run's model name]"),
        source_set: str = typer.Option("neuronhunter-mlp", "--source-set", help="neuronpedia: the source set; "
                                       "layer L is the source 'L-<source set>'"),
        layers: str = typer.Option(None, "--layers", help="neuronpedia: only these layers, e.g. '0,5,10-12'"),
        examples: int = typer.Option(20, "--examples", help="neuronpedia: exemplars per neuron and group (top, "
                                     "each positive quantile band)"),
    ) -> None:
        """Convert a run's tables (Parquet) to CSV, JSON or JSON Lines, streamed (any table size); or write the
        run in Neuronpedia's export layout (--format neuronpedia: features, activations with every token's value
        recomputed by the run's model, explanations and their scores; see docs/serve.md)."""
        if fmt == "neuronpedia":
            from ..report.neuronpedia import export_neuronpedia
            from .common import LazyProgress, parse_int_list

            with LazyProgress("exporting layers") as progress:
                root = export_neuronpedia(run, out, model_id=model_id, source_set=source_set,
                                          layers=parse_int_list(layers, "--layers"), examples=examples,
                                          progress=progress)
            files = [p for p in root.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files) / 1e6
            console.print(f"Wrote [bold]{root}[/] ({len(files)} files, {size:.1f} MB; Neuronpedia's layout: "
                          "<model>/<layer>-<source set>/{features,activations,explanations}/batch-N.jsonl.gz)")
            return
        from ..report.tables import export_run

        names = [t.strip() for t in tables.split(",") if t.strip()] if tables else None
        paths = export_run(run, fmt, tables=names, out=out)
        for p in paths:
            console.print(f"Wrote [bold]{p}[/] ({p.stat().st_size / 1e6:.1f} MB)")
