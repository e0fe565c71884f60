"""The predictor (``ActivationPredictor``): the base model reporting one of its own neurons.

Three heads share one interface (the trainer and the evaluator never branch on the head type):

* ``regression``: ``LayerNorm -> [Linear -> GELU ->] Linear -> 1`` on the residual stream after block
  ``read_layer`` (``blocks.R.hook_resid_post``), predicting the *standardised* target (``(y - mean) / std`` of the
  training targets); loss MSE or Huber. The forward pass stops right after block ``R`` (blocks above it cannot
  change what is read).
* ``classification``: the same head with ``C`` outputs over quantile bins of the training targets
  (cross-entropy). Its continuous score is the expected bin value ``sum_c p_c * mean(y | bin c)``.
* ``token``: no extra parameters. Each target token ``t`` becomes one sequence
  ``window[0 .. t] + prompt`` and the model itself must answer the bin index as a digit token (``answer``),
  trained with the ordinary LM cross-entropy over the whole vocabulary. The report literally comes out of the
  model. Predictions read the logits of the ``C`` digit tokens; ``free_accuracy`` also checks the unconstrained
  argmax over the vocabulary.

Every head is evaluated both as a regressor (its continuous score) and as a classifier (its bin), so the heads
and the baselines are compared on the same numbers.

*Unfreezing*: the "top" block is ``read_layer`` for the window heads (nothing above it matters) and the last block
for the token head (whose final norm is unfrozen with its blocks). ``set_unfrozen(n)`` makes the ``n`` blocks
ending at the top trainable; ``"all"`` unfreezes every model parameter (embeddings included).

*Frozen-prefix cache* (window heads): blocks below the first trainable block ``j`` never change, so the residual
stream entering block ``j`` is computed once per window (:meth:`prefix_states`) and each training step runs only
blocks ``j..top``: the frozen blocks are swapped for pass-throughs and a hook on block ``j`` feeds the cached
input. With the head alone (``j = top + 1``) the cache holds the features themselves. The fast path is checked
against a full forward pass before it is used (:meth:`check_prefix_path`); any mismatch falls back to full passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import HookedModel, Site
from .config import NeuronRef, PredictorConfig
from .dataset import SplitTensors

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the read hook to end the forward pass once the residual stream has been read."""


class _Passthrough(nn.Module):
    """Stands in for a frozen block whose output is supplied from a cache: returns its input unchanged."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


@dataclass
class TargetCodec:
    """How targets are standardised and binned (fitted on the training targets)."""

    mean: float
    std: float
    edges: list[float]  # inner bin edges, ascending; class = number of edges <= y
    class_values: list[float]  # mean training target of each bin

    @property
    def n_classes(self) -> int:
        return len(self.edges) + 1

    @classmethod
    def fit(cls, targets: np.ndarray, n_classes: int, binning: str = "quantile") -> TargetCodec:
        """Standardisation and ``n_classes`` bins: equally populated (``quantile``) or equally wide (``uniform``)."""
        y = np.asarray(targets, dtype=np.float64)
        if y.size < 2:
            raise ConfigError("fewer than 2 training targets; raise dataset.max_tokens")
        if binning == "uniform":
            lo, hi = float(y.min()), float(y.max())
            edges = np.unique(np.linspace(lo, hi, n_classes + 1)[1:-1]) if hi > lo else np.array([lo])
        else:
            edges = np.unique(np.quantile(y, np.arange(1, n_classes) / n_classes))
        cls_idx = np.searchsorted(edges, y, side="right")
        bounds = np.concatenate([[y.min()], edges, [y.max()]])
        values = []
        for c in range(len(edges) + 1):
            members = y[cls_idx == c]
            # an empty bin (ties at a quantile edge, or a gap in uniform bins) is represented by its midpoint
            values.append(float(members.mean()) if members.size else float((bounds[c] + bounds[c + 1]) / 2))
        std = float(y.std())
        return cls(float(y.mean()), std if std > 1e-8 else 1.0, [float(e) for e in edges], values)

    def classes(self, y: Tensor) -> Tensor:
        edges = torch.tensor(self.edges, dtype=y.dtype, device=y.device)
        return torch.bucketize(y, edges, right=True)

    def classes_np(self, y: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges), y, side="right")

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "edges": self.edges, "class_values": self.class_values}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TargetCodec:
        return cls(float(data["mean"]), float(data["std"]), list(data["edges"]), list(data["class_values"]))


Prefix = tuple[int, Tensor]
"""``(start, states)``: the residual stream entering block ``start`` for every window of a split."""


class ReadoutHead(nn.Module):
    """``[LayerNorm ->] [Linear -> GELU ->] Linear`` from ``d_model`` to ``n_out``."""

    def __init__(self, d_model: int, n_out: int, *, hidden: int = 0, norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(d_model)] if norm else []
        if hidden:
            layers += [nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_out)]
        else:
            layers.append(nn.Linear(d_model, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@dataclass
class Predictions:
    """Predictions for the selected positions of a split (window-major order).

    ``score`` is the continuous prediction in activation units, ``cls`` the predicted bin, ``probs`` the bin
    probabilities (None for regression), ``free_cls`` (token head) the unconstrained argmax mapped to a bin or -1.
    """

    score: np.ndarray
    cls: np.ndarray
    probs: np.ndarray | None = None
    free_cls: np.ndarray | None = None


class ActivationPredictor:
    """The base model plus a readout (see the module docstring).

    Args:
        hooked: the model; it is trained in place (the pipeline restores the weights afterwards).
        neuron: the target neuron (named in the token head's prompt).
        config: the predictor section.
        codec: target standardisation and bins from the training split.
        seed: seeds the head initialisation.
    """

    def __init__(self, hooked: HookedModel, neuron: NeuronRef, config: PredictorConfig, codec: TargetCodec,
                 *, seed: int = 0) -> None:
        self.hooked = hooked
        self.model = hooked.model
        self.neuron = neuron
        self.config = config
        self.codec = codec
        self.kind = config.head
        n = hooked.n_layers
        r = config.read_layer if config.read_layer is not None else n - 1
        r = r + n if r < 0 else r
        if not 0 <= r < n:
            raise ConfigError(f"predictor.read_layer {config.read_layer} is out of range for {n} layers")
        self.read_layer = r
        self.site = Site.resid_post(r)
        self.base = getattr(self.model, self.model.base_model_prefix, None) or self.model
        self.head: nn.Module | None = None
        if self.kind != "token":
            n_out = 1 if self.kind == "regression" else codec.n_classes
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            self.head = ReadoutHead(hooked.d_model, n_out, hidden=config.hidden, norm=config.norm)
            torch.random.set_rng_state(gen_state)
            self.head.to(device=hooked.device)
        else:
            self._init_token_head()
        self.set_unfrozen(0)

    # ------------------------------------------------------------------------------------------ parameters
    @property
    def top_block(self) -> int:
        return self.read_layer if self.kind != "token" else self.hooked.n_layers - 1

    @property
    def n_blocks_below_top(self) -> int:
        return self.top_block + 1

    def _block_prefix(self, i: int) -> str:
        return f"{self.hooked.adapter.layers}.{i}."

    def model_param_names(self, n_blocks: int | str) -> list[str]:
        """Names of the model parameters trainable with ``n_blocks`` unfrozen (an int or ``"all"``)."""
        names = [name for name, _ in self.model.named_parameters()]
        if n_blocks == "all":
            return names
        n_blocks = min(int(n_blocks), self.n_blocks_below_top)
        if n_blocks <= 0:
            return []
        prefixes = tuple(self._block_prefix(i) for i in range(self.top_block - n_blocks + 1, self.top_block + 1))
        out = [name for name in names if name.startswith(prefixes)]
        if self.kind == "token":
            norm = self.hooked.adapter.final_norm + "."
            out += [name for name in names if name.startswith(norm)]
        return out

    def set_unfrozen(self, n_blocks: int | str) -> list[str]:
        """Make exactly the head and ``n_blocks`` top blocks (or ``"all"``) trainable; returns the model names."""
        names = set(self.model_param_names(n_blocks))
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in names)
        if self.head is not None:
            self.head.requires_grad_(True)
        return sorted(names)

    def model_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def named_tunable(self, model_names: list[str]) -> dict[str, nn.Parameter]:
        """``{"head.x": p, "model.y": p}`` for the head and the given model parameters (checkpoint keys)."""
        params = dict(self.model.named_parameters())
        out: dict[str, nn.Parameter] = {}
        if self.head is not None:
            out.update({f"head.{k}": p for k, p in self.head.named_parameters()})
        out.update({f"model.{k}": params[k] for k in model_names})
        return out

    # ------------------------------------------------------------------------------------------ forward
    def features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Residual stream after block ``read_layer``: ``[batch, pos, d_model]`` (autograd as the caller set)."""
        store: dict[str, Tensor] = {}

        def grab(act: Tensor, _site: Site) -> None:
            store["x"] = act
            raise _Stop

        dev = self.hooked.device
        with self.hooked.hooks({self.site: grab}):
            try:
                self.base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            except _Stop:
                pass
        return store["x"]

    @contextlib.contextmanager
    def _skip_blocks(self, start: int) -> Iterator[None]:
        """Temporarily replace blocks ``0..start-1`` by pass-throughs (restored on exit, even on error)."""
        blocks = self.hooked.blocks
        saved = [blocks[i] for i in range(start)]
        try:
            for i in range(start):
                blocks[i] = _Passthrough()
            yield
        finally:
            for i, block in enumerate(saved):
                blocks[i] = block

    def features_from(self, start: int, states: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Features when ``states`` is the residual stream entering block ``start`` (see the module docstring)."""
        if start > self.read_layer:
            return states
        store: dict[str, Tensor] = {}

        def feed(act: Tensor, _site: Site) -> Tensor:
            return states.to(device=act.device, dtype=act.dtype)

        def grab(act: Tensor, _site: Site) -> None:
            store["x"] = act
            raise _Stop

        dev = self.hooked.device
        with self._skip_blocks(start), self.hooked.hooks({Site.resid_pre(start): feed, self.site: grab}):
            try:
                self.base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            except _Stop:
                pass
        return store["x"]

    @torch.no_grad()
    def prefix_states(self, split: SplitTensors, start: int, batch_size: int = 16) -> Tensor:
        """Residual stream entering block ``start`` (or the features when ``start > read_layer``) for every window."""
        if start > self.read_layer:
            return self.compute_features(split, batch_size)
        site = Site.resid_pre(start)
        out = []
        for i in range(0, len(split), batch_size):
            _, cache = self.hooked.run_with_cache(split.input_ids[i : i + batch_size],
                                                  split.attention_mask[i : i + batch_size], sites=[site],
                                                  stop_at_layer=start + 1)
            out.append(cache[site])
        return torch.cat(out)

    @torch.no_grad()
    def check_prefix_path(self, split: SplitTensors, start: int, n: int = 2) -> bool:
        """Whether the cached-prefix forward equals a full forward on the first ``n`` windows of ``split``."""
        if start == 0 or len(split) == 0:
            return start == 0
        sub = split.subset(list(range(min(n, len(split)))))
        full = self.features(sub.input_ids, sub.attention_mask)
        try:
            fast = self.features_from(start, self.prefix_states(sub, start), sub.input_ids, sub.attention_mask)
        except Exception as exc:  # noqa: BLE001 - any failure of the fast path means: do not use it
            log.warning("cached frozen-prefix path unavailable (%s); using full forward passes", exc)
            return False
        mask = sub.attention_mask.bool().to(full.device)
        scale = float(full[mask].abs().max()) or 1.0
        ok = full.shape == fast.shape and float((full - fast)[mask].abs().max()) <= 1e-4 * scale
        if not ok:
            log.warning("cached frozen-prefix path differs from a full forward pass; using full passes")
        return ok

    def compute_features(self, split: SplitTensors, batch_size: int = 16) -> Tensor:
        """Features of every window of ``split`` (no grad), in fixed chunks so values never depend on batching."""
        out = []
        with torch.no_grad():
            for i in range(0, len(split), batch_size):
                out.append(self.features(split.input_ids[i : i + batch_size], split.attention_mask[i : i + batch_size]))
        return torch.cat(out)

    def n_items(self, split: SplitTensors) -> int:
        """Training items of a split: windows for the window heads, target tokens for the token head."""
        return len(split) if self.kind != "token" else split.n_targets

    def _outputs(self, split: SplitTensors, items: Tensor, prefix: Prefix | None) -> tuple[Tensor, Tensor]:
        """Raw outputs for the targets of ``items`` and the targets ``y``.

        Window heads: ``[n_targets, n_out]`` head outputs; token head: ``[n_items, vocab]`` logits.
        ``prefix``: ``(start, states)`` cached residual streams entering block ``start`` for every window.
        """
        if self.kind == "token":
            pairs = split.selected.nonzero()[items]
            logits = self._token_logits(split, pairs)
            return logits, split.target[pairs[:, 0], pairs[:, 1]].to(logits.device)
        assert self.head is not None
        ids, mask = split.input_ids[items], split.attention_mask[items]
        if prefix is not None:
            feats = self.features_from(prefix[0], prefix[1][items], ids, mask)
        else:
            feats = self.features(ids, mask)
        dev = feats.device
        sel = split.selected[items].to(dev)
        out = self.head(feats[sel].to(self.head_dtype))
        return out, split.target[items].to(dev)[sel]

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Summed loss of raw outputs against targets."""
        if self.kind == "regression":
            z = (y.to(out.dtype) - self.codec.mean) / self.codec.std
            if self.config.loss == "huber":
                return F.huber_loss(out[:, 0], z, delta=self.config.huber_delta, reduction="sum")
            return F.mse_loss(out[:, 0], z, reduction="sum")
        labels = self.codec.classes(y)
        if self.kind == "token":
            labels = self.answer_ids.to(labels.device)[labels]
        return F.cross_entropy(out, labels, reduction="sum")

    def loss_on(self, split: SplitTensors, items: Tensor, prefix: Prefix | None = None) -> tuple[Tensor, int]:
        """Summed loss and number of targets over ``items`` (indices into :meth:`n_items`)."""
        out, y = self._outputs(split, items, prefix)
        return self._loss(out, y), int(y.numel())

    @property
    def head_dtype(self) -> torch.dtype:
        assert self.head is not None
        return next(self.head.parameters()).dtype

    @torch.no_grad()
    def predict(self, split: SplitTensors, *, batch_size: int = 16, prefix: Prefix | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[Predictions, float]:
        """Predictions for every selected position of ``split`` and the mean loss over them.

        ``progress(done, total)`` is called after each batch of items.
        """
        scores, classes, probs, free = [], [], [], []
        values = torch.tensor(self.codec.class_values, dtype=torch.float32)
        lookup = {int(t): c for c, t in enumerate(self.answer_ids.tolist())} if self.kind == "token" else {}
        total, count = 0.0, 0
        n = self.n_items(split)
        for i in range(0, n, batch_size):
            items = torch.arange(i, min(n, i + batch_size))
            out, y = self._outputs(split, items, prefix)
            total += float(self._loss(out, y))
            count += int(y.numel())
            if progress is not None:
                progress(int(items[-1]) + 1, n)
            out = out.float().cpu()
            if self.kind == "regression":
                s = out[:, 0] * self.codec.std + self.codec.mean
                scores.append(s)
                classes.append(self.codec.classes(s))
                continue
            if self.kind == "token":
                free.append(torch.tensor([lookup.get(int(t), -1) for t in out.argmax(-1)], dtype=torch.long))
                out = out[:, self.answer_ids]
            p = out.softmax(-1)
            probs.append(p)
            scores.append(p @ values)
            classes.append(p.argmax(-1))
        preds = Predictions(
            score=torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32),
            cls=torch.cat(classes).numpy() if classes else np.zeros(0, dtype=np.int64),
            probs=torch.cat(probs).numpy() if probs else None,
            free_cls=torch.cat(free).numpy() if free else None,
        )
        return preds, total / max(count, 1)

    # ------------------------------------------------------------------------------------------ token head
    def _init_token_head(self) -> None:
        tok = self.hooked.tokenizer
        try:
            prompt = self.config.prompt.format(layer=self.neuron.layer, neuron=self.neuron.neuron)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"predictor.prompt: bad placeholder {exc}; use {{layer}} and {{neuron}}") from None
        self.prompt_ids = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
        answers = []
        for c in range(self.codec.n_classes):
            ids = tok(self.config.answer.format(digit=c), add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f"predictor.answer {self.config.answer!r} gives {len(ids)} tokens for digit {c} "
                                  "with this tokenizer; it must be a single token")
            answers.append(ids[0])
        if len(set(answers)) != len(answers):
            raise ConfigError("predictor.answer maps different digits to the same token")
        self.answer_ids = torch.tensor(answers, dtype=torch.long)

    def _token_logits(self, split: SplitTensors, pairs: Tensor) -> Tensor:
        """Vocabulary logits ``[n, vocab]`` at the end of ``window[:t+1] + prompt`` for each (window, t) pair."""
        prompt = self.prompt_ids
        lengths = pairs[:, 1] + 1 + len(prompt)
        width = int(lengths.max())
        pad = self.hooked.tokenizer.pad_token_id or 0
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (w, t) in enumerate(pairs.tolist()):
            ids[row, : t + 1] = split.input_ids[w, : t + 1]
            ids[row, t + 1 : t + 1 + len(prompt)] = prompt
            mask[row, : t + 1 + len(prompt)] = 1
        dev = self.hooked.device
        hidden = self.base(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(pairs), device=dev), (lengths - 1).to(dev)]
        return self.model.get_output_embeddings()(last)

    # ------------------------------------------------------------------------------------------ state
    def describe(self) -> dict[str, Any]:
        return {
            "head": self.kind, "read_layer": self.read_layer, "read_site": str(self.site) if self.kind != "token" else None,
            "n_classes": self.codec.n_classes, "codec": self.codec.to_json(),
            "prompt": None if self.kind != "token" else self.hooked.tokenizer.decode(self.prompt_ids.tolist()),
            "head_parameters": sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0,
        }
