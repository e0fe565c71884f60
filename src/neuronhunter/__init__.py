"""neuronhunter: neuron-level mechanistic interpretability of transformer language models."""

__version__ = "0.1.0"
