"""The self-report experiment configuration: one validated JSON/YAML file per experiment.

A config has five sections, one per pipeline stage, plus the model and output settings::

    name: smollm2-selective
    model: smollm2-135m
    selection:  {source: scan, layers: [20, 21], criterion: kurtosis, count: 1}
    dataset:    {max_tokens: 6000, context_length: 64, target: token}
    predictor:  {head: regression, read_layer: null, loss: huber}
    training:   {unfreeze: last_k, k: 2, epochs: 4, batch_size: 8}
    evaluation: {probe: true, drift: true, plots: true}

Every section forbids unknown keys (a typo is an error, not a silently ignored option). :func:`load_config` turns
any problem (missing file, YAML syntax, a bad value) into a one-line :class:`~neuronhunter.errors.ConfigError`.
Relative paths (corpus, scan run, output folder) are resolved against the current working directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import format_validation_error
from ..config import read_config_file as read_mapping
from ..errors import ConfigError

EXAMPLE = "example"
_NEURON_RE = re.compile(r"^\s*L?(\d+)\s*[.:/]\s*N?(\d+)\s*$", re.IGNORECASE)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NeuronRef(_Section):
    """One MLP neuron: ``layer`` and ``neuron`` index (also written ``"L20.N123"`` or ``"20:123"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(ge=0)
    neuron: int = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            m = _NEURON_RE.match(value)
            if not m:
                raise ValueError(f"neuron {value!r} must look like 'L20.N123' or '20:123'")
            return {"layer": int(m.group(1)), "neuron": int(m.group(2))}
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return {"layer": value[0], "neuron": value[1]}
        return value

    def __str__(self) -> str:
        return f"L{self.layer}.N{self.neuron}"

    @property
    def slug(self) -> str:
        """Folder-safe name, e.g. ``L20.N123``."""
        return str(self)


class SelectionConfig(_Section):
    """Which neurons to target (the ``NeuronScanner`` stage).

    ``source``: ``explicit`` (the ``neurons`` list), ``scan`` (a small fresh scan of ``layers`` over
    ``scan_tokens`` training-split tokens) or ``run`` (a scan run folder's ``neurons.parquet``).
    Candidates are filtered by ``min_frac_active``/``max_frac_active`` (fraction of tokens with activation above
    ``active_threshold``), ``min_doc_frac_active`` (fraction of scanned documents where it exceeds the threshold
    at least once; fresh scans only), ``verdict`` and ``category`` (run folders after a hunt), then ranked by
    ``criterion``:
    ``variance`` (highest), ``kurtosis`` (highest excess kurtosis: rare large activations) or ``density``
    (lowest fraction active). The best ``count`` neurons are chosen.
    """

    source: Literal["explicit", "scan", "run"] = "scan"
    neurons: list[NeuronRef] = Field(default_factory=list)
    run: str | None = None
    layers: list[int] | None = None
    criterion: Literal["variance", "kurtosis", "density"] = "kurtosis"
    count: int = Field(1, ge=1, le=64)
    verdict: str | None = None
    category: str | None = None
    min_frac_active: float = Field(0.0, ge=0.0, le=1.0)
    max_frac_active: float = Field(1.0, ge=0.0, le=1.0)
    min_doc_frac_active: float = Field(0.0, ge=0.0, le=1.0)
    active_threshold: float = 0.0
    scan_tokens: int = Field(4000, ge=16)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("layers must not be empty (leave it out for all layers)")
            if any(x < 0 for x in v):
                raise ValueError("layers must be non-negative")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SelectionConfig:
        if self.source == "explicit" and not self.neurons:
            raise ValueError("source 'explicit' needs a non-empty 'neurons' list")
        if self.source != "explicit" and self.neurons:
            raise ValueError(f"'neurons' is only used with source 'explicit' (source is {self.source!r})")
        if self.source == "run" and not self.run:
            raise ValueError("source 'run' needs 'run': a scan run folder")
        if self.source != "run" and (self.verdict or self.category):
            raise ValueError("'verdict' and 'category' filters need source 'run' (a hunted scan run)")
        if self.min_frac_active > self.max_frac_active:
            raise ValueError("min_frac_active is larger than max_frac_active")
        return self


class DatasetConfig(_Section):
    """How texts become (tokens, activation) examples (the ``ActivationDatasetGenerator`` stage).

    Documents are assigned whole to train/val/test (``splits`` fractions of the documents, shuffled with
    ``split_seed``), so no text is shared between splits. Each split then gets ``max_tokens x fraction`` tokens,
    cut into windows of ``context_length`` tokens (BOS first when the model has one; BOS positions are never
    targets). ``target``: ``token`` (the activation at each token) or ``window_max`` (the max over the last
    ``window`` tokens, causal). ``balance`` keeps every training token whose target is at or above the
    ``balance_quantile`` and ``balance_ratio`` low tokens per high one (validation/test keep all tokens).
    """

    corpus: str | None = None
    text_field: str = "text"
    max_docs: int | None = Field(None, ge=3)
    context_length: int = Field(64, ge=4, le=8192)
    max_tokens: int = Field(4000, ge=30)
    target: Literal["token", "window_max"] = "token"
    window: int = Field(8, ge=1)
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    balance: bool = False
    balance_quantile: float = Field(0.9, gt=0.0, lt=1.0)
    balance_ratio: float = Field(1.0, gt=0.0)

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x <= 0 for x in v):
            raise ValueError("splits (train, val, test) must all be positive")
        total = sum(v)
        return (v[0] / total, v[1] / total, v[2] / total)


class PredictorConfig(_Section):
    """The predictor (the ``ActivationPredictor`` stage).

    ``head``: ``regression`` (a linear head, optionally with one hidden layer, on the residual stream after block
    ``read_layer``; loss ``mse`` or ``huber`` on the standardised target), ``classification`` (the same head over
    ``n_classes`` bins of the training targets, cross-entropy; ``binning`` ``quantile``: equally populated bins,
    ``uniform``: equally wide bins between the training min and max) or ``token`` (no extra head: after the
    context the model reads ``prompt`` and must answer a digit token ``answer`` with the bin index, trained with
    the LM loss). ``read_layer`` ``null`` means the last layer; negative values count from the end.
    """

    head: Literal["regression", "classification", "token"] = "regression"
    read_layer: int | None = None
    loss: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(1.0, gt=0.0)
    n_classes: int = Field(4, ge=2, le=10)
    binning: Literal["quantile", "uniform"] = "quantile"
    hidden: int = Field(0, ge=0)
    norm: bool = True
    prompt: str = "\nNeuron {layer}.{neuron} activation level (0-9):"
    answer: str = "{digit}"

    @field_validator("answer")
    @classmethod
    def _answer(cls, v: str) -> str:
        if "{digit}" not in v:
            raise ValueError("answer must contain '{digit}'")
        return v


class TrainingConfig(_Section):
    """Fine-tuning (the ``PredictorTrainer`` stage).

    ``unfreeze``: ``head`` (frozen model, head only), ``last_k`` (head + the ``k`` blocks just below the read
    point), ``all`` (every parameter), ``gradual`` (head first, then one more block from the top every
    ``gradual_every`` optimizer steps, up to ``gradual_max`` blocks). The head learns at ``lr``, unfrozen model
    parameters at ``body_lr``. Validation runs every ``eval_every`` steps (``null``: each epoch); training stops
    after ``patience`` evaluations without a ``min_delta`` improvement of the validation loss, and the best
    weights are restored. Checkpoints (safetensors) are written at each evaluation. ``cache_frozen`` computes
    the residual stream entering the first trainable block once per window, so steps run only the trainable
    blocks (window heads; costs ``tokens x d_model`` floats of memory).
    """

    unfreeze: Literal["head", "last_k", "all", "gradual"] = "last_k"
    k: int = Field(2, ge=1)
    gradual_every: int = Field(20, ge=1)
    gradual_max: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    body_lr: float = Field(2e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0.0)
    eval_every: int | None = Field(None, ge=1)
    patience: int | None = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    seed: int = 0
    cache_frozen: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "neuronhunter-selfreport"
    wandb_mode: Literal["offline", "online"] = "offline"


class EvaluationConfig(_Section):
    """Held-out evaluation: baselines, drift of the target neuron, plots."""

    probe: bool = True
    probe_alphas: list[float] = Field(default_factory=lambda: [1.0, 10.0, 100.0, 1e3, 1e4, 1e5])
    drift: bool = True
    plots: bool = True
    trace_windows: int = Field(4, ge=0, le=32)
    scatter_max_points: int = Field(20000, ge=10)
    batch_size: int = Field(16, ge=1)


class SelfReportConfig(_Section):
    """A whole self-report experiment (see the module docstring)."""

    name: str = Field("selfreport", pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    out: str | None = None
    seed: int = 0
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    predictor: PredictorConfig = Field(default_factory=PredictorConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _heads(self) -> SelfReportConfig:
        if self.predictor.head == "token" and self.training.unfreeze == "head":
            raise ValueError("the token head has no separate head to train; use unfreeze last_k, all or gradual")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"selfreport-{self.name}"

    def fingerprint(self, *sections: str) -> str:
        """SHA-256 of the named sections (all when none): what a resumed run must share with the first one."""
        data = self.model_dump(mode="json")
        if sections:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- loading
def example_config_path() -> Path:
    """The bundled example config (``neuronhunter selfreport run example``)."""
    from importlib import resources

    return Path(str(resources.files("neuronhunter.selfreport").joinpath("configs/example.yaml")))


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like 'training.epochs=2'")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return data


def config_from_dict(data: Any, *, where: str = "config") -> SelfReportConfig:
    """Validate a raw dict; errors become one-line :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of options")
    try:
        return SelfReportConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, unknown="unknown option")) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a raw config mapping from JSON or YAML (``example`` names the bundled example)."""
    return read_mapping(example_config_path() if str(path) == EXAMPLE else path)


def load_config(path: str | Path, overrides: list[str] | None = None) -> SelfReportConfig:
    """Load and validate a config file (``.json``, ``.yaml``/``.yml``; ``"example"`` for the bundled one).

    Args:
        path: the config file, or ``"example"``.
        overrides: ``["training.epochs=1", ...]`` applied before validation.
    """
    data = apply_overrides(read_config_file(path), overrides)
    name = "example.yaml" if str(path) == EXAMPLE else Path(path).name
    return config_from_dict(data, where=name)
