"""Neuron self-report: can a model learn to report the activation of one of its own MLP neurons?

The pipeline (config-driven, ``neuronhunter selfreport run CONFIG``):

1. :class:`NeuronScanner` picks target neurons (explicit, a fresh scan, or a scan run) and records why.
2. :class:`ActivationDatasetGenerator` records the neuron's activation at every token of a corpus, split by
   document into train/validation/test, stored as Parquet.
3. :class:`ActivationPredictor` reads the model's own residual stream (regression / classification head) or makes
   the model answer a digit token after a prompt (token head).
4. :class:`PredictorTrainer` fine-tunes with a chosen unfreezing strategy, early stopping, checkpoints and resume.
5. :mod:`~neuronhunter.selfreport.evaluation` scores the held-out predictions against the mean, bag-of-token and
   frozen linear-probe baselines, and measures how much the target neuron itself drifted.

See ``docs/selfreport.md`` for the method, the config reference and results on the embedded model.
"""

from .config import (
    DatasetConfig,
    EvaluationConfig,
    NeuronRef,
    PredictorConfig,
    SelectionConfig,
    SelfReportConfig,
    TrainingConfig,
    config_from_dict,
    example_config_path,
    load_config,
)
from .dataset import (
    ActivationDataset,
    ActivationDatasetGenerator,
    SplitTensors,
    assign_splits,
    split_documents,
)
from .pipeline import run_selfreport, run_target, select_neurons
from .planted import plant_token_neuron, write_toy_corpus
from .predictor import ActivationPredictor, Predictions, ReadoutHead, TargetCodec
from .selection import NeuronScanner, Selection, scan_stats
from .trainer import PredictorTrainer, TrainResult

__all__ = [
    "ActivationDataset", "ActivationDatasetGenerator", "ActivationPredictor", "DatasetConfig", "EvaluationConfig",
    "NeuronRef", "NeuronScanner", "PredictorConfig", "PredictorTrainer", "Predictions", "ReadoutHead",
    "SelectionConfig", "Selection", "SelfReportConfig", "SplitTensors", "TargetCodec", "TrainResult",
    "TrainingConfig", "assign_splits", "config_from_dict", "example_config_path", "load_config",
    "plant_token_neuron", "run_selfreport", "run_target", "scan_stats", "select_neurons", "split_documents",
    "write_toy_corpus",
]
