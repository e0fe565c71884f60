"""User-facing errors.

Every error a user can cause by bad input (unknown model, empty corpus, malformed config, layer out of range, ...)
is raised as a :class:`NeuronHunterError` subclass with a one-line message. The CLI catches these and prints the
message on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations


class NeuronHunterError(Exception):
    """Base class for errors caused by user input or the environment (printed as one line by the CLI)."""

    exit_code: int = 2


class ConfigError(NeuronHunterError):
    """A configuration file or option is malformed or out of range."""


class ModelLoadError(NeuronHunterError):
    """A model could not be found, reached or loaded."""


class CorpusError(NeuronHunterError):
    """A corpus is missing, empty or unreadable."""


class RunDirError(NeuronHunterError):
    """A run folder is missing, incomplete or would be overwritten."""


class SiteError(NeuronHunterError):
    """A hook site is malformed or does not exist in this model (e.g. layer out of range)."""
