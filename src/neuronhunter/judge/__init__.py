"""Judgement: what a neuron does, and how sure we can be.

Reads run folders and scan statistics (measurement never imports judgement): selectivity scores per direction,
candidate explanations scored on held-out documents, and the verdict policy over those scores.

* :mod:`.features`: a layer's statistics seen from either direction of its neurons (``+``: ``a``, ``-``: ``-a``);
* :mod:`.specificity`: "when it fires strongly, what on?" — precision, recall, F1, AUPRC, hypergeometric p-values
  and Benjamini-Hochberg q-values over each direction's high activations, word types of its top-k peaks;
* :mod:`.thresholds`: the verdict thresholds (config); :mod:`.verdicts`: the verdict policy and its formulas;
* :mod:`.judgement`: :func:`~.judgement.judge_state`, every neuron of a scan judged, as tables;
* :mod:`.explain`: candidate explanations scored on held-out documents.
"""
