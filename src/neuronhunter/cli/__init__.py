"""Command-line interface (``neuronhunter``)."""
