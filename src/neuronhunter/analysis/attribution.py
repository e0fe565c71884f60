"""Direct logit attribution of MLP neurons: which output tokens a neuron promotes and suppresses by itself.

A neuron ``n`` of layer ``L`` adds ``a_n * w_out[n]`` to the MLP's output (``w_out[n]``: row ``n`` of
:meth:`HookedModel.neuron_output_weights`, shape ``[d_model]``). In pre-norm blocks (GPT-2, Pythia, Llama, Gemma,
OLMo) that is the write to the residual stream; in post-norm and sandwich-norm blocks (OLMo2, Gemma 2/3, see
:mod:`neuronhunter.models.adapters`) the MLP output first passes through the post-feed-forward norm ``N_L``.
Ignoring every later layer (the *direct* path), the write reaches the logits through the final norm and the
unembedding ``W_U`` (``[d_model, vocab]``)::

    direct_logits[n] = final_norm(N_L(w_out[n])) @ W_U          # per unit of activation

Tied embeddings (SmolLM2, GPT-2) and untied ones are handled alike: ``W_U`` is the output embedding matrix,
whichever parameter it is.

**The norms are approximated.** A norm is not linear: ``LN(x) = g * (x - mean(x)) / std(x) + b`` and
``RMSNorm(x) = g * x / rms(x)`` divide by a statistic of the *whole* vector at that token. We keep the
linear part only, for the final norm and for the post-feed-forward norm alike:

* the elementwise gain ``g`` is applied; the adapter's ``norm_type`` says what it is: the norm's ``weight``
  (``layernorm``, ``rmsnorm``), ``1 + weight`` (``rmsnorm_plus_one``, Gemma), or none (``layernorm_noweight``,
  OLMo's parameter-free LayerNorm);
* LayerNorm's centring ``x - mean(x)`` is applied (it is linear, hence exact), weighted or not;
* the division by ``std``/``rms`` is dropped (a positive per-token scalar: it rescales every token's direct
  logit alike and does not change a neuron's ranking of tokens), and so is LayerNorm's bias ``b`` (a constant
  that does not depend on the neuron).

So for a post-norm block the exact direct effect of the whole MLP output at one token is the sum over neurons of
``a_n * direct_logits[n]`` times the post-norm's and the final norm's per-token scales ``1/rms``. Logit soft-capping
(Gemma 2's ``tanh`` on the final logits) comes after ``W_U`` and is not included.

Pass ``through_norm=False`` for the raw ``w_out[n] @ W_U`` (no norm of any kind).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SiteError
from ..models.hooked import HookedModel

log = logging.getLogger(__name__)

LOGITS_COLUMNS = ["layer", "neuron", "rank", "direction", "token", "token_id", "value"]


def linear_part(norm: nn.Module, norm_type: str) -> tuple[Tensor | None, bool]:
    """The linear part of one norm module of type ``norm_type`` (an adapter's ``norm_type``):
    ``(elementwise gain or None, centre first?)``."""
    weight = getattr(norm, "weight", None)
    if norm_type == "layernorm_noweight" or weight is None:
        gain = None
    elif norm_type == "rmsnorm_plus_one":  # Gemma RMSNorm multiplies by (1 + weight)
        gain = 1.0 + weight.detach()
    else:
        gain = weight.detach()
    return gain, norm_type in ("layernorm", "layernorm_noweight")


def _apply_linear_part(v: Tensor, norm: nn.Module, norm_type: str) -> Tensor:
    gain, centre = linear_part(norm, norm_type)
    if centre:
        v = v - v.mean(-1, keepdim=True)
    if gain is not None:
        v = v * gain.to(v.dtype)
    return v


def norm_linear_part(model: HookedModel) -> tuple[Tensor | None, bool]:
    """The linear part of the final norm: ``(elementwise gain or None, centre first?)``."""
    return linear_part(model.final_norm(), model.adapter.norm_type)


def neuron_writes(model: HookedModel, layer: int, neurons: Sequence[int] | Tensor | None = None, *,
                  through_norm: bool = True) -> Tensor:
    """What one unit of each neuron's activation writes to the residual stream: ``[n_neurons, d_model]``.

    ``w_out[n]``, passed through the linear part of the post-feed-forward norm where the block has one (see the
    module docstring); ``through_norm=False`` gives the raw ``w_out[n]``.
    """
    model.check_layers([layer])
    w_out = model.neuron_output_weights(layer).detach()  # [d_mlp, d_model]
    if neurons is not None:
        idx = torch.as_tensor(neurons, dtype=torch.long).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= model.d_mlp):
            bad = int(idx[(idx < 0) | (idx >= model.d_mlp)][0])
            raise SiteError(f"neuron {bad} is out of range: {model.name} has neurons 0..{model.d_mlp - 1} per layer")
        w_out = w_out[idx.to(w_out.device)]
    post = model.mlp_out_norm(layer)
    if through_norm and post is not None:
        w_out = _apply_linear_part(w_out, post, model.adapter.norm_type)
    return w_out


def direct_logit_weights(model: HookedModel, layer: int, neurons: Sequence[int] | Tensor | None = None, *,
                         through_norm: bool = True) -> Tensor:
    """Direct effect on the logits of one unit of each neuron's activation: ``[n_neurons, vocab]``.

    Args:
        layer: the MLP layer.
        neurons: neuron indices (None = all ``d_mlp``).
        through_norm: apply the linear part of the post-feed-forward norm (if any) and of the final norm (see the
            module docstring).
    """
    writes = neuron_writes(model, layer, neurons, through_norm=through_norm)
    return write_to_logits(model, writes, through_norm=through_norm)


def write_to_logits(model: HookedModel, vectors: Tensor, *, through_norm: bool = True) -> Tensor:
    """Direct logits ``[n, vocab]`` of residual-stream writes ``vectors`` ``[n, d_model]`` (through the linear part
    of the final norm unless ``through_norm=False``)."""
    v = vectors.to(model.dtype)
    if through_norm:
        v = _apply_linear_part(v, model.final_norm(), model.adapter.norm_type)
    with torch.no_grad():
        return v @ model.unembed_matrix().detach()


def _decoder(tokenizer: Any) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    return decode


def top_logit_tokens(model: HookedModel, layer: int, neurons: Sequence[int] | None = None, *, k: int = 20,
                     through_norm: bool = True, chunk: int = 256, decode: Callable[[int], str] | None = None) -> Any:
    """Top and bottom ``k`` tokens of each neuron's direct logit effect.

    Returns:
        a DataFrame with columns ``layer, neuron, rank, direction (top|bottom), token, token_id, value``; rank 0
        is the most promoted (top) or most suppressed (bottom) token.
    """
    import numpy as np
    import pandas as pd

    idx = list(range(model.d_mlp)) if neurons is None else [int(n) for n in neurons]
    decode = decode or _decoder(model.tokenizer)
    frames = []
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        logits = direct_logit_weights(model, layer, part, through_norm=through_norm).float()
        kk = min(k, logits.shape[-1])
        for direction, largest in (("top", True), ("bottom", False)):
            vals, ids = logits.topk(kk, dim=-1, largest=largest)
            n = len(part)
            token_ids = ids.cpu().numpy().reshape(-1)
            frames.append(pd.DataFrame({
                "layer": np.full(n * kk, layer, dtype=np.int32),
                "neuron": np.repeat(np.asarray(part, dtype=np.int32), kk),
                "rank": np.tile(np.arange(kk, dtype=np.int16), n),
                "direction": direction,
                "token": [decode(int(t)) for t in token_ids],
                "token_id": token_ids.astype(np.int64),
                "value": vals.cpu().numpy().reshape(-1).astype(np.float32),
            }))
    if not frames:
        return pd.DataFrame(columns=LOGITS_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["layer", "neuron", "direction", "rank"], ascending=[True, True, False, True],
                          ignore_index=True)[LOGITS_COLUMNS]


def logits_table(model: HookedModel, units: Iterable[tuple[int, int]], *, k: int = 20, through_norm: bool = True,
                 progress: Callable[[int], None] | None = None) -> Any:
    """:func:`top_logit_tokens` for many ``(layer, neuron)`` pairs (grouped by layer)."""
    import pandas as pd

    by_layer: dict[int, list[int]] = {}
    for layer, neuron in units:
        by_layer.setdefault(int(layer), []).append(int(neuron))
    model.check_layers(by_layer)
    decode = _decoder(model.tokenizer)
    frames = []
    for layer in sorted(by_layer):
        neurons = sorted(set(by_layer[layer]))
        frames.append(top_logit_tokens(model, layer, neurons, k=k, through_norm=through_norm, decode=decode))
        if progress is not None:
            progress(len(neurons))
    if not frames:
        return pd.DataFrame(columns=LOGITS_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def write_logits(run: str | Path, model: HookedModel, *, k: int = 20, through_norm: bool = True,
                 progress: Callable[[int], None] | None = None) -> Path:
    """Write ``RUN/logits.parquet`` (and ``.csv``) for every neuron in ``RUN/neurons.parquet``."""
    from ..io import read_table, require_run, write_table

    run = require_run(run, "neurons.parquet")
    neurons = read_table(run / "neurons.parquet")[["layer", "neuron"]].drop_duplicates()
    df = logits_table(model, zip(neurons["layer"], neurons["neuron"], strict=True), k=k, through_norm=through_norm,
                      progress=progress)
    write_table(df, run / "logits", formats=("parquet",))
    log.info("wrote %s (%d rows)", run / "logits.parquet", len(df))
    return run / "logits.parquet"
