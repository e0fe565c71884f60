"""Validated run configurations (pydantic, unknown keys rejected).

A config can come from the CLI options, a YAML/JSON file (``--config FILE``) or Python. Files are validated with
the same models; any error becomes a one-line :class:`~neuronhunter.errors.ConfigError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScanConfig(StrictModel):
    """Everything a scan needs. Defaults scan the embedded model on the bundled corpus."""

    model: str = Field("smollm2-135m", description="alias, hub id, local folder or .gguf file")
    corpus: str | None = Field(None, description="corpus spec (None = bundled corpus; see neuronhunter.data.corpus)")
    text_field: str = Field("text", description="text field/column for JSONL and Parquet corpora")
    out: str = Field("runs/scan", description="run folder")
    layers: list[int] | None = Field(None, description="layers to scan (None = all)")
    neurons_per_layer: int | None = Field(None, ge=1, description="scan only the first N neurons of each layer")
    top_k: int = Field(20, ge=1, description="top activating windows kept per neuron")
    context_length: int = Field(128, ge=2, le=8192, description="tokens per window, BOS included")
    batch_size: int = Field(16, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="stop after this many corpus tokens")
    prepend_bos: bool = Field(True, description="prepend the model's BOS token to every window")
    include_first: bool = Field(False, description="count position 0 (BOS/first token) in statistics and top-k")
    threshold: float = Field(0.0, description="a neuron is active on a token when its activation > threshold")
    hist_range: tuple[float, float] | None = Field(None, description="one histogram range for every neuron; None: "
                                                   "each neuron's own range, calibrated on the first windows")
    hist_bins: int = Field(64, ge=1, le=10000, description="histogram bins (plus an underflow and an overflow bin)")
    calibration_windows: int = Field(16, ge=1, description="windows read before the scan to fix each neuron's "
                                     "histogram range and exemplar bands")
    band_samples: int = Field(3, ge=1, le=64, description="exemplar windows sampled per band of activation and "
                              "direction")
    context_tokens: tuple[int, int] = Field((12, 4), description="tokens of context left/right of an example")
    concepts: str | None = Field(None, description="concept lexicon file (YAML/JSON); None = no concept statistics")
    label_last_token_only: bool = Field(False, description="label only the last token of a multi-token word")
    case_sensitive: bool = Field(False)
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    compile_stats: bool = Field(True, description="fuse the per-batch statistics with torch.compile (falls back "
                                "to eager PyTorch where compiling is not possible)")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0, description="save a resumable checkpoint every N batches (0 = never)")
    formats: list[str] = Field(["parquet"], description="formats of the big tables (parquet, plus csv/json on "
                               "request; `neuronhunter export` converts a finished run)")
    on_bad_document: str = Field("fail", pattern="^(fail|skip)$", description="a document that cannot be read: "
                                 "fail (one line naming file and line) or skip it (counted in the manifest)")
    split: str = Field("all", pattern="^(all|train|heldout)$", description="which documents to read: all, or the "
                       "train / held-out side of the document split (neuronhunter.data.split)")
    heldout_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="expected share of documents held out")
    split_seed: int = Field(0, description="seed of the document split")
    engine: str = Field("local", pattern="^(local|ray)$", description="local: one process; ray: shards of the "
                        "corpus scanned by Ray actors and merged (neuronhunter.distributed); the tables are the same")
    workers: int | None = Field(None, ge=1, description="Ray actors (default: one per GPU on CUDA, else one per "
                                "node)")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: start a local Ray)")
    shards: int = Field(16, ge=1, le=65536, description="shards of a Ray scan: contiguous runs of its batches, "
                        "the unit of resume")
    shard_store: str | None = Field(None, description="where a Ray scan writes shard states: a folder or an fsspec "
                                    "URI (default: the run folder's shards/)")

    @model_validator(mode="after")
    def _check(self) -> ScanConfig:
        if self.hist_range is not None and not self.hist_range[1] > self.hist_range[0]:
            raise ValueError("hist_range must be (low, high) with high > low")
        bad = set(self.formats) - {"parquet", "csv", "json"}
        if bad or "parquet" not in self.formats:
            raise ValueError("formats must include parquet and may add csv and json")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise ValueError("layers must be non-negative")
        return self

    def document_split(self):  # -> DocumentSplit (import kept local: config stays import-light)
        """The document split these settings describe (see :mod:`neuronhunter.data.split`)."""
        from .data.split import DocumentSplit

        return DocumentSplit(self.heldout_fraction, self.split_seed)


def format_validation_error(exc: ValidationError, source: str, *, unknown: str = "unknown key") -> str:
    """One line for a pydantic error: ``source: where: message (and N more problems)``.

    ``unknown`` is how an unknown (forbidden extra) key is called.
    """
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "config"
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = unknown
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Build ``model`` from ``data``, turning validation errors into one-line ConfigErrors."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping from a file (clear one-line errors, with the line of a syntax error)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON at line {exc.lineno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path} is not valid YAML{line}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of options at the top level")
    return data


def load_config(config_cls: type[M], path: str | Path | None = None, /, **overrides: Any) -> M:
    """Load ``config_cls`` from an optional file, then apply non-None ``overrides`` (CLI options win)."""
    data = read_config_file(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate(config_cls, data, str(path) if path is not None else "options")
