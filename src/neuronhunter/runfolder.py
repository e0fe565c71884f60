"""The run-folder lifecycle: prepare, overwrite, resume, manifest, swap. The only module that deletes anything.

A run folder (``runs/scan``, ``runs/hunt``, a toy or self-report run) is written in four steps::

    RunFolder(out).begin(overwrite=..., resume=...)   -> the working folder  <parent>/.<name>.partial/
        ... the command writes its files there (a checkpoint, tables, plots) ...
    RunFolder.commit(manifest)                         -> manifest.json written last, then swapped into <out>

Rules (tested in ``tests/unit/test_runfolder.py``):

* **The tool deletes only what it owns.** A folder is a neuronhunter run when it holds a ``manifest.json`` with a
  ``kind``, a scan checkpoint or the owner marker :data:`MARKER`. ``--overwrite`` replaces a folder only when it
  is empty or is such a run *and* every entry in it is a name the tool writes (:data:`OWNED`); anything else is
  refused with one line naming the folder and the foreign entries, and nothing is touched. The current folder,
  its ancestors, the home folder and the filesystem root are never replaced.
* **An old result stays readable until its replacement is complete.** The new run is written beside the old one
  (the ``.partial`` folder) and swapped in only after its manifest is written: the old folder is renamed aside,
  the new one renamed into place, then the old one removed. A crash at any point leaves either the old complete
  run or the new complete run at ``out`` (a crash between the two renames is repaired by the next ``begin``).
* **Resume continues the interrupted run in its ``.partial`` folder** and is refused when there is nothing to
  resume. Whether the inputs match (config, corpus, model weights) is the command's check (the scan compares
  fingerprints, :mod:`neuronhunter.stats.state`).
* **In-place updates** of a complete run (``verify`` adding columns, ``hunt --rescore``) go through
  :func:`updating`: the manifest is moved aside first (the run reads as incomplete while tables change) and
  written back, updated, at the end.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RunDirError
from .io import MANIFEST, UPDATING, read_json, write_json

log = logging.getLogger(__name__)

MARKER = ".neuronhunter-run"  # owner marker in every folder the tool creates
CHECKPOINT = ".checkpoint.pt"
PARTIAL_SUFFIX = ".partial"

# Every top-level name a neuronhunter command writes into a run folder (glob patterns). One list, here: a command
# that writes a new kind of file into run folders adds its name here, or --overwrite will refuse such folders.
OWNED: tuple[str, ...] = (
    MANIFEST, MARKER, CHECKPOINT, UPDATING, ".*.tmp", "config.json", "stats.pt",
    # scan / hunt tables (Parquet + optional exports)
    "neurons.*", "examples.*", "concepts.*", "top_neurons.*", "directions.*", "hunt.json", "lexicon.json",
    # analyses added to a run later
    "logits.*", "verification.*", "claims.*", "explanations.*", "heads.*", "induction_curve.*",
    "correlations.*", "clusters.*", "export", "plots", "browser", "interpret", "ablations", "probes", "patching",
    "circuit.json", "edges.*",
    "shards", "verify", "explain",
    # toy lab and self-report runs
    "summary.json", "metrics", "metrics.json", "checkpoints", "features.csv", "instances.csv",
    "weights.safetensors", "samples", "selection.json", "candidates.*", "predictions.*", "targets", "logs", "*.html", "*.png",
)


def owned(name: str) -> bool:
    """Whether a top-level entry ``name`` of a run folder is something the tool writes."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED)


def _manifest_kind(folder: Path) -> str | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    kind = data.get("kind") or data.get("command") if isinstance(data, dict) else None
    return str(kind) if kind else None


def is_run_folder(folder: Path) -> bool:
    """A folder the tool made: a manifest with a kind, a scan checkpoint, the owner marker or an in-place update."""
    return folder.is_dir() and (_manifest_kind(folder) is not None or (folder / CHECKPOINT).is_file()
                                or (folder / MARKER).is_file() or (folder / UPDATING).is_file())


def is_complete(folder: Path) -> bool:
    return _manifest_kind(folder) is not None


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` the tool does not own (sorted)."""
    return sorted(p.name for p in folder.iterdir() if not owned(p.name))


def _protected(path: Path) -> bool:
    """The current folder, its ancestors, the home folder and the root are never replaced."""
    here = Path.cwd().resolve()
    target = path.resolve()
    return target == here or target in here.parents or target == Path.home().resolve() or target.parent == target


def _describe(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def remove_owned(folder: Path) -> bool:
    """Delete the entries of ``folder`` the tool owns; remove the folder if nothing else is left.

    Returns whether the folder is gone. Foreign entries (which :meth:`RunFolder.begin` refuses to overwrite, but
    which a user may have added since) are left where they are.
    """
    if not folder.exists():
        return True
    for child in folder.iterdir():
        if not owned(child.name):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    try:
        folder.rmdir()
        return True
    except OSError:
        log.warning("left %s in place: it holds files neuronhunter did not write (%s)", folder,
                    _describe(foreign_entries(folder)))
        return False


class RunFolder:
    """One run folder ``out`` and its working copy ``<parent>/.<name>.partial`` (see the module docstring).

    Args:
        out: the run folder the user asked for.
        kind: what writes it (``scan``, ``hunt``, ``toy monopoly``, ...), recorded in the owner marker.
    """

    def __init__(self, out: str | os.PathLike[str], kind: str = "run") -> None:
        self.out = Path(out)
        self.kind = kind
        self.partial = self.out.parent / f".{self.out.name}{PARTIAL_SUFFIX}"
        self.resumed = False

    @property
    def work(self) -> Path:
        """Where the command writes (the ``.partial`` folder)."""
        return self.partial

    # ------------------------------------------------------------------------------------------------ begin
    def check(self, *, overwrite: bool = False, resume: bool = False) -> None:
        """Refuse what :meth:`begin` would refuse, without changing anything (commands call it before loading
        a model, so bad options fail fast)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunDirError(f"{out} exists and is not a folder; choose another --out")
        if _protected(out):
            raise RunDirError(f"{out} is the current folder, one of its parents or your home folder; "
                              "choose a new folder for --out")
        if out.is_dir() and any(out.iterdir()):
            if not is_run_folder(out):
                raise RunDirError(f"{out} is not empty and is not a neuronhunter run folder; nothing was changed "
                                  "(choose another --out)")
            if is_complete(out) and not (overwrite or resume):
                raise RunDirError(f"{out} already holds a complete run; pass --overwrite or choose another --out")
            foreign = foreign_entries(out)
            if foreign and overwrite:
                raise RunDirError(f"{out} holds files neuronhunter did not write ({_describe(foreign)}); "
                                  "--overwrite refuses to replace it: move them or choose another --out")
        if self.partial.exists() and not is_run_folder(self.partial):
            raise RunDirError(f"{self.partial} exists and is not a neuronhunter working folder; move it away")
        if resume:
            if not self.partial.exists() and not self._legacy_checkpoint():
                if is_complete(out):
                    raise RunDirError(f"{out} is a complete run: nothing to resume (use --overwrite to run it again)")
                raise RunDirError(f"nothing to resume for {out}: no interrupted run was found")
        elif not overwrite and self.partial.exists() and not is_complete(self.partial):
            raise RunDirError(f"an interrupted run of {out} is in {self.partial}; pass --resume to continue it "
                              "or --overwrite to start again")
        elif not overwrite and self._legacy_checkpoint():
            raise RunDirError(f"{out} holds an interrupted run; pass --resume to continue it or --overwrite to "
                              "start again")

    def begin(self, *, overwrite: bool = False, resume: bool = False) -> Path:
        """Prepare the working folder and return it (see the module docstring for what is refused)."""
        self._repair()
        self.check(overwrite=overwrite, resume=resume)
        if resume:
            if not self.partial.exists():  # an interrupted run of an older release: its checkpoint sat in out
                self._create()
                os.replace(self.out / CHECKPOINT, self.partial / CHECKPOINT)
            self.resumed = True
            return self.partial
        if self.partial.exists():  # overwrite: an interrupted (or complete but not swapped) working copy of ours
            shutil.rmtree(self.partial)
        self._create()
        return self.partial

    def _legacy_checkpoint(self) -> bool:
        return (self.out / CHECKPOINT).is_file() and not is_complete(self.out)

    def _create(self) -> None:
        self.partial.mkdir(parents=True)
        write_json(self.partial / MARKER, {"kind": self.kind, "out": str(self.out), "pid": os.getpid(),
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _repair(self) -> None:
        """Finish a swap a crash interrupted: a complete working copy whose target is gone is moved into place."""
        if not self.out.exists() and self.partial.is_dir() and is_complete(self.partial):
            os.replace(self.partial, self.out)
        for old in self.out.parent.glob(f".{self.out.name}.old-*") if self.out.parent.is_dir() else ():
            if is_run_folder(old) and self.out.exists():
                remove_owned(old)

    # ------------------------------------------------------------------------------------------------ commit
    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest into the working folder (last), then swap it into place; return ``out``."""
        if not self.partial.is_dir():
            raise RunDirError(f"{self.partial} is gone; the run cannot be completed")
        write_json(self.partial / MANIFEST, manifest)
        (self.partial / MARKER).unlink(missing_ok=True)
        self.swap()
        return self.out

    def swap(self) -> None:
        """Move the complete working folder into place (the previous run, if any, is removed afterwards)."""
        out = self.out
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(self.partial, out)
        if old is not None:
            remove_owned(old)

    def discard(self) -> None:
        """Remove the working folder (after a failure caused by bad input: nothing in it is worth resuming)."""
        if self.partial.is_dir() and is_run_folder(self.partial):
            remove_owned(self.partial)


@contextlib.contextmanager
def updating(run: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Change a complete run in place: yields its manifest (a dict the caller may update).

    The manifest is moved aside first, so while tables are rewritten the run reads as incomplete; it is written
    back (with the caller's changes) when the block succeeds. After a crash the run stays marked incomplete, and
    its saved manifest (:data:`UPDATING`) tells :func:`~neuronhunter.io.require_run` what was interrupted.
    """
    run = Path(run)
    manifest_path, saved = run / MANIFEST, run / UPDATING
    if saved.exists() and not manifest_path.exists():
        raise RunDirError(f"an earlier update of {run} was interrupted; rerun the command that made it "
                          f"(its manifest was kept as {saved.name})")
    manifest = read_json(manifest_path)
    os.replace(manifest_path, saved)
    yield manifest
    write_json(manifest_path, manifest)
    saved.unlink(missing_ok=True)


def load_marker(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
