"""Activation patching sweeps: where in the model does a behaviour live?

Given a *clean* prompt (the model answers ``answer``) and a *corrupted* prompt of the same length (it answers
``wrong``, or is unsure), the metric is the logit difference at the last position::

    metric(logits) = logits[-1, answer] - logits[-1, wrong]

We run the corrupted prompt and copy ("patch") one clean activation into it at a time:

* the residual stream ``blocks.L.hook_resid_pre`` at one position ``p``, for every layer × position;
* one attention head's output ``blocks.L.attn.hook_z[:, :, h]`` at every position, for every layer × head.

and report the *normalised* metric ``(patched - corrupted) / (clean - corrupted)``: 1 means patching that one
activation restores the clean behaviour fully, 0 means it does nothing. (This is "denoising" in the terminology
of Heimersheim & Nanda, 2024.) The sweeps are batched: each patched variant is one row of a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.hooked import HookedModel
from ..models.sites import Site

log = logging.getLogger(__name__)


@dataclass
class PatchingResult:
    """Normalised patching effects (see the module docstring) and the raw metrics."""

    resid: Tensor  # [layers, pos] normalised metric after patching resid_pre at (layer, pos)
    heads: Tensor | None  # [layers, heads] normalised metric after patching one head at all positions
    resid_raw: Tensor  # [layers, pos] raw logit difference
    heads_raw: Tensor | None  # [layers, heads]
    clean_metric: float
    corrupted_metric: float
    layers: list[int]
    clean_tokens: list[str]
    corrupted_tokens: list[str]
    answer: str
    wrong: str


def answer_token(model: HookedModel, answer: str | int) -> int:
    """The token id of ``answer`` (an id, or text that must be exactly one token, e.g. ``" Paris"``)."""
    if isinstance(answer, int):
        if not 0 <= answer < int(model.config.vocab_size):
            raise ConfigError(f"token id {answer} is out of range (vocabulary of {model.config.vocab_size})")
        return answer
    ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        toks = model.to_str_tokens(ids)
        raise ConfigError(f"answer {answer!r} is {len(ids)} tokens {toks}; give a single token (mind the leading "
                          "space, e.g. ' Paris')")
    return int(ids[0])


def logit_diff(logits: Tensor, answer: int, wrong: int) -> Tensor:
    """``[batch]`` logit difference ``answer - wrong`` at the last position."""
    last = logits[:, -1].float()
    return last[:, answer] - last[:, wrong]


def _normalise(raw: Tensor, clean: float, corrupted: float) -> Tensor:
    gap = clean - corrupted
    if abs(gap) < 1e-6:
        log.warning("clean and corrupted metrics are equal (%.4f): normalised patching effects are undefined", clean)
        return torch.full_like(raw, float("nan"))
    return (raw - corrupted) / gap


def check_prompts(model: HookedModel, clean: str | Tensor, corrupted: str | Tensor, answer: str | int,
                  wrong: str | int, *, prepend_bos: bool = True) -> tuple[Tensor, Tensor, int, int]:
    """Tokenise and check a prompt pair: ``(clean_ids, corrupted_ids, answer_id, wrong_id)``."""
    c_ids = model.to_tokens(clean, prepend_bos=prepend_bos) if isinstance(clean, str) else clean.reshape(1, -1)
    x_ids = model.to_tokens(corrupted, prepend_bos=prepend_bos) if isinstance(corrupted, str) else corrupted.reshape(1, -1)
    if c_ids.shape != x_ids.shape:
        raise ConfigError(f"clean and corrupted prompts must have the same number of tokens "
                          f"({c_ids.shape[-1]} vs {x_ids.shape[-1]}): {model.to_str_tokens(c_ids[0])} vs "
                          f"{model.to_str_tokens(x_ids[0])}")
    if c_ids.shape[-1] == 0:
        raise ConfigError("the prompts are empty")
    return c_ids, x_ids, answer_token(model, answer), answer_token(model, wrong)


def patching_sweep(model: HookedModel, clean: str | Tensor, corrupted: str | Tensor, answer: str | int,
                   wrong: str | int, *, heads: bool = True, layers: Sequence[int] | None = None,
                   prepend_bos: bool = True, batch_size: int = 16,
                   progress: Callable[[], None] | None = None) -> PatchingResult:
    """Patch clean activations into the corrupted run: residual stream per layer × position, and each head.

    Args:
        clean, corrupted: prompts (text, or ``[1, pos]`` ids) of the same token length.
        answer, wrong: the answer tokens whose logit difference is the metric.
        heads: also sweep attention heads (``attn.hook_z``).
        layers: layers to sweep (None = all).
    """
    c_ids, x_ids, a_id, w_id = check_prompts(model, clean, corrupted, answer, wrong, prepend_bos=prepend_bos)
    layers = model.check_layers(range(model.n_layers) if layers is None else layers)
    P, H = c_ids.shape[1], model.n_heads
    resid_sites = [Site(L, "hook_resid_pre") for L in layers]
    z_sites = [Site(L, "attn.hook_z") for L in layers] if heads else []
    clean_logits, cache = model.run_with_cache(c_ids, sites=resid_sites + z_sites)
    corrupted_logits = model.forward(x_ids)
    assert clean_logits is not None and corrupted_logits is not None
    m_clean = float(logit_diff(clean_logits, a_id, w_id)[0])
    m_corr = float(logit_diff(corrupted_logits, a_id, w_id)[0])

    def run_rows(site: Site, n_rows: int, make_mask: Callable[[int, int], Tensor]) -> Tensor:
        """Run corrupted rows ``[start, stop)``, row ``r`` patched where ``make_mask`` says; metric per row."""
        out = []
        src = cache[site]
        for start in range(0, n_rows, batch_size):
            stop = min(n_rows, start + batch_size)
            mask = make_mask(start, stop)

            def fn(act: Tensor, _site: Site, mask: Tensor = mask) -> Tensor:
                return torch.where(mask.to(act.device), src.to(act.dtype).expand_as(act), act)

            ids = x_ids.expand(stop - start, -1)
            with model.hooks({site: fn}):
                logits = model.forward(ids)
            assert logits is not None
            out.append(logit_diff(logits, a_id, w_id).cpu())
            if progress is not None:
                progress()
        return torch.cat(out)

    eye_p = torch.eye(P, dtype=torch.bool)
    eye_h = torch.eye(H, dtype=torch.bool)
    resid_raw = torch.stack([
        run_rows(s, P, lambda a, b: eye_p[a:b][:, :, None]) for s in resid_sites  # [rows, pos, 1]
    ])
    heads_raw = None
    if heads:
        heads_raw = torch.stack([
            run_rows(s, H, lambda a, b: eye_h[a:b][:, None, :, None]) for s in z_sites  # [rows, 1, heads, 1]
        ])
    return PatchingResult(
        resid=_normalise(resid_raw, m_clean, m_corr),
        heads=None if heads_raw is None else _normalise(heads_raw, m_clean, m_corr),
        resid_raw=resid_raw, heads_raw=heads_raw, clean_metric=m_clean, corrupted_metric=m_corr, layers=layers,
        clean_tokens=model.to_str_tokens(c_ids[0]), corrupted_tokens=model.to_str_tokens(x_ids[0]),
        answer=model.tokenizer.decode([a_id]), wrong=model.tokenizer.decode([w_id]),
    )


def patching_frame(result: PatchingResult) -> object:
    """The sweep as a long DataFrame: ``kind (resid|head), layer, index (position|head), label, effect, raw``."""
    import pandas as pd

    rows = []
    for i, L in enumerate(result.layers):
        for p in range(result.resid.shape[1]):
            rows.append({"kind": "resid", "layer": L, "index": p, "label": result.clean_tokens[p],
                         "effect": float(result.resid[i, p]), "raw": float(result.resid_raw[i, p])})
        if result.heads is not None and result.heads_raw is not None:
            for h in range(result.heads.shape[1]):
                rows.append({"kind": "head", "layer": L, "index": h, "label": f"H{h}",
                             "effect": float(result.heads[i, h]), "raw": float(result.heads_raw[i, h])})
    return pd.DataFrame(rows)
