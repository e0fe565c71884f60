"""The ``neuronhunter`` command line: thin typer commands over the Python API.

Each command group lives in its own module with a ``register(app)`` function. Errors caused by user input are
:class:`~neuronhunter.errors.NeuronHunterError` and are printed as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from ..errors import NeuronHunterError

app = typer.Typer(
    name="neuronhunter",
    help="Neuron-level mechanistic interpretability: scan, hunt, verify, self-report, superposition lab.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" must show, not be read as rich markup
)

# Command modules, each owning one group of commands (see their register functions).
COMMAND_MODULES = ("scan", "hunt", "explain", "verify", "circuits", "selfreport", "toy", "browse", "export", "serve",
                   "features", "correlate", "circuit")

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.{_name}").register(app)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only log warnings and errors."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False, show_time=False)])
    for noisy in ("transformers", "httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _interrupted() -> int:
    typer.echo("error: interrupted; no run folder was left looking complete "
               "(an interrupted scan or hunt continues with --resume)", err=True)
    return 130


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's ``ClickException`` and ``Abort`` classes: typer >= 0.16 raises those of its bundled copy of click
    (``typer._click``), older typer those of ``click`` itself."""
    usage: list[type] = []
    abort: list[type] = [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        abort.extend([mod.Abort] if hasattr(mod, "Abort") else [])
    return tuple(usage), tuple(abort)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning user errors into one clean line on stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # without standalone mode typer returns exit codes instead of exiting (Ctrl-C becomes 130)
        rv = app(args=argv, standalone_mode=False)
        if rv == 130:
            return _interrupted()
        if isinstance(rv, int):
            return rv
    except NeuronHunterError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except ModuleNotFoundError as exc:  # an optional dependency: say which extra installs it
        from ..extras import missing_message

        hint = missing_message(exc)
        if hint is None:
            if os.environ.get("NEURONHUNTER_DEBUG"):
                raise
            hint = f"{type(exc).__name__}: {exc} (set NEURONHUNTER_DEBUG=1 for a traceback)"
        typer.echo(f"error: {hint}", err=True)
        return 2 if hint.startswith("this needs") else 1
    except (typer.Exit, SystemExit) as exc:  # --help, explicit exits
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except Exception as exc:  # click usage errors and the like
        usage, abort = _click_exceptions()
        if isinstance(exc, usage):  # unknown command or option, bad option value: one line, exit 2
            hint = " (see --help)" if exc.exit_code == 2 else ""
            typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            return exc.exit_code
        if isinstance(exc, abort):  # click turns Ctrl-C into Abort
            return _interrupted()
        if os.environ.get("NEURONHUNTER_DEBUG"):
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc} (set NEURONHUNTER_DEBUG=1 for a traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
