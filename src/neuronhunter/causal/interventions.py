"""Interventions: ablate neurons and attention heads, patch activations between runs, steer along directions.

Correlation (the scan and the hunt) proposes candidate neurons; an intervention tests them causally. Every
intervention here is a plain function ``fn(activation, site) -> new activation`` (the :data:`Intervention` type of
:mod:`neuronhunter.models.hooked`) that :meth:`HookedModel.intervene` attaches as a hook; the hooks are removed when
the ``with`` block exits, even when the forward pass raises.

Kinds of intervention (the *unit* is a neuron on ``mlp.hook_post`` / any ``[..., d]`` site, or a head on
``attn.hook_z``, whose activation is ``[batch, pos, heads, d_head]``):

* **zero ablation** (:func:`zero_ablate`): set the units to 0. Simple, but 0 may be far off-distribution.
* **mean ablation** (:func:`mean_ablate`): set the units to their mean over a reference corpus
  (:func:`reference_means`); removes the information a unit carries while keeping its average contribution.
* **resample ablation** (:func:`resample_ablate`): set the units to their values on *another input* (captured
  with :func:`capture_sources`); the unit still looks "normal" but carries the wrong information.
* **activation patching** (:func:`patch`): copy activations from a source run into a target run, optionally
  only at some positions or units (the same operation as resampling, used to localise behaviour).
* **steering** (:func:`steer`): add ``scale * direction`` to the activation.

:func:`ablation_effect` measures what an ablation does to next-token loss over a corpus: overall, per concept
category, and the tokens whose log-probability changes most.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, SiteError
from ..models.hooked import HookedModel, Intervention
from ..models.sites import Site
from ..stats.tokens import counted_tokens

log = logging.getLogger(__name__)

METHODS = ("zero", "mean", "resample")

Positions = int | Sequence[int] | slice | Tensor | None
InterventionMap = dict[Site, list[Intervention]]


# ------------------------------------------------------------------------------------------------ primitives
def _unit_dim(site: Site) -> int:
    """The dimension that indexes units: heads for ``attn.hook_z``, the last dimension otherwise."""
    return -2 if site.kind == "attn.hook_z" else -1


def _position_mask(act: Tensor, positions: Positions) -> Tensor | None:
    """A ``[batch, pos]`` bool mask of the positions to change, or None for all positions."""
    if positions is None:
        return None
    b, p = act.shape[0], act.shape[1]
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.ndim == 1:
            positions = positions[None, :].expand(b, -1)
        return positions[:, :p].to(act.device)
    mask = torch.zeros((b, p), dtype=torch.bool, device=act.device)
    if isinstance(positions, slice):
        mask[:, positions] = True
    else:
        idx = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), dtype=torch.long)
        idx = torch.where(idx < 0, idx + p, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= p):
            raise SiteError(f"position out of range for a sequence of {p} tokens")
        mask[:, idx.to(act.device)] = True
    return mask


def _replace(act: Tensor, site: Site, value: Tensor, units: Sequence[int] | None, positions: Positions) -> Tensor:
    """``act`` with ``value`` (broadcastable to ``act``) written at ``units`` and ``positions``."""
    value = value.to(device=act.device, dtype=act.dtype).expand_as(act)
    dim = _unit_dim(site)
    if units is not None:
        n_units = act.shape[dim]
        idx = [int(u) for u in units]
        bad = [u for u in idx if not 0 <= u < n_units]
        if bad:
            what = "head" if site.kind == "attn.hook_z" else "unit"
            raise SiteError(f"{what} {bad[0]} is out of range at {site} (has {n_units})")
        unit_mask = torch.zeros(n_units, dtype=torch.bool, device=act.device)
        unit_mask[idx] = True
        shape = [1] * act.ndim
        shape[dim] = n_units
        keep = unit_mask.view(shape)
    else:
        keep = torch.ones((), dtype=torch.bool, device=act.device)
    pos_mask = _position_mask(act, positions)
    if pos_mask is not None:
        keep = keep & pos_mask.view(*pos_mask.shape, *([1] * (act.ndim - 2)))
    return torch.where(keep, value, act)


def zero_ablate(units: Sequence[int] | None = None, positions: Positions = None) -> Intervention:
    """Set ``units`` (neurons, or heads on ``attn.hook_z``; None = all) to 0 at ``positions`` (None = all)."""

    def fn(act: Tensor, site: Site) -> Tensor:
        return _replace(act, site, torch.zeros((), dtype=act.dtype), units, positions)

    return fn


def mean_ablate(means: Tensor, units: Sequence[int] | None = None, positions: Positions = None) -> Intervention:
    """Set ``units`` to their reference-corpus mean.

    Args:
        means: the mean activation of every unit at the site: ``[d]`` (``[heads, d_head]`` for ``attn.hook_z``),
            as returned by :func:`reference_means`.
    """

    def fn(act: Tensor, site: Site) -> Tensor:
        if tuple(means.shape) != tuple(act.shape[2:]):
            raise SiteError(f"mean ablation at {site}: means have shape {tuple(means.shape)}, "
                            f"activations {tuple(act.shape[2:])}")
        return _replace(act, site, means, units, positions)

    return fn


def patch(source: Tensor, units: Sequence[int] | None = None, positions: Positions = None) -> Intervention:
    """Replace the activation by ``source`` (captured at the same site on another input) at ``units``/``positions``.

    ``source`` must have the same shape as the target activation, except that a batch of 1 is broadcast and a
    longer source sequence is truncated to the target's length.
    """

    def fn(act: Tensor, site: Site) -> Tensor:
        src = source
        if src.ndim != act.ndim or tuple(src.shape[2:]) != tuple(act.shape[2:]):
            raise SiteError(f"patch at {site}: source shape {tuple(src.shape)} does not match {tuple(act.shape)}")
        if src.shape[1] < act.shape[1]:
            raise SiteError(f"patch at {site}: the source has {src.shape[1]} positions, the target {act.shape[1]}")
        if src.shape[0] not in (1, act.shape[0]):
            raise SiteError(f"patch at {site}: source batch {src.shape[0]} vs target batch {act.shape[0]}")
        return _replace(act, site, src[:, : act.shape[1]], units, positions)

    return fn


def resample_ablate(source: Tensor, units: Sequence[int] | None = None, positions: Positions = None) -> Intervention:
    """Resample ablation: set ``units`` to their activations ``source`` on another input (see :func:`patch`)."""
    return patch(source, units, positions)


def steer(direction: Tensor, scale: float = 1.0, positions: Positions = None) -> Intervention:
    """Add ``scale * direction`` to the activation (``direction`` has the site's trailing shape)."""

    def fn(act: Tensor, site: Site) -> Tensor:
        d = direction.to(device=act.device, dtype=act.dtype)
        if tuple(d.shape) != tuple(act.shape[2:]):
            raise SiteError(f"steering at {site}: direction shape {tuple(d.shape)} vs activation {tuple(act.shape)}")
        added = act + scale * d
        if positions is None:
            return added
        return _replace(act, site, added, None, positions)

    return fn


# ------------------------------------------------------------------------------------------------ groups of units
def parse_units(values: Sequence[int], what: str = "neuron") -> list[tuple[int, int]]:
    """``[L1, N1, L2, N2, ...]`` -> ``[(L1, N1), (L2, N2), ...]``."""
    if len(values) == 0 or len(values) % 2:
        raise ConfigError(f"give {what}s as pairs LAYER {what.upper()} [LAYER {what.upper()} ...], got {list(values)}")
    return [(int(values[i]), int(values[i + 1])) for i in range(0, len(values), 2)]


def group_units(model: HookedModel, units: Iterable[tuple[int, int]], kind: str) -> dict[Site, list[int]]:
    """Group ``(layer, index)`` pairs by site (checking ranges): ``{Site(layer, kind): [indices]}``."""
    size = model.n_heads if kind == "attn.hook_z" else model.d_mlp
    what = "head" if kind == "attn.hook_z" else "neuron"
    out: dict[Site, list[int]] = {}
    for layer, unit in units:
        site = model.check_site(Site(int(layer), kind))
        if not 0 <= int(unit) < size:
            raise SiteError(f"{what} {unit} is out of range: {model.name} has {what}s 0..{size - 1} per layer")
        out.setdefault(site, [])
        if int(unit) not in out[site]:
            out[site].append(int(unit))
    return out


def _ablation(model: HookedModel, units: Iterable[tuple[int, int]], kind: str, method: str,
              means: Mapping[Site, Tensor] | None, sources: Mapping[Site, Tensor] | None,
              positions: Positions) -> dict[Site, Intervention]:
    if method not in METHODS:
        raise ConfigError(f"unknown ablation method {method!r}; use one of {', '.join(METHODS)}")
    out: dict[Site, Intervention] = {}
    for site, idx in group_units(model, units, kind).items():
        if method == "zero":
            out[site] = zero_ablate(idx, positions)
        elif method == "mean":
            if means is None or site not in means:
                raise ConfigError(f"mean ablation needs reference means for {site} (see reference_means)")
            out[site] = mean_ablate(means[site], idx, positions)
        else:
            if sources is None or site not in sources:
                raise ConfigError(f"resample ablation needs source activations for {site} (see capture_sources)")
            out[site] = resample_ablate(sources[site], idx, positions)
    return out


def neuron_ablation(model: HookedModel, neurons: Iterable[tuple[int, int]], method: str = "zero", *,
                    means: Mapping[Site, Tensor] | None = None, sources: Mapping[Site, Tensor] | None = None,
                    positions: Positions = None) -> dict[Site, Intervention]:
    """Interventions ablating MLP neurons ``(layer, neuron)`` at ``blocks.L.mlp.hook_post``.

    Args:
        method: ``zero``, ``mean`` (needs ``means`` from :func:`reference_means`) or ``resample`` (needs
            ``sources`` from :func:`capture_sources` on another input).
    """
    return _ablation(model, neurons, "mlp.hook_post", method, means, sources, positions)


def head_ablation(model: HookedModel, heads: Iterable[tuple[int, int]], method: str = "zero", *,
                  means: Mapping[Site, Tensor] | None = None, sources: Mapping[Site, Tensor] | None = None,
                  positions: Positions = None) -> dict[Site, Intervention]:
    """Interventions ablating attention heads ``(layer, head)`` at ``blocks.L.attn.hook_z`` (see
    :func:`neuron_ablation` for ``method``)."""
    return _ablation(model, heads, "attn.hook_z", method, means, sources, positions)


def combine(*maps: Mapping[Site, Intervention | list[Intervention]]) -> InterventionMap:
    """Merge intervention maps; several interventions at one site run in order."""
    out: InterventionMap = {}
    for m in maps:
        for site, fn in m.items():
            out.setdefault(Site.parse(site), []).extend(fn if isinstance(fn, list) else [fn])
    return out


def run_with_interventions(model: HookedModel, input_ids: Tensor, attention_mask: Tensor | None,
                           interventions: Mapping[Site, Intervention | list[Intervention]]) -> Tensor:
    """Logits ``[batch, pos, vocab]`` of a forward pass with ``interventions`` (hooks removed afterwards)."""
    with model.hooks(dict(interventions)):
        logits = model.forward(input_ids, attention_mask)
    assert logits is not None
    return logits


def capture_sources(model: HookedModel, input_ids: Tensor, attention_mask: Tensor | None,
                    sites: Iterable[Site | str]) -> dict[Site, Tensor]:
    """Activations at ``sites`` on a source input (for patching and resample ablation)."""
    sites = [model.check_site(s) for s in sites]
    stop = max(s.layer for s in sites) + 1
    _, cache = model.run_with_cache(input_ids, attention_mask, sites=sites, stop_at_layer=stop)
    return cache


def reference_means(model: HookedModel, sites: Iterable[Site | str], batches: Iterable[Any]) -> dict[Site, Tensor]:
    """Mean activation at each site over the tokens of ``batches`` that count (:mod:`neuronhunter.stats.tokens`:
    no padding, not position 0).

    Args:
        batches: :class:`~neuronhunter.data.batches.TokenBatch` objects (or ``(batch, windows)`` pairs).
    """
    sites = [model.check_site(s) for s in sites]
    stop = max(s.layer for s in sites) + 1
    sums: dict[Site, Tensor] = {}
    count = 0
    with model.capture(sites, stop_at_layer=stop) as cache:
        for batch in batches:
            batch = batch[0] if isinstance(batch, tuple) else batch
            mask = counted_tokens(batch.attention_mask)
            model.forward(batch.input_ids, batch.attention_mask, stop_at_layer=stop)
            count += int(mask.sum())
            for s in sites:
                act = cache[s][mask.to(cache[s].device)].double().sum(0)
                sums[s] = act if s not in sums else sums[s] + act
    if count == 0:
        raise ConfigError("reference corpus has no tokens to average over")
    return {s: (v / count).to(model.dtype) for s, v in sums.items()}


# ------------------------------------------------------------------------------------------------ corpus helpers
def load_concept_labeller(lexicon: str | dict[str, Any] | None = None, **options: Any) -> Any:
    """The concept labeller of :mod:`neuronhunter.data.concepts` for a lexicon file, a lexicon mapping (a hunt's
    ``lexicon.json``) or the bundled default (None / ``"default"``)."""
    try:
        from ..data.concepts import load_labeller
    except ImportError:
        raise ConfigError("concept labelling is not available in this installation (neuronhunter.data.concepts)") from None
    return load_labeller(lexicon, **options)


def corpus_batches(model: HookedModel, corpus: Any = None, *, context_length: int = 128, max_tokens: int | None = 4096,
                   batch_size: int = 8, prepend_bos: bool = True, labeller: Any = None,
                   tokens_per_doc: int | None = None) -> list[Any]:
    """Tokenise a corpus into a list of :class:`~neuronhunter.data.batches.TokenBatch` (labelled if given a labeller).

    Args:
        corpus: a :class:`~neuronhunter.data.corpus.Corpus`, a corpus spec (None = bundled corpus) or a list of
            documents.
        max_tokens: stop after this many tokens in all.
        tokens_per_doc: take at most this many tokens of each document (spreads ``max_tokens`` over more
            documents, which probes split by document need).
    """
    from ..data import Corpus, iter_batches, iter_windows

    docs = corpus if isinstance(corpus, (Corpus, list)) else Corpus(corpus)
    bos = model.bos_token_id if prepend_bos else None

    def per_doc() -> Any:
        for doc in docs:
            yield from iter_windows([doc], model.tokenizer, context_length=context_length, bos_token_id=bos,
                                    labeller=labeller, max_tokens=tokens_per_doc)

    if tokens_per_doc is None:
        windows = iter_windows(docs, model.tokenizer, context_length=context_length, bos_token_id=bos,
                               labeller=labeller, max_tokens=max_tokens)
    else:
        def capped() -> Any:
            seen = 0
            for w in per_doc():
                real = len(w.ids) - (1 if bos is not None else 0)
                if max_tokens is not None and seen + real > max_tokens:
                    keep = max_tokens - seen
                    if keep > 0:
                        w.ids = w.ids[: keep + (1 if bos is not None else 0)]
                        w.labels = None if w.labels is None else w.labels[: len(w.ids)]
                        yield w
                    return
                seen += real
                yield w

        windows = capped()
    n_cat = len(labeller.categories) if labeller is not None else None
    pad = model.tokenizer.pad_token_id or 0
    out = [b for b, _ in iter_batches(windows, batch_size=batch_size, pad_token_id=pad, has_bos=bos is not None,
                                      n_categories=n_cat)]
    if not out:
        raise ConfigError("the corpus gave no tokens")
    return out


def next_token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token next-token loss: ``nll[b, t] = -log p(ids[t+1] | ids[..t])`` and the ``[b, pos-1]`` valid mask."""
    b, p, v = logits.shape
    ids = input_ids.to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    nll = nll.view(b, p - 1)
    if attention_mask is None:
        valid = torch.ones_like(nll, dtype=torch.bool)
    else:
        m = attention_mask.to(logits.device).bool()
        valid = m[:, 1:] & m[:, :-1]
    return nll, valid


@dataclass
class TokenTable:
    """The prediction targets of a list of batches, flattened to ``N`` valid (input position, next token) pairs."""

    batch: np.ndarray  # [N] index of the batch
    row: np.ndarray  # [N] row in the batch
    pos: np.ndarray  # [N] input position t (the loss predicts the token at t+1)
    input_ids: np.ndarray  # [N]
    target_ids: np.ndarray  # [N]
    doc_ids: np.ndarray  # [N]
    labels_input: np.ndarray | None  # [N, C] labels of the input token
    labels_target: np.ndarray | None  # [N, C] labels of the predicted token

    @classmethod
    def from_batches(cls, batches: Sequence[Any]) -> TokenTable:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("batch", "row", "pos", "inp", "tgt", "doc", "li", "lt")}
        for i, bt in enumerate(batches):
            m = bt.attention_mask.bool()
            valid = (m[:, 1:] & m[:, :-1]).numpy()
            rows, pos = np.nonzero(valid)
            ids = bt.input_ids.numpy()
            parts["batch"].append(np.full(len(rows), i))
            parts["row"].append(rows)
            parts["pos"].append(pos)
            parts["inp"].append(ids[rows, pos])
            parts["tgt"].append(ids[rows, pos + 1])
            parts["doc"].append(bt.doc_ids.numpy()[rows])
            if bt.labels is not None:
                lab = bt.labels.numpy()
                parts["li"].append(lab[rows, pos])
                parts["lt"].append(lab[rows, pos + 1])
        cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
        has_labels = len(parts["li"]) == len(batches) and len(batches) > 0
        return cls(cat["batch"], cat["row"], cat["pos"], cat["inp"], cat["tgt"], cat["doc"],
                   cat["li"] if has_labels else None, cat["lt"] if has_labels else None)

    def __len__(self) -> int:
        return len(self.pos)

    def category_mask(self, categories: Sequence[int], align: str = "input") -> np.ndarray:
        """``[N]`` tokens labelled with any of ``categories`` (column indices); ``align``: input, target or either."""
        if self.labels_input is None or self.labels_target is None:
            raise ConfigError("these tokens carry no concept labels")
        cols = list(categories)
        if align == "input":
            return self.labels_input[:, cols].any(1)
        if align == "target":
            return self.labels_target[:, cols].any(1)
        if align == "either":
            return self.labels_input[:, cols].any(1) | self.labels_target[:, cols].any(1)
        raise ConfigError(f"align must be input, target or either, got {align!r}")


MakeInterventions = Callable[[int, Any], Mapping[Site, Intervention | list[Intervention]]]


def corpus_losses(model: HookedModel, batches: Sequence[Any],
                  interventions: MakeInterventions | Mapping[Site, Any] | None = None,
                  progress: Callable[[], None] | None = None) -> np.ndarray:
    """Next-token losses ``[N]`` (in :class:`TokenTable` order) over ``batches``, with optional interventions.

    Args:
        interventions: a fixed intervention map, or ``fn(batch_index, batch) -> map`` for batch-dependent ones
            (resample ablation).
    """
    out = []
    for i, bt in enumerate(batches):
        fns = interventions(i, bt) if callable(interventions) else (interventions or {})
        logits = run_with_interventions(model, bt.input_ids, bt.attention_mask, fns)
        nll, valid = next_token_nll(logits, bt.input_ids, bt.attention_mask)
        out.append(nll[valid].cpu().numpy().astype(np.float64))
        if progress is not None:
            progress()
    return np.concatenate(out) if out else np.zeros(0)


def ablation_factory(model: HookedModel, *, neurons: Iterable[tuple[int, int]] = (),
                     heads: Iterable[tuple[int, int]] = (), method: str = "zero",
                     means: Mapping[Site, Tensor] | None = None) -> MakeInterventions:
    """A per-batch intervention maker for :func:`corpus_losses`.

    For ``resample`` each window takes the activations of the next window in its batch (rolled by one), so the
    batch needs at least two windows; for ``mean`` the means are computed by the caller (:func:`reference_means`).
    """
    neurons, heads = list(neurons), list(heads)
    if not neurons and not heads:
        raise ConfigError("nothing to ablate: give neurons or heads")
    if method not in METHODS:
        raise ConfigError(f"unknown ablation method {method!r}; use one of {', '.join(METHODS)}")
    sites = list(group_units(model, neurons, "mlp.hook_post")) + list(group_units(model, heads, "attn.hook_z"))
    if method != "resample":
        fixed = combine(neuron_ablation(model, neurons, method, means=means),
                        head_ablation(model, heads, method, means=means))
        return lambda _i, _bt: fixed

    def make(_i: int, bt: Any) -> Mapping[Site, Any]:
        if bt.input_ids.shape[0] < 2:
            raise ConfigError("resample ablation needs batches of at least two windows")
        src = capture_sources(model, bt.input_ids.roll(1, 0), bt.attention_mask.roll(1, 0), sites)
        return combine(neuron_ablation(model, neurons, method, sources=src),
                       head_ablation(model, heads, method, sources=src))

    return make


@dataclass
class AblationEffect:
    """Per-token next-token losses with and without an ablation (see :func:`ablation_effect`)."""

    tokens: TokenTable
    clean: np.ndarray  # [N]
    ablated: np.ndarray  # [N]
    categories: list[str] = field(default_factory=list)

    @property
    def delta(self) -> np.ndarray:
        """Loss increase per token (positive = the ablation hurt)."""
        return self.ablated - self.clean

    def summary(self) -> dict[str, float]:
        return {"n_tokens": int(len(self.clean)), "clean_loss": float(self.clean.mean()),
                "ablated_loss": float(self.ablated.mean()), "delta_loss": float(self.delta.mean())}

    def by_category(self, align: str = "input") -> Any:
        """Per category: tokens, clean and ablated loss, loss increase, and the increase on the other tokens."""
        import pandas as pd

        rows = []
        d = self.delta
        for c, name in enumerate(self.categories):
            m = self.tokens.category_mask([c], align)
            if not m.any():
                rows.append({"category": name, "n_tokens": 0, "clean_loss": np.nan, "ablated_loss": np.nan,
                             "delta_loss": np.nan, "delta_other": float(d.mean())})
                continue
            rows.append({"category": name, "n_tokens": int(m.sum()), "clean_loss": float(self.clean[m].mean()),
                         "ablated_loss": float(self.ablated[m].mean()), "delta_loss": float(d[m].mean()),
                         "delta_other": float(d[~m].mean()) if (~m).any() else np.nan})
        return pd.DataFrame(rows, columns=["category", "n_tokens", "clean_loss", "ablated_loss", "delta_loss",
                                           "delta_other"])

    def top_tokens(self, tokenizer: Any, batches: Sequence[Any], k: int = 20, context: int = 8) -> Any:
        """The ``k`` predicted tokens whose log-probability changed most (by absolute change)."""
        import pandas as pd

        change = -(self.delta)  # change in log-probability of the true next token
        order = np.argsort(-np.abs(change), kind="stable")[:k]
        rows = []
        for j in order:
            t = self.tokens
            ids = batches[t.batch[j]].input_ids[t.row[j]]
            lo = max(0, int(t.pos[j]) - context + 1)
            ctx = tokenizer.decode(ids[lo : int(t.pos[j]) + 1].tolist())
            rows.append({"context": ctx, "token": tokenizer.decode([int(t.target_ids[j])]),
                         "token_id": int(t.target_ids[j]), "doc_id": int(t.doc_ids[j]), "position": int(t.pos[j]) + 1,
                         "clean_logprob": float(-self.clean[j]), "ablated_logprob": float(-self.ablated[j]),
                         "logprob_change": float(change[j])})
        return pd.DataFrame(rows)


def ablation_effect(model: HookedModel, batches: Sequence[Any], *, neurons: Iterable[tuple[int, int]] = (),
                    heads: Iterable[tuple[int, int]] = (), method: str = "zero",
                    means: Mapping[Site, Tensor] | None = None, categories: Sequence[str] = (),
                    clean: np.ndarray | None = None, progress: Callable[[], None] | None = None) -> AblationEffect:
    """Effect of ablating ``neurons`` and/or ``heads`` on next-token loss over ``batches``.

    Args:
        batches: a list of TokenBatch (labelled when per-category effects are wanted, see :func:`corpus_batches`).
        method: ``zero``, ``mean`` or ``resample``. For ``mean`` without ``means``, the means are computed over
            ``batches`` themselves.
        categories: names of the label columns of the batches.
        clean: precomputed clean losses (from :func:`corpus_losses`), to share one clean pass between ablations.
    """
    neurons, heads = list(neurons), list(heads)
    if method == "mean" and means is None:
        sites = list(group_units(model, neurons, "mlp.hook_post")) + list(group_units(model, heads, "attn.hook_z"))
        means = reference_means(model, sites, batches)
    make = ablation_factory(model, neurons=neurons, heads=heads, method=method, means=means)
    tokens = TokenTable.from_batches(batches)
    if clean is None:
        clean = corpus_losses(model, batches, None, progress)
    ablated = corpus_losses(model, batches, make, progress)
    return AblationEffect(tokens, clean, ablated, list(categories))
