"""Training and evaluating sparse dictionaries on the scan's own token stream (``neuronhunter features train``).

Data flow::

    DictionaryConfig -> load model -> Scanner (same corpus reading, document split, windows, BOS, batches)
      -> train side: forward passes that stop after the last chosen layer; the neuron activations
         (``blocks.L.mlp.hook_post``; for a transcoder the MLP's input and output) of the tokens that count
         (:mod:`neuronhunter.stats.tokens`: no padding, not position 0) go into a shuffle buffer
      -> each full buffer is shuffled (seeded) and cut into optimiser steps of ``token_batch`` tokens:
         sparsify's SparseCoder forward (FVU + AuxK), backward, sparsify's decoder-gradient projection, its
         SignSGD in a schedule-free wrapper; the rest of the buffer waits for the next one
      -> after every ``checkpoint_every`` buffers: checkpoints/train.safetensors (coders, optimiser state, the
         buffer's rest, the shuffle generator, counters; atomically) — ``--resume`` continues from there and
         refuses another config, model or corpus
      -> held-out side: FVU, dead features, and the next-token loss clean / with the layer replaced by its
         reconstruction / mean-ablated -> weights.safetensors, metrics.json, config.json, manifest.json (last)

**Which tokens.** Training and evaluation use the counted tokens only: position 0 (the prepended BOS, or a
window's first token) carries "massive activations" unlike any other position and is excluded, as in the scan. The
splice that measures the loss replaces the layer at counted positions and leaves position 0 as it was.

**Loss recovered** = ``(L_mean - L_dict) / (L_mean - L_clean)``: 1 when the reconstruction is as good as the real
neurons, 0 when it is no better than replacing every neuron by its mean over the training tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..config import ScanConfig, StrictModel
from ..errors import ConfigError, RunDirError
from ..models.hooked import HookedModel
from ..models.sites import Site
from ..runfolder import RunFolder
from ..stats.state import FINGERPRINT_MOD, model_fingerprint, window_digest
from ..stats.tokens import counted_tokens
from .dictionary import KINDS, WEIGHTS, Dictionary, new_coder, sparsify

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/train.safetensors"
METRICS = "metrics.json"
ProgressFn = Callable[[int, int | None], None]


class DictionaryConfig(StrictModel):
    """Options of ``neuronhunter features train``."""

    model: str = Field("smollm2-135m", description="alias, hub id, local folder or .gguf file")
    corpus: str | None = Field("master", description="corpus spec (default: the bundled master text)")
    text_field: str = Field("text")
    out: str = Field("runs/features", description="run folder")
    layers: list[int] = Field(..., min_length=1, description="layers whose neurons get a dictionary")
    kind: str = Field("sae", description="sae (neurons -> neurons) or transcoder (MLP input -> MLP output)")
    n_features: int | None = Field(None, ge=2, description="features per layer (default: expansion x width)")
    expansion: int = Field(8, ge=1, le=256, description="features per neuron when n_features is not given")
    k: int = Field(32, ge=1, description="active features per token (top-k)")
    optimizer: str = Field("signum", pattern="^(signum|adam)$", description="sparsify's default signum "
                           "(SignSGD, schedule-free) or Adam")
    lr: float | None = Field(None, gt=0, description="learning rate (default: sparsify's rule for the width)")
    auxk_alpha: float = Field(1 / 32, ge=0, description="weight of the AuxK loss on dead features")
    dead_tokens: int = Field(100_000, ge=1, description="a feature silent for this many training tokens is "
                             "dead (for the AuxK loss)")
    train_tokens: int = Field(200_000, ge=1, description="training tokens per pass (counted tokens of the train "
                              "side)")
    epochs: int = Field(1, ge=1, le=100, description="passes over the training tokens (small corpora)")
    eval_tokens: int = Field(8192, ge=1, description="held-out tokens for FVU, dead features and losses")
    token_batch: int = Field(1024, ge=8, description="tokens per optimiser step")
    shuffle_tokens: int = Field(16384, ge=8, description="tokens shuffled together before being cut into steps")
    context_length: int = Field(128, ge=2, le=8192)
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    prepend_bos: bool = True
    include_first: bool = Field(False, description="train on position 0 too (not recommended)")
    heldout_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    split_seed: int = 0
    seed: int = 0
    checkpoint_every: int = Field(4, ge=0, description="checkpoint every N shuffle buffers (0 = never)")
    device: str = "cpu"
    dtype: str = "float32"

    @model_validator(mode="after")
    def _check(self) -> DictionaryConfig:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if any(layer < 0 for layer in self.layers):
            raise ValueError("layers must be non-negative")
        if self.shuffle_tokens < self.token_batch:
            raise ValueError("shuffle_tokens must be at least token_batch")
        return self

    def scan_config(self, side: str, max_tokens: int) -> ScanConfig:
        """The scan settings whose windows feed training (``train``) or evaluation (``heldout``)."""
        return ScanConfig(model=self.model, corpus=self.corpus, text_field=self.text_field, layers=self.layers,
                          context_length=self.context_length, batch_size=self.batch_size, max_tokens=max_tokens,
                          prepend_bos=self.prepend_bos, include_first=self.include_first, split=side,
                          heldout_fraction=self.heldout_fraction, split_seed=self.split_seed, seed=self.seed,
                          device=self.device, dtype=self.dtype, checkpoint_every=0, compile_stats=False)


def resume_key(cfg: DictionaryConfig) -> dict[str, Any]:
    """What a resumed training run must share with the interrupted one."""
    return cfg.model_dump(mode="json", exclude={"out", "checkpoint_every", "device"})


# ---------------------------------------------------------------------------------------------------- taps
@contextlib.contextmanager
def tap(model: HookedModel, layers: list[int], kind: str, store: dict[int, tuple[Tensor, Tensor | None]]
        ) -> Iterator[None]:
    """Record what a dictionary reads (and, for a transcoder, predicts) at each layer during forward passes:
    ``store[layer] = (x, y)`` with ``y`` None for an SAE (it reconstructs ``x``, the neurons)."""
    if kind == "sae":
        def record(act: Tensor, site: Site) -> None:
            store[site.layer] = (act.detach().clone(), None)

        with model.hooks({Site.mlp_post(layer): record for layer in layers}):
            yield
        return
    handles = []
    inputs: dict[int, Tensor] = {}
    try:
        for layer in layers:
            mlp = model.module(layer, model.adapter.mlp)

            def pre(_m: Any, args: tuple, kwargs: dict, layer: int = layer) -> None:
                inputs[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

            def post(_m: Any, _args: tuple, output: Any, layer: int = layer) -> None:
                out = output[0] if isinstance(output, tuple) else output
                store[layer] = (inputs.pop(layer), out.detach().clone())

            handles.append(mlp.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mlp.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaced(model: HookedModel, layer: int, kind: str, fn: Callable[[Tensor, Tensor], Tensor], keep: Tensor
             ) -> Iterator[None]:
    """Inside the block, layer ``layer``'s neurons (SAE) or MLP output (transcoder) are replaced at the positions
    ``keep`` ``[batch, pos]`` by ``fn(x, y)`` (``x`` what the dictionary reads, ``y`` the original value there;
    ``[n, d]`` rows of the kept positions)."""
    if kind == "sae":
        def splice(act: Tensor, _site: Site) -> Tensor:
            out = act.clone()
            rows = act[keep]
            out[keep] = fn(rows, rows).to(act.dtype)
            return out

        with model.hooks({Site.mlp_post(layer): splice}):
            yield
        return
    mlp = model.module(layer, model.adapter.mlp)
    seen: dict[str, Tensor] = {}

    def pre(_m: Any, args: tuple, kwargs: dict) -> None:
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def post(_m: Any, _args: tuple, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        new = out.clone()
        new[keep] = fn(seen["x"][keep], out[keep]).to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = [mlp.register_forward_pre_hook(pre, with_kwargs=True), mlp.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def scan_batches(model: HookedModel, scfg: ScanConfig, *, skip: int = 0, expect_fp: int | None = None,
                 fingerprint: list[int] | None = None) -> Iterator[tuple[int, Any, list[int]]]:
    """``(batch index, TokenBatch, layers)`` over the scan's batches of ``scfg`` (same windows as a scan).

    The first ``skip`` batches are read but not yielded; their windows must add up to the corpus fingerprint
    ``expect_fp`` (else the corpus changed since a checkpoint: :class:`RunDirError`). ``fingerprint[0]`` is kept
    up to date with every window read."""
    from ..data.batches import iter_batches
    from ..scan import Scanner

    scanner = Scanner(model, scfg)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    fp = fingerprint if fingerprint is not None else [0]
    checked = not skip or expect_fp is None
    changed = RunDirError("cannot resume: the corpus differs from the one the interrupted run read; start again "
                          "with --overwrite")
    for index, (batch, wins) in enumerate(iter_batches(scanner.windows(labelled=False), batch_size=scfg.batch_size,
                                                      pad_token_id=pad, has_bos=scanner.bos is not None)):
        if not checked and index == skip:
            if fp[0] != expect_fp:
                raise changed
            checked = True
        for w in wins:
            fp[0] = (fp[0] + window_digest(w.source, w.start, w.ids)) % FINGERPRINT_MOD
        if index >= skip:
            yield index, batch, scanner.layers
    if not checked and fp[0] != expect_fp:
        raise changed


def counted_rows(store: dict[int, tuple[Tensor, Tensor | None]], keep: Tensor
                 ) -> dict[int, tuple[Tensor, Tensor | None]]:
    """The rows ``[n, d]`` (float32, on the CPU) of the counted tokens ``keep`` of each tapped layer."""
    return {layer: (x[keep].float().cpu(), None if y is None else y[keep].float().cpu())
            for layer, (x, y) in store.items()}


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainState:
    """What a checkpoint holds besides the coders and the optimiser."""

    epoch: int = 0
    batches_done: int = 0  # within the current pass
    steps: int = 0
    tokens: int = 0
    buffers: int = 0
    corpus_fp: int = 0
    since_fired: dict[int, Tensor] = field(default_factory=dict)
    rest: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    sums: dict[int, Tensor] = field(default_factory=dict)  # float64 sum of the reconstruction target
    fvu: dict[int, float] = field(default_factory=dict)  # running mean FVU of the last buffer


class DictionaryTrainer:
    """Owns the coders and the optimiser; :meth:`step` trains every layer's coder on one token batch."""

    def __init__(self, cfg: DictionaryConfig, d_in: int, layers: list[int]) -> None:
        self.cfg = cfg
        self.n_features = cfg.n_features or cfg.expansion * d_in
        self.coders = {layer: new_coder(d_in, self.n_features, cfg.k, kind=cfg.kind, seed=cfg.seed + layer)
                       for layer in layers}
        self.state = TrainState(since_fired={layer: torch.zeros(self.n_features, dtype=torch.long)
                                             for layer in layers})
        params = [{"params": list(c.parameters()), "lr": self.learning_rate()} for c in self.coders.values()]
        sp = sparsify()
        if cfg.optimizer == "signum":
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            self.optimizer: Any = ScheduleFreeWrapper(SignSGD(params), momentum=0.95)
            self.optimizer.train()
        else:
            self.optimizer = torch.optim.Adam(params)
        self._sp = sp

    def learning_rate(self) -> float:
        """sparsify's rule: 5e-3 (signum) or 2e-4 (Adam) scaled by ``(2**14 / n_features) ** 0.5``."""
        if self.cfg.lr is not None:
            return self.cfg.lr
        base = 5e-3 if self.cfg.optimizer == "signum" else 2e-4
        return base / math.sqrt(self.n_features / 2**14)

    def step(self, batch: dict[int, tuple[Tensor, Tensor | None]]) -> dict[int, float]:
        """One optimiser step on ``{layer: (x, y)}`` (``[n, d]`` rows); returns each layer's FVU."""
        cfg, st = self.cfg, self.state
        fvu = {}
        fired = {}
        for layer, (x, y) in batch.items():
            coder = self.coders[layer]
            target = x if y is None else y
            if st.steps == 0:  # as sparsify: centre the pre-activations and the decoder bias on the first batch
                with torch.no_grad():
                    if cfg.kind == "transcoder":
                        coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
                    coder.b_dec.data = target.mean(0)
            if cfg.kind == "sae":
                coder.set_decoder_norm_to_unit_norm()
            dead = st.since_fired[layer] > cfg.dead_tokens if cfg.auxk_alpha > 0 else None
            out = coder(x, y, dead_mask=dead)
            (out.fvu + cfg.auxk_alpha * out.auxk_loss).backward()
            fvu[layer] = float(out.fvu.detach())
            fired[layer] = out.latent_indices.flatten()
        if cfg.kind == "sae":
            for coder in self.coders.values():
                coder.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        n = next(iter(batch.values()))[0].shape[0]
        with torch.no_grad():
            for layer, idx in fired.items():
                counts = st.since_fired[layer]
                counts += n
                counts[idx] = 0
        st.steps += 1
        return fvu

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Inside the block the coders hold the schedule-free average (the weights to use and save)."""
        sf = hasattr(self.optimizer, "train_mode")
        if sf:
            self.optimizer.eval()
        try:
            yield
        finally:
            if sf:
                self.optimizer.train()

    def dictionary(self, meta: dict[str, Any] | None = None) -> Dictionary:
        """A copy of the current (averaged) coders as a :class:`Dictionary`."""
        with self.averaged():
            coders = {}
            for layer, coder in self.coders.items():
                copy = new_coder(coder.d_in, self.n_features, self.cfg.k, kind=self.cfg.kind)
                copy.load_state_dict({k: v.detach().clone() for k, v in coder.state_dict().items()})
                coders[layer] = copy.requires_grad_(False).eval()
        return Dictionary(coders, self.cfg.kind, dict(meta or {}))

    # ------------------------------------------------------------------------------------------------ checkpoint
    def save(self, path: Path, key: dict[str, Any], model_fp: str, gen: torch.Generator) -> None:
        """Everything needed to continue exactly where training stands (one safetensors file, atomically)."""
        from safetensors.torch import save_file

        from ..io import atomic_path

        st = self.state
        tensors: dict[str, Tensor] = {"generator": gen.get_state()}
        for layer, coder in self.coders.items():
            tensors.update({f"coder.{layer}.{k}": v.detach().contiguous().clone()
                            for k, v in coder.state_dict().items()})
            tensors[f"since_fired.{layer}"] = st.since_fired[layer]
            tensors[f"sums.{layer}"] = st.sums.get(layer, torch.zeros(1, dtype=torch.float64))
            x, y = st.rest.get(layer, (torch.zeros(0), None))
            tensors[f"rest_x.{layer}"] = x.contiguous()
            if y is not None:
                tensors[f"rest_y.{layer}"] = y.contiguous()
        opt = self.optimizer.state_dict()
        plain: dict[str, dict[str, Any]] = {}
        for idx, entry in opt["state"].items():
            for name, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"opt.{idx}.{name}"] = value.detach().contiguous().clone()
                else:
                    plain.setdefault(str(idx), {})[name] = value
        meta = {"config": json.dumps(key, sort_keys=True), "model_fp": model_fp,
                "counters": json.dumps({"epoch": st.epoch, "batches_done": st.batches_done, "steps": st.steps,
                                        "tokens": st.tokens,
                                        "buffers": st.buffers, "corpus_fp": f"{st.corpus_fp:064x}",
                                        "fvu": {str(k): v for k, v in st.fvu.items()}}),
                "param_groups": json.dumps(opt["param_groups"]), "opt_plain": json.dumps(plain)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def load(self, path: Path, key: dict[str, Any], model_fp: str, gen: torch.Generator) -> None:
        """Restore a checkpoint written by :meth:`save`; refuse one of another config or model."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        old = json.loads(meta.get("config") or "{}")
        if old != key:
            changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            raise RunDirError(f"cannot resume: the interrupted training used a different configuration "
                              f"({', '.join(changed)}); start again with --overwrite")
        if meta.get("model_fp") != model_fp:
            raise RunDirError("cannot resume: the model's weights differ from those of the interrupted training; "
                              "start again with --overwrite")
        counters = json.loads(meta["counters"])
        st = self.state
        st.epoch, st.batches_done = counters["epoch"], counters["batches_done"]
        st.steps, st.tokens = counters["steps"], counters["tokens"]
        st.buffers, st.corpus_fp = counters["buffers"], int(counters["corpus_fp"], 16)
        st.fvu = {int(k): v for k, v in counters["fvu"].items()}
        gen.set_state(tensors["generator"])
        for layer, coder in self.coders.items():
            prefix = f"coder.{layer}."
            coder.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            st.since_fired[layer] = tensors[f"since_fired.{layer}"]
            st.sums[layer] = tensors[f"sums.{layer}"]
            st.rest[layer] = (tensors[f"rest_x.{layer}"], tensors.get(f"rest_y.{layer}"))
        plain = json.loads(meta["opt_plain"])
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, idx, key_name = name.split(".", 2)
                state.setdefault(int(idx), {})[key_name] = value
        for idx, entry in plain.items():
            state.setdefault(int(idx), {}).update(entry)
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        if hasattr(self.optimizer, "train_mode"):
            self.optimizer.train_mode = True  # the saved coders are the training iterate already


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]


def train_loop(trainer: DictionaryTrainer, model: HookedModel, cfg: DictionaryConfig, *,
               checkpoint: Path | None = None, model_fp: str = "", progress: ProgressFn | None = None,
               resumed: bool = False) -> None:
    """Stream the train side through the model into the trainer (see the module docstring)."""
    st, key = trainer.state, resume_key(cfg)
    layers = list(trainer.coders)
    gen = torch.Generator().manual_seed(cfg.seed)
    if resumed and checkpoint is not None and checkpoint.exists():
        trainer.load(checkpoint, key, model_fp, gen)
        log.info("Resuming dictionary training after %d steps (%d tokens)", st.steps, st.tokens)
    pending: dict[int, list[tuple[Tensor, Tensor | None]]] = {layer: [] for layer in layers}
    for layer, rows in st.rest.items():
        if rows[0].numel():
            pending[layer].append(rows)
    counter = {"held": sum(rows[0].shape[0] for rows in pending[layers[0]])}  # tokens waiting in the buffer

    def flush() -> None:
        xs = {layer: torch.cat([p[0] for p in pending[layer]]) for layer in layers}
        ys = {layer: _cat([p[1] for p in pending[layer]]) for layer in layers}
        order = torch.randperm(xs[layers[0]].shape[0], generator=gen)
        steps = order.numel() // cfg.token_batch
        fvus: dict[int, list[float]] = {layer: [] for layer in layers}
        for s in range(steps):
            idx = order[s * cfg.token_batch:(s + 1) * cfg.token_batch]
            out = trainer.step({layer: (xs[layer][idx], None if ys[layer] is None else ys[layer][idx])
                                for layer in layers})
            for layer, v in out.items():
                fvus[layer].append(v)
        rest = order[steps * cfg.token_batch:]
        st.rest = {layer: (xs[layer][rest].clone(), None if ys[layer] is None else ys[layer][rest].clone())
                   for layer in layers}
        for layer in layers:
            pending[layer] = [st.rest[layer]]
        counter["held"] = int(rest.numel())
        st.fvu = {layer: sum(v) / len(v) for layer, v in fvus.items() if v}
        st.buffers += 1

    scfg = cfg.scan_config("train", cfg.train_tokens)
    total = cfg.train_tokens * cfg.epochs
    while st.epoch < cfg.epochs:
        _one_pass(trainer, model, cfg, scfg, pending, counter, flush, checkpoint, key, model_fp, gen, progress,
                  total)
        st.epoch += 1
        st.batches_done, st.corpus_fp = 0, 0
    if counter["held"] >= cfg.token_batch:
        flush()
    if st.steps == 0:
        raise ConfigError(f"the train side gave {st.tokens} tokens, fewer than one step of --token-batch "
                          f"{cfg.token_batch}; give a longer corpus or a smaller --token-batch")


def _one_pass(trainer: DictionaryTrainer, model: HookedModel, cfg: DictionaryConfig, scfg: ScanConfig,
              pending: dict[int, list[tuple[Tensor, Tensor | None]]], counter: dict[str, int],
              flush: Callable[[], None], checkpoint: Path | None, key: dict[str, Any], model_fp: str,
              gen: torch.Generator, progress: ProgressFn | None, total: int) -> None:
    """One pass over the train side (continuing after ``batches_done`` of a resumed pass)."""
    st = trainer.state
    layers = list(trainer.coders)
    fp = [0]
    for index, batch, _layers in scan_batches(model, scfg, skip=st.batches_done, expect_fp=st.corpus_fp,
                                              fingerprint=fp):
        store: dict[int, tuple[Tensor, Tensor | None]] = {}
        with torch.no_grad(), tap(model, layers, cfg.kind, store):
            model.forward(batch.input_ids, batch.attention_mask, stop_at_layer=max(layers) + 1)
        keep = counted_tokens(batch.attention_mask, include_first=cfg.include_first).to(model.device)
        rows = counted_rows(store, keep)
        for layer, (x, y) in rows.items():
            pending[layer].append((x, y))
            target = (x if y is None else y).double().sum(0)
            st.sums[layer] = target if layer not in st.sums else st.sums[layer] + target
        n = rows[layers[0]][0].shape[0]
        counter["held"] += n
        st.tokens += n
        st.batches_done = index + 1
        if counter["held"] >= cfg.shuffle_tokens:
            flush()
            st.corpus_fp = fp[0]
            if checkpoint is not None and cfg.checkpoint_every and st.buffers % cfg.checkpoint_every == 0:
                trainer.save(checkpoint, key, model_fp, gen)
        if progress is not None:
            progress(min(st.tokens, total), total)


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate(model: HookedModel, dictionary: Dictionary, cfg: DictionaryConfig, means: dict[int, Tensor], *,
             progress: ProgressFn | None = None) -> dict[int, dict[str, Any]]:
    """FVU, dead features, L0 and next-token losses of each layer's coder on the held-out side (see the module
    docstring); ``means`` are the training means of what each coder reconstructs (for the mean ablation)."""
    from ..causal.interventions import next_token_nll

    scfg = cfg.scan_config("heldout", cfg.eval_tokens)
    layers = dictionary.layers
    n_feat = dictionary.n_features
    acc = {layer: {"err": 0.0, "sum": None, "sq": 0.0, "n": 0, "fired": torch.zeros(n_feat, dtype=torch.long),
                   "l0": 0.0, "loss_dict": 0.0, "loss_mean": 0.0} for layer in layers}
    clean_loss, n_targets, done = 0.0, 0, 0
    kind = dictionary.kind
    for _index, batch, _layers in scan_batches(model, scfg):
        keep = counted_tokens(batch.attention_mask, include_first=cfg.include_first).to(model.device)
        ids, mask = batch.input_ids, batch.attention_mask
        store: dict[int, tuple[Tensor, Tensor | None]] = {}
        with tap(model, layers, kind, store):
            logits = model.forward(ids, mask)
        rows = counted_rows(store, keep)
        nll, valid = next_token_nll(logits, ids.to(logits.device), mask.to(logits.device))
        targets = valid & keep[:, :-1]  # predictions made at counted positions
        clean_loss += float(nll[targets].double().sum())
        n_targets += int(targets.sum())
        for layer in layers:
            x, y = rows[layer]
            target = x if y is None else y
            with torch.no_grad():
                recon = dictionary.reconstruct(layer, x)
                f_vals, f_idx = dictionary.encode(layer, x)
            a = acc[layer]
            a["err"] += float((target - recon).double().pow(2).sum())
            s = target.double().sum(0)
            a["sum"] = s if a["sum"] is None else a["sum"] + s
            a["sq"] += float(target.double().pow(2).sum())
            a["n"] += target.shape[0]
            active = f_vals > 0
            a["l0"] += float(active.sum())
            a["fired"].index_add_(0, f_idx[active], torch.ones(int(active.sum()), dtype=torch.long))
            for name, fn in (("loss_dict", lambda xr, _y, L=layer: dictionary.reconstruct(L, xr)),
                             ("loss_mean", lambda xr, _y, L=layer: means[L].to(xr.dtype).expand(xr.shape[0], -1))):
                with replaced(model, layer, kind, fn, keep):
                    lg = model.forward(ids, mask)
                nll2, _ = next_token_nll(lg, ids.to(lg.device), mask.to(lg.device))
                a[name] += float(nll2[targets].double().sum())
        done += int(keep.sum())
        if progress is not None:
            progress(min(done, cfg.eval_tokens), cfg.eval_tokens)
    if n_targets == 0:
        raise ConfigError("the held-out side gave no tokens to evaluate on; give a longer corpus or a larger "
                          "--heldout-fraction")
    out = {}
    clean = clean_loss / n_targets
    for layer, a in acc.items():
        n = a["n"]
        total = a["sq"] - float((a["sum"] ** 2).sum()) / n
        loss_dict, loss_mean = a["loss_dict"] / n_targets, a["loss_mean"] / n_targets
        dead = int((a["fired"] == 0).sum())
        out[layer] = {
            "site": f"blocks.{layer}.mlp.hook_post" if kind == "sae" else f"blocks.{layer}.mlp (in -> out)",
            "tokens": n, "targets": n_targets,
            "fvu": a["err"] / total if total > 0 else float("nan"),
            "l0": a["l0"] / n,
            "dead_features": dead, "dead_fraction": dead / n_feat,
            "loss_clean": clean, "loss_dictionary": loss_dict, "loss_mean_ablated": loss_mean,
            "loss_recovered": (loss_mean - loss_dict) / (loss_mean - clean) if loss_mean != clean else float("nan"),
        }
    return out


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class TrainResult:
    dictionary: Dictionary
    metrics: dict[int, dict[str, Any]]
    summary: dict[str, Any]
    out: Path | None


def train_dictionaries(cfg: DictionaryConfig, *, model: HookedModel | None = None,
                       progress: ProgressFn | None = None, overwrite: bool = False, resume: bool = False,
                       write: bool = True) -> TrainResult:
    """Train a dictionary for each of ``cfg.layers``, evaluate it on held-out text and write the run folder.

    Args:
        model: an already loaded model (else ``cfg.model`` is loaded).
        progress: called with ``(tokens_done, total)`` while training and evaluating.
        overwrite: replace a complete run in ``cfg.out``.
        resume: continue an interrupted training run from its checkpoint.
        write: write the run folder (False: train and evaluate in memory).
    """
    from .. import __version__
    from ..models.loading import load_model

    t0 = time.perf_counter()
    folder = RunFolder(cfg.out, kind="features train") if write else None
    if folder is not None:
        folder.check(overwrite=overwrite, resume=resume)
    if model is None:
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    layers = model.check_layers(cfg.layers)
    d_in = model.d_mlp if cfg.kind == "sae" else model.d_model
    trainer = DictionaryTrainer(cfg, d_in, layers)
    if cfg.k > trainer.n_features:
        raise ConfigError(f"--k {cfg.k} is more than the {trainer.n_features} features")
    model_fp = model_fingerprint(model.model)
    ckpt = None
    if folder is not None:
        work = folder.begin(overwrite=overwrite, resume=resume)
        ckpt = work / CHECKPOINT
        if folder.resumed and not ckpt.exists():
            log.info("no checkpoint was written before the interruption: training starts again")
    t1 = time.perf_counter()
    train_loop(trainer, model, cfg, checkpoint=ckpt, model_fp=model_fp, progress=progress,
               resumed=folder is not None and folder.resumed)
    train_s = time.perf_counter() - t1
    means = {layer: (s / max(trainer.state.tokens, 1)).float() for layer, s in trainer.state.sums.items()}
    meta = {"model": model.name, "model_fingerprint": model_fp, "corpus": cfg.corpus, "train_tokens": trainer.state.tokens,
            "steps": trainer.state.steps, "site": "blocks.{layer}.mlp.hook_post" if cfg.kind == "sae"
            else "blocks.{layer}.mlp (input -> output)", "library": f"sparsify {getattr(sparsify(), '__version__', '?')}"}
    dictionary = trainer.dictionary(meta)
    t2 = time.perf_counter()
    metrics = evaluate(model, dictionary, cfg, means, progress=progress)
    eval_s = time.perf_counter() - t2
    summary = {"kind": "features", "dictionary": {"kind": cfg.kind, "layers": layers, "n_features": trainer.n_features,
                                                   "k": cfg.k, "fingerprint": dictionary.fingerprint(),
                                                   "unit_site": f"blocks.{{layer}}.mlp.hook_post.{cfg.kind}.{{unit}}"},
               "model": {**model.info, "name": model.name, "family": model.adapter.family, "d_mlp": model.d_mlp,
                         "d_model": model.d_model, "n_layers": model.n_layers},
               "model_fingerprint": model_fp,
               "corpus": {"spec": cfg.corpus, "train": "train side of the document split",
                          "eval": "held-out side of the document split",
                          "split": cfg.scan_config("train", 1).document_split().manifest("train")},
               "train": {"tokens": trainer.state.tokens, "steps": trainer.state.steps,
                         "lr": trainer.learning_rate(), "optimizer": cfg.optimizer,
                         "last_buffer_fvu": trainer.state.fvu,
                         "dead_in_training": {layer: int((c > cfg.dead_tokens).sum())
                                              for layer, c in trainer.state.since_fired.items()}},
               "metrics": metrics,
               "timings": {"load_s": t1 - t0, "train_s": train_s, "eval_s": eval_s,
                           "train_tokens_per_s": trainer.state.tokens / max(train_s, 1e-9)},
               "versions": {"neuronhunter": __version__, "torch": torch.__version__,
                            "sparsify": getattr(sparsify(), "__version__", "?"), "threads": torch.get_num_threads()},
               "seed": cfg.seed}
    out = None
    if folder is not None:
        from ..io import write_json

        work = folder.work
        dictionary.save(work / WEIGHTS, {"metrics": metrics})
        write_json(work / METRICS, {str(k): v for k, v in metrics.items()})
        write_json(work / "config.json", cfg.model_dump(mode="json"))
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                ckpt.parent.rmdir()
        out = folder.commit(summary)
    return TrainResult(dictionary, metrics, summary, out)
