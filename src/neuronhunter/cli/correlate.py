"""CLI: ``neuronhunter correlate RUN`` — neurons (or features) that fire together."""

from __future__ import annotations

import typer

from .common import LazyProgress, console, parse_int_list


def register(app: typer.Typer) -> None:
    @app.command("correlate")
    def correlate(
        run: str = typer.Argument(..., help="A scan, hunt or feature run folder"),
        layers: str = typer.Option(None, help="Layers [default: the run's]"),
        max_tokens: int = typer.Option(50_000, help="Counted tokens to read (the run's corpus and windowing)"),
        top: int = typer.Option(10, help="Correlates kept per unit"),
        threshold: float = typer.Option(0.5, help="Clusters: mean |r| inside a cluster at least this"),
        min_size: int = typer.Option(2, help="Clusters: at least this many units"),
        sketch_mb: float = typer.Option(64.0, help="Memory for cross-layer pairs (CountSketch); 0 = none"),
        split: str = typer.Option(None, help="Side of the document split [default: the run's]"),
    ) -> None:
        """Exact co-activation of every pair of units within a layer, sketched across layers; writes
        correlations.parquet (top correlates per unit) and clusters.parquet (with shared explanations) into
        RUN."""
        from ..circuits.correlations import correlate_run

        with LazyProgress("correlating (tokens)") as progress:
            table, clusters, summary = correlate_run(
                run, layers=parse_int_list(layers, "--layers"), max_tokens=max_tokens, top=top, threshold=threshold,
                min_size=min_size, sketch_mb=sketch_mb, split=split, progress=progress)
        console.print(f"{summary['tokens']:,} tokens, layers {summary['layers']}: {summary['clusters']} clusters "
                      f"holding {summary['units_in_clusters']} units (mean |r| >= {threshold})")
        for row in clusters.head(10).itertuples():
            what = row.explanation or row.claim_category or ", ".join(row.shared_tokens[:3])
            console.print(f"  L{row.layer} cluster {row.cluster}: {row.size} units, mean |r| "
                          f"{row.mean_abs_correlation:.2f}: {what}")
        console.print(f"Wrote [bold]{run}[/] (correlations.parquet, clusters.parquet)")
