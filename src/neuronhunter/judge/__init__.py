"""Judgement: what a neuron does, and how sure we can be.

Reads run folders and scan statistics (measurement never imports judgement): selectivity scores per direction,
candidate explanations scored on held-out documents, and the verdict policy over those scores.
"""
