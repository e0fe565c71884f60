"""Shared CLI helpers: console, progress bars, option parsing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ConfigError


def _console(stderr: bool = False) -> Console:
    """A rich console; when output is not a terminal (pipes, CI logs) use a wide fixed width, not 80 columns."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=140)


console = _console()
err_console = _console(stderr=True)

T = TypeVar("T")


def progress_bar(transient: bool = False) -> Progress:
    """A rich progress bar for long work (written to stderr so stdout stays parseable)."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress_bar() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def parse_int_list(text: str | None, what: str) -> list[int] | None:
    """Parse ``"0,2,5-7"`` into ``[0, 2, 5, 6, 7]``; ``None``/empty gives ``None``."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ConfigError(f"{what} must be integers like '0,2,5-7', got {text!r}") from None
    return out


class LazyProgress:
    """A progress callback ``(done, total)`` whose bar appears on the first update only.

    Validation errors raised before any work starts then print as one clean line, with no empty bar above them.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress: Progress | None = None
        self.task: int | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.progress is None:
            self.progress = progress_bar()
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total)
        self.progress.update(self.task, completed=done, total=total)

    def __enter__(self) -> LazyProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


# Options shared by the commands that scan (scan, hunt): one definition, one help text.
LayersOpt = Annotated[str | None, typer.Option(help="Layers to scan, e.g. '0,5,10-12' [default: all]")]
NeuronsPerLayerOpt = Annotated[int | None, typer.Option(help="Scan only the first N neurons of each layer")]
TopKOpt = Annotated[int | None, typer.Option(help="Top activating windows per neuron [default: 20]")]
ContextLengthOpt = Annotated[int | None, typer.Option(help="Tokens per window incl. BOS [default: 128]")]
BatchSizeOpt = Annotated[int | None, typer.Option(help="Windows per batch [default: 16]")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Stop after this many corpus tokens")]
ThresholdOpt = Annotated[float | None, typer.Option(help="Active when activation > threshold [default: 0]")]
BosOpt = Annotated[bool | None, typer.Option("--bos/--no-bos", help="Prepend the model's BOS token [default: yes]")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto [default: cpu]")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 [default: float32]")]
CompileOpt = Annotated[bool | None, typer.Option("--compile/--no-compile", help="Fuse the per-batch statistics "
                       "with torch.compile; eager PyTorch if compiling fails [default: compile]")]
FormatsOpt = Annotated[str | None, typer.Option(help="Table formats, e.g. 'parquet,csv' [default: parquet; "
                                                          "'neuronhunter export' converts later]")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a complete run in --out")]
SplitOpt = Annotated[str | None, typer.Option(help="Documents to read: all, train or heldout (by a stable hash of "
                                                    "each document's id) [default: all for scan]")]
HeldoutFractionOpt = Annotated[float | None, typer.Option(help="Expected share of documents held out [default: 0.3]")]
SplitSeedOpt = Annotated[int | None, typer.Option(help="Seed of the document split [default: 0]")]
OnBadDocumentOpt = Annotated[str | None, typer.Option(help="A document that cannot be read: 'fail' (one line naming "
                                                            "file and line) or 'skip' (counted) [default: fail]")]
# The engine options (scan, hunt): where the scan runs, not what it computes (neuronhunter.distributed).
EngineOpt = Annotated[str | None, typer.Option(help="local (one process) or ray (shards of the corpus on Ray "
                                                     "actors, merged; the same tables) [default: local]")]
WorkersOpt = Annotated[int | None, typer.Option(help="Ray workers, each loads the model once [default: one per GPU "
                                                      "on CUDA, else one per node]")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster to join, e.g. 'auto' or "
                                                "'ray://head:10001' [default: start a local Ray]")]
ShardsOpt = Annotated[int | None, typer.Option(help="Shards of a Ray scan (contiguous runs of its batches): the "
                                                     "unit of resume [default: 16]")]
ShardStoreOpt = Annotated[str | None, typer.Option(help="Where a Ray scan writes shard states: a folder or an "
                                                        "fsspec URI such as s3://bucket/path [default: OUT/shards]")]


def engine_options(engine: str | None, workers: int | None, address: str | None, shards: int | None,
                   shard_store: str | None) -> dict[str, object]:
    """The engine options as config fields (None: not given)."""
    return {"engine": engine, "workers": workers, "ray_address": address, "shards": shards,
            "shard_store": shard_store}
