"""Which tokens count: the one token policy of the scan, the hunt, interventions, probes and self-report.

A token counts when it is real (not padding) and is not at **position 0** of its window. Position 0 is the
sequence starter: the prepended BOS token, or, without BOS, the window's first token, which has no context. Both
carry activations unlike any other position (attention sinks, "massive activations"), so statistics, reference
means, ablations and training targets leave position 0 out unless asked (``include_first=True``). The scan tracks
position 0 separately (:class:`~neuronhunter.stats.accumulators.PositionStats`) so the artefact stays visible.
"""

from __future__ import annotations

from torch import Tensor

FIRST_COUNTED = 1  # the first position that counts in a window (when position 0 is excluded)


def counted_tokens(attention_mask: Tensor, *, include_first: bool = False) -> Tensor:
    """Bool ``[batch, pos]``: the tokens that count (see the module docstring).

    Args:
        attention_mask: ``[batch, pos]``, nonzero for real tokens (right padding).
        include_first: count position 0 as well.
    """
    keep = attention_mask.bool().clone()
    if not include_first and keep.ndim == 2 and keep.shape[1]:
        keep[:, 0] = False
    return keep


def n_counted(attention_mask: Tensor, *, include_first: bool = False) -> int:
    """How many tokens of a batch count."""
    return int(counted_tokens(attention_mask, include_first=include_first).sum())
