"""Attention heads: patterns for a prompt, and head scores over a corpus.

Patterns are read at ``blocks.L.attn.hook_pattern`` (``[batch, heads, query, key]``; the capture switches the
model to eager attention for the duration). Scores per ``(layer, head)``:

* **prev_token**: mean attention from each token to the token just before it (queries ``q >= 1``).
* **duplicate_token**: for queries whose token occurred earlier in the window, the mean attention mass on those
  earlier occurrences.
* **bos_sink**: mean attention from queries ``q >= 1`` to position 0 (the BOS token when one is prepended, else
  the first token): the "attention sink".
* **entropy**: mean entropy (nats) of the attention distribution of queries ``q >= 1``.
* **induction** (the standard protocol, Olsson et al. 2022): sequences of ``T`` uniformly random tokens repeated
  twice, ``[BOS, r_0 .. r_{T-1}, r_0 .. r_{T-1}]``. From each token ``r_i`` of the second copy, the attention to
  the token *after* its earlier occurrence (``r_{i+1}`` of the first copy) is averaged. An induction head scores
  near 1; random tokens mean no head can do well from co-occurrence statistics.

The first four are measured over corpus windows; induction is measured on the random repeated sequences, which
also give the **induction loss curve**: per-position loss on the first half (random, unpredictable: about
``log(vocab)``) vs the second half (predictable by copying; a model with induction heads gets it much lower).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..causal.interventions import next_token_nll
from ..errors import ConfigError
from ..models.hooked import HookedModel
from ..models.sites import Site

log = logging.getLogger(__name__)

SCORES = ("prev_token", "duplicate_token", "induction", "bos_sink", "entropy")


@dataclass
class AttentionPatterns:
    """Attention patterns of one prompt: ``pattern[i]`` is layer ``layers[i]``, shape ``[heads, q, k]``."""

    pattern: np.ndarray  # [layers, heads, q, k]
    layers: list[int]
    tokens: list[str]
    input_ids: list[int]


def attention_patterns(model: HookedModel, text: str | Tensor, *, layers: Sequence[int] | None = None,
                       prepend_bos: bool = True) -> AttentionPatterns:
    """Attention patterns of every head at ``layers`` (None = all) for one prompt (text or ``[1, pos]`` ids)."""
    ids = model.to_tokens(text, prepend_bos=prepend_bos) if isinstance(text, str) else text.reshape(1, -1)
    if ids.shape[-1] == 0:
        raise ConfigError("the prompt is empty")
    layers = model.check_layers(range(model.n_layers) if layers is None else layers)
    sites = [Site(L, "attn.hook_pattern") for L in layers]
    with model.capture(sites) as cache:
        model.forward(ids, stop_at_layer=max(layers) + 1)
    pattern = torch.stack([cache[s][0] for s in sites]).float().cpu().numpy()
    return AttentionPatterns(pattern, layers, model.to_str_tokens(ids[0]), ids[0].tolist())


def _pattern_sites(model: HookedModel, layers: Sequence[int]) -> list[Site]:
    return [Site(L, "attn.hook_pattern") for L in layers]


def corpus_head_scores(model: HookedModel, batches: Sequence[Any], *, layers: Sequence[int] | None = None,
                       progress: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """prev_token, duplicate_token, bos_sink and entropy ``[layers, heads]`` over corpus batches (TokenBatch)."""
    layers = model.check_layers(range(model.n_layers) if layers is None else layers)
    sites = _pattern_sites(model, layers)
    n_l, n_h = len(layers), model.n_heads
    sums = {k: torch.zeros(n_l, n_h, dtype=torch.float64) for k in ("prev_token", "duplicate_token", "bos_sink",
                                                                    "entropy")}
    n_q = n_dup = 0
    with model.capture(sites) as cache:
        for bt in batches:
            bt = bt[0] if isinstance(bt, tuple) else bt
            ids, mask = bt.input_ids, bt.attention_mask.bool()
            model.forward(ids, bt.attention_mask, stop_at_layer=max(layers) + 1)
            p = ids.shape[1]
            q_valid = mask.clone()
            q_valid[:, 0] = False  # position 0 can only attend to itself
            # duplicates: earlier keys (not position 0 when it is BOS) with the same token
            same = (ids[:, :, None] == ids[:, None, :]) & torch.ones(p, p, dtype=torch.bool).tril(-1)
            same &= mask[:, None, :] & q_valid[:, :, None]
            if bt.has_bos:
                same[:, :, 0] = False
            has_dup = same.any(-1)  # [b, q]
            n_q += int(q_valid.sum())
            n_dup += int(has_dup.sum())
            qv = q_valid[:, None, :].double()  # [b, 1, q]
            for i, s in enumerate(sites):
                a = cache[s].double().cpu()  # [b, h, q, k]
                prev = torch.diagonal(a, offset=-1, dim1=-2, dim2=-1)  # [b, h, q-1]: a[q, q-1]
                sums["prev_token"][i] += (prev * qv[..., 1:]).sum((0, 2))
                sums["bos_sink"][i] += (a[..., 0] * qv).sum((0, 2))
                ent = -(a * a.clamp(min=1e-30).log()).sum(-1)
                sums["entropy"][i] += (ent * qv).sum((0, 2))
                dup = (a * same[:, None].double()).sum(-1)  # [b, h, q]
                sums["duplicate_token"][i] += (dup * has_dup[:, None].double()).sum((0, 2))
            if progress is not None:
                progress()
    if n_q == 0:
        raise ConfigError("the corpus gave no tokens to score heads on")
    out = {k: (v / n_q).numpy() for k, v in sums.items() if k != "duplicate_token"}
    out["duplicate_token"] = (sums["duplicate_token"] / n_dup).numpy() if n_dup else np.full((n_l, n_h), np.nan)
    return out


def random_repeated_tokens(model: HookedModel, *, seq_len: int = 40, n_seqs: int = 16, seed: int = 0) -> Tensor:
    """``[n_seqs, 1 + 2*seq_len]``: BOS (when the model has one), then ``seq_len`` random tokens, repeated.

    Tokens are drawn uniformly without replacement (within a sequence) from the ordinary (non-special)
    vocabulary.
    """
    if seq_len < 2 or n_seqs < 1:
        raise ConfigError("the induction protocol needs seq_len >= 2 and n_seqs >= 1")
    tok = model.tokenizer
    vocab = min(len(tok), int(model.config.vocab_size))
    special = set(getattr(tok, "all_special_ids", []) or [])
    lo = min(max(special) + 1, vocab // 2) if special and max(special) < vocab // 2 else 0
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_seqs):
        pool = torch.randperm(vocab - lo, generator=g)[: seq_len * 2] + lo
        pool = pool[[int(t) not in special for t in pool]][:seq_len]
        rows.append(torch.cat([pool, pool]))
    ids = torch.stack(rows)
    bos = model.bos_token_id
    if bos is not None:
        ids = torch.cat([torch.full((n_seqs, 1), bos, dtype=torch.long), ids], 1)
    return ids


@dataclass
class InductionResult:
    """Induction scores and the per-position loss on random repeated tokens."""

    scores: np.ndarray  # [layers, heads]
    duplicate: np.ndarray  # [layers, heads] attention from the second copy to the earlier occurrence itself
    prev_token: np.ndarray  # [layers, heads] on the repeated sequences
    loss_curve: Any  # DataFrame: position, half (first|second), loss
    first_half_loss: float
    second_half_loss: float
    layers: list[int]


def induction_scores(model: HookedModel, *, seq_len: int = 40, n_seqs: int = 16, seed: int = 0,
                     layers: Sequence[int] | None = None, batch_size: int = 8) -> InductionResult:
    """Run the repeated-random-tokens protocol (module docstring): induction scores and the loss curve."""
    import pandas as pd

    layers = model.check_layers(range(model.n_layers) if layers is None else layers)
    ids_all = random_repeated_tokens(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed)
    off = 1 if model.bos_token_id is not None else 0
    T = seq_len
    q = torch.arange(off + T, off + 2 * T)  # second-copy positions of r_0..r_{T-1}
    sites = _pattern_sites(model, layers)
    n_l, n_h = len(layers), model.n_heads
    ind = torch.zeros(n_l, n_h, dtype=torch.float64)
    dup = torch.zeros_like(ind)
    prev = torch.zeros_like(ind)
    losses = []
    with model.capture(sites) as cache:
        for start in range(0, n_seqs, batch_size):
            ids = ids_all[start : start + batch_size]
            logits = model.forward(ids)
            assert logits is not None
            nll, _ = next_token_nll(logits, ids)
            losses.append(nll.double().cpu())
            for i, s in enumerate(sites):
                a = cache[s].double().cpu()  # [b, h, q, k]
                ind[i] += a[:, :, q, q - T + 1].sum((0, 2))
                dup[i] += a[:, :, q, q - T].sum((0, 2))
                prev[i] += a[:, :, q, q - 1].sum((0, 2))
    n = n_seqs * T
    nll = torch.cat(losses).mean(0).numpy()  # [pos-1]: loss predicting token at t+1
    target_pos = np.arange(1, nll.shape[0] + 1)
    half = np.where(target_pos < off + T, "first", "second")
    curve = pd.DataFrame({"position": target_pos, "half": half, "loss": nll})
    first = curve[(curve.position >= off + 1) & (curve.position < off + T)].loss
    second = curve[curve.position >= off + T + 1].loss  # r_1.. of the second copy: predictable by induction
    return InductionResult((ind / n).numpy(), (dup / n).numpy(), (prev / n).numpy(), curve,
                           float(first.mean()), float(second.mean()), layers)


def head_scores(model: HookedModel, batches: Sequence[Any] | None, *, layers: Sequence[int] | None = None,
                seq_len: int = 40, n_seqs: int = 16, seed: int = 0,
                progress: Callable[[], None] | None = None) -> tuple[Any, InductionResult]:
    """All head scores as a DataFrame ``layer, head, prev_token, duplicate_token, induction, bos_sink, entropy``.

    Args:
        batches: corpus TokenBatches for the corpus scores (None: use the repeated random sequences instead, and
            leave ``bos_sink``/``entropy`` NaN).

    Returns:
        ``(scores, induction_result)``.
    """
    import pandas as pd

    layers = model.check_layers(range(model.n_layers) if layers is None else layers)
    induction = induction_scores(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed, layers=layers)
    if batches is not None:
        corpus = corpus_head_scores(model, batches, layers=layers, progress=progress)
    else:
        nan = np.full_like(induction.scores, np.nan)
        corpus = {"prev_token": induction.prev_token, "duplicate_token": induction.duplicate, "bos_sink": nan,
                  "entropy": nan}
    rows = []
    for i, L in enumerate(layers):
        for h in range(model.n_heads):
            rows.append({"layer": L, "head": h, "prev_token": float(corpus["prev_token"][i, h]),
                         "duplicate_token": float(corpus["duplicate_token"][i, h]),
                         "induction": float(induction.scores[i, h]), "bos_sink": float(corpus["bos_sink"][i, h]),
                         "entropy": float(corpus["entropy"][i, h])})
    return pd.DataFrame(rows), induction


def top_heads(scores: Any, score: str = "induction", k: int = 5) -> Any:
    """The ``k`` heads with the highest ``score`` (a DataFrame from :func:`head_scores`)."""
    if score not in SCORES:
        raise ConfigError(f"unknown head score {score!r}; use one of {', '.join(SCORES)}")
    return scores.sort_values(score, ascending=False, kind="stable").head(k).reset_index(drop=True)
