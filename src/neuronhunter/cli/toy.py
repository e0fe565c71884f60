"""CLI commands: ``toy monopoly`` and ``toy tms``, the superposition lab (thin wrappers over :mod:`neuronhunter.toy`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError

toy_app = typer.Typer(
    name="toy",
    help="Superposition lab: toy models where the ground truth is known (mono-to-poly dynamics, Elhage et al. TMS).",
    no_args_is_help=True,
)


def _config(cls: Any, **fields: Any) -> Any:
    """Build a pydantic config, turning validation errors into one-line ConfigErrors."""
    from pydantic import ValidationError

    try:
        if hasattr(cls, "from_preset") and "preset" in fields:
            preset = fields.pop("preset")
            return cls.from_preset(preset, **fields)
        return cls(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        msgs = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(msgs) from None


def _progress_callback(progress: Any) -> Any:
    tasks: dict[str, Any] = {}

    def update(description: str, completed: int, total: int) -> None:
        key = "main"
        if key not in tasks:
            tasks[key] = progress.add_task(description, total=total)
        progress.update(tasks[key], description=description, completed=completed, total=total)

    return update


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


@toy_app.command("monopoly")
def monopoly(
    out: Path = typer.Option(Path("runs/toy-monopoly"), "--out", "-o", help="Run folder."),
    seeds: int = typer.Option(
        5, "--seeds", help="Number of seeds (base-seed, base-seed+1, ...); one proves nothing."
    ),
    base_seed: int = typer.Option(0, "--base-seed", help="First seed."),
    epochs: int = typer.Option(20, "--epochs", help="Epochs of phase 1 (orientation task)."),
    phase2_epochs: int = typer.Option(30, "--phase2-epochs", help="Epochs of phase 2 (XOR task)."),
    hidden: int = typer.Option(10, "--hidden", help="Hidden ReLU neurons."),
    n_train: int = typer.Option(5000, "--n-train", help="Training images per seed."),
    n_test: int = typer.Option(1000, "--n-test", help="Test images per seed (CRS is measured on these)."),
    noise: float = typer.Option(0.1, "--noise", help="Std of the Gaussian pixel noise."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    poly_threshold: float = typer.Option(0.3, "--poly-threshold", help="CRS below this is polysemantic."),
    h12_states: str = typer.Option(
        "stratified",
        "--h12-states",
        help="Neuron states compared in H1/H2: stratified, pooled, phase1_end, phase2_end.",
    ),
    png_samples: int = typer.Option(16, "--png-samples", help="Training images saved as PNG under samples/."),
    checkpoint_every_epoch: bool = typer.Option(
        False, "--checkpoint-every-epoch", help="Also save every epoch."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG figures."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    threads: int = typer.Option(
        1, "--threads", help="CPU threads for torch (0 = torch's default); tiny model."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in --out."),
) -> None:
    """Mono-to-poly weight dynamics: train on orientation, then XOR; test H1-H3 over several seeds."""
    from ..toy.monopoly import MonopolyConfig, run_monopoly
    from .common import console, progress_bar

    config = _config(
        MonopolyConfig,
        out=out,
        seeds=seeds,
        base_seed=base_seed,
        epochs_phase1=epochs,
        epochs_phase2=phase2_epochs,
        hidden=hidden,
        n_train=n_train,
        n_test=n_test,
        noise=noise,
        batch_size=batch_size,
        lr=lr,
        poly_threshold=poly_threshold,
        h12_states=h12_states,
        png_samples=png_samples,
        checkpoint_every_epoch=checkpoint_every_epoch,
        plots=plots,
        device=device,
        threads=threads,
        overwrite=overwrite,
    )
    with progress_bar() as progress:
        summary = run_monopoly(config, _progress_callback(progress))

    from rich.table import Table

    acc = summary["accuracy"]
    console.print(
        f"test accuracy: phase 1 {acc['phase1']['test']['mean']:.3f} ± {_fmt(acc['phase1']['test']['std'], '.3f')}, "
        f"phase 2 (XOR) {acc['phase2']['test']['mean']:.3f} ± {_fmt(acc['phase2']['test']['std'], '.3f')}"
    )
    table = Table(title=f"Hypotheses over {len(summary['seeds'])} seeds")
    for col in ("", "statement", "per-seed value mean ± std", "p (t)", "p (sign)", "verdict"):
        table.add_column(col)
    for key in ("H1", "H2", "H3"):
        h = summary["hypotheses"][key]
        table.add_row(
            key,
            h["statement"],
            f"{_fmt(h['mean'], '+.4g')} ± {_fmt(h['std'], '.3g')} (n={h['n_seeds']})",
            _fmt(h["p"]),
            _fmt(h["sign_p"]),
            h["verdict"],
        )
    console.print(table)
    console.print(f"wrote {config.out}")


@toy_app.command("tms")
def tms(
    preset: str = typer.Option("five-in-two", "--preset", "-p", help="five-in-two or twenty-in-five."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/toy-tms-<preset>)."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (default 10000)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size (default 1024)."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 1e-3)."),
    replicates: int | None = typer.Option(None, "--replicates", "--seeds", help="Instances per sparsity."),
    sparsities: str | None = typer.Option(
        None, "--sparsities", help="Comma-separated sparsities, e.g. 0,0.9,0.99."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation and data."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG figures."),
    restarts: int | None = typer.Option(
        None, "--restarts", help="Candidates per instance; the best is kept."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    threads: int = typer.Option(
        1, "--threads", help="CPU threads for torch (0 = torch's default); tiny model."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in --out."),
) -> None:
    """Toy Models of Superposition (Elhage et al. 2022): norms, interference and dimensionality per feature."""
    from ..toy.tms import TMSConfig, run_tms
    from .common import console, progress_bar

    sp = None
    if sparsities:
        try:
            sp = [float(s) for s in sparsities.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--sparsities must be numbers like 0,0.9,0.99, got {sparsities!r}") from None
    config = _config(
        TMSConfig,
        preset=preset,
        out=out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        replicates=replicates,
        sparsities=sp,
        seed=seed,
        restarts=restarts,
        plots=plots,
        device=device,
        threads=threads,
        overwrite=overwrite,
    )
    with progress_bar() as progress:
        summary = run_tms(config, _progress_callback(progress))

    from rich.table import Table

    table = Table(title=f"TMS {preset}: n={summary['n_features']} features in m={summary['n_hidden']} dims")
    for col in ("sparsity", "dims/feature", "represented", "loss"):
        table.add_column(col, justify="right")
    for s, row in summary["per_sparsity"].items():
        table.add_row(
            s,
            f"{row['dims_per_feature_mean']:.3f}",
            f"{row['n_represented_mean']:.1f}",
            f"{row['loss_mean']:.3g}",
        )
    console.print(table)
    checks = summary["checks"]
    d = checks["dense"]
    console.print(
        f"dense (S=0) keeps the top-m features orthogonally: {d['verdict']} ({d['n_passed']}/{d['n_checked']})"
    )
    if "pentagon" in checks:
        p = checks["pentagon"]
        console.print(
            f"pentagon at S >= 0.9: {p['verdict']} ({p['n_pentagon']}/{p['n_checked']} instances; by sparsity "
            f"{p['by_sparsity']}; norms {p['pentagon_norm_range']}, neighbouring angles {p['pentagon_angle_range']}°)"
        )
    dim = checks["dimensionality"]
    console.print(
        f"dimensionalities within ±{dim['tolerance']} of a paper fraction: {_fmt(dim['share_near_fraction'], '.0%')} "
        f"of {dim['n_represented']} represented features (uniform spread would give "
        f"{dim['share_expected_if_uniform_0.2_1']:.0%}); counts {dim['counts_near_fraction']}"
    )
    console.print(f"wrote {config.run_dir()}")


def register(app: typer.Typer) -> None:
    """Add the ``toy`` command group to ``app``."""
    app.add_typer(toy_app, name="toy")
