"""CLI commands: ``neuronhunter selfreport run|select|dataset|example``.

Thin wrappers over :mod:`neuronhunter.selfreport`: a config file (or ``example``, the bundled one) plus
``--set key.sub=value`` overrides, a progress bar on stderr and a summary table on stdout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from .common import console, progress_bar

CONFIG_HELP = "Experiment config (.yaml/.json), or 'example' for the bundled example."
SET_HELP = "Override a config value, e.g. --set training.epochs=1 (repeatable; values parsed as YAML)."


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """A ``(description, done, total)`` callback drawing one rich progress task per description."""
    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=done, total=total)

        yield update


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _print_target(report: dict[str, Any]) -> None:
    from rich.table import Table

    test = report["test"]
    table = Table(title=f"{report['model']} {report['neuron']}: held-out test tokens "
                        f"({report['dataset']['test_tokens']}), {report['predictor']['head']} head, "
                        f"unfreeze {report['unfreeze']}")
    cols = ["pearson", "spearman", "r2", "mae", "accuracy", "macro_f1"]
    table.add_column("predictor / baseline")
    for c in cols:
        table.add_column(c, justify="right")
    for name in ("predictor", "mean", "token", "probe"):
        if name in test:
            label = {"token": "token baseline", "mean": "mean baseline", "probe": "linear probe (frozen)"}.get(name, name)
            table.add_row(label, *(_fmt(test[name].get(c)) for c in cols))
    console.print(table)
    drift = report.get("drift")
    if drift:
        console.print(f"target neuron drift on test: mean |change| {_fmt(drift['mean_abs_change'])} "
                      f"({_fmt(drift['relative_change'])} std), before/after r = {_fmt(drift['pearson_before_after'])}")


def register(app: typer.Typer) -> None:
    """Add the ``selfreport`` command group to ``app``."""
    group = typer.Typer(help="Neuron self-report: train the model to predict its own neuron activations.",
                        no_args_is_help=True)

    @group.command("run")
    def run(
        config: str = typer.Argument(..., help=CONFIG_HELP),
        out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: the config's out)."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoints."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the folder."),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Run a whole experiment: select neurons, record activations, train, evaluate, plot."""
        from ..selfreport import load_config, run_selfreport

        cfg = load_config(config, overrides)
        with _progress() as update:
            summary = run_selfreport(cfg, out=out, overwrite=overwrite, resume=resume, progress=update)
        for report in summary["targets"]:
            _print_target(report)
        console.print(f"wrote {summary['out']} in {summary['elapsed_s']:.0f} s")

    @group.command("select")
    def select(
        config: str = typer.Argument(..., help=CONFIG_HELP),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
        top: int = typer.Option(10, "--top", help="Candidates to show."),
    ) -> None:
        """Only select target neurons and show why (writes nothing)."""
        from rich.table import Table

        from ..models import load_model
        from ..selfreport import load_config, select_neurons

        cfg = load_config(config, overrides)
        hooked = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        with _progress() as update:
            sel = select_neurons(cfg, hooked, update)
        table = Table(title=f"{hooked.name}: {sel.info.get('reason', '')}")
        cols = [c for c in ("rank", "layer", "neuron", "score", "mean", "std", "max", "frac_active", "doc_frac_active",
                            "kurtosis", "verdict", "top_category") if c in sel.candidates.columns]
        for c in cols:
            table.add_column(c, justify="right")
        chosen = {(n.layer, n.neuron) for n in sel.neurons}
        for row in sel.candidates.head(top).to_dict(orient="records"):
            style = "bold green" if (row["layer"], row["neuron"]) in chosen else None
            table.add_row(*(_fmt(row.get(c)) for c in cols), style=style)
        console.print(table)
        console.print("chosen: " + ", ".join(str(n) for n in sel.neurons))

    @group.command("dataset")
    def dataset(
        config: str = typer.Argument(..., help=CONFIG_HELP),
        out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: the config's out)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in the folder."),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Select neurons and write their activation datasets (continue later with `run --resume`)."""
        from ..selfreport import load_config, run_selfreport

        cfg = load_config(config, overrides)
        with _progress() as update:
            summary = run_selfreport(cfg, out=out, overwrite=overwrite, progress=update, stop_after="dataset")
        for name, counts in summary["datasets"].items():
            parts = ", ".join(f"{s}: {c['tokens']} tokens / {c['documents']} docs" for s, c in counts.items())
            console.print(f"{name}: {parts}")
        console.print(f"wrote {summary['out']} (an unfinished run: `neuronhunter selfreport run` with the same "
                      "--out and --resume trains and evaluates on these datasets)")

    @group.command("example")
    def example() -> None:
        """Print the bundled example config (copy it to start your own)."""
        from ..selfreport import example_config_path

        typer.echo(example_config_path().read_text(encoding="utf-8"), nl=False)

    app.add_typer(group, name="selfreport")
