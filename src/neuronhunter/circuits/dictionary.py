"""Sparse dictionaries over a layer's neurons: top-k sparse autoencoders and transcoders (EleutherAI ``sparsify``).

A layer's MLP neurons (``blocks.L.mlp.hook_post``: for gated MLPs ``act(gate(x)) * up(x)``) are often
*polysemantic*: a model stores more features than it has neurons (superposition). A sparse autoencoder (SAE)
rewrites the ``d_mlp`` neuron activations ``a`` of each token as a sparse, non-negative combination of ``F > d_mlp``
learned directions::

    f = TopK(ReLU(W_enc (a - b_dec) + b_enc))       # [F] feature activations, at most k nonzero
    â = W_decᵀ f + b_dec                            # [d_mlp] reconstruction, decoder rows of unit norm

trained to minimise the *fraction of variance unexplained* ``FVU = Σ‖a - â‖² / Σ‖a - ā‖²`` (plus the AuxK loss
that revives dead features, Gao et al. 2024, "Scaling and evaluating sparse autoencoders"). A *transcoder* (Dunefsky
et al. 2024) has the same shape but reads the MLP's input and predicts the MLP's output: a sparse, interpretable
replacement of the whole MLP.

The model, its fused top-k encoder, the losses, the decoder normalisation and the optimiser are EleutherAI's
``sparsify`` (:class:`sparsify.SparseCoder`, ``SignSGD`` in a schedule-free wrapper, its learning-rate rule); this
module only stores one coder per layer (``weights.safetensors``: ``blocks.{L}.{parameter}`` tensors plus the
settings as safetensors metadata) and gives the dense feature activations the scan needs
(:meth:`Dictionary.features`). See ``docs/features.md`` for why sparsify and not SAELens or dictionary-learning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, RunDirError
from ..io import atomic_path

KINDS = ("sae", "transcoder")
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1


def sparsify() -> Any:
    """The ``sparsify`` package (its import prints a note about Triton on machines without it: kept quiet)."""
    from ..extras import require

    with contextlib.redirect_stdout(io.StringIO()):
        return require("sparsify")


def new_coder(d_in: int, n_features: int, k: int, *, kind: str = "sae", seed: int = 0) -> nn.Module:
    """A freshly initialised ``sparsify.SparseCoder`` (top-k; unit-norm decoder rows for an SAE, a zero decoder
    for a transcoder, as sparsify initialises them). A transcoder's input and output have the same width (the
    MLP reads and writes the residual stream)."""
    sp = sparsify()
    if kind not in KINDS:
        raise ConfigError(f"unknown dictionary kind {kind!r}; use one of {', '.join(KINDS)}")
    if not 1 <= k <= n_features:
        raise ConfigError(f"k must be in 1..{n_features} (the number of features), got {k}")
    cfg = sp.SparseCoderConfig(activation="topk", num_latents=n_features, k=k, normalize_decoder=kind == "sae",
                               transcode=kind == "transcoder")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        coder = sp.SparseCoder(d_in, cfg, device="cpu", dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return coder


@dataclass
class Dictionary:
    """One sparse coder per layer, all of the same kind, width and ``k``.

    Attributes:
        coders: ``{layer: sparsify.SparseCoder}``.
        kind: ``sae`` (neurons -> neurons) or ``transcoder`` (MLP input -> MLP output).
        meta: what it was trained on (model, fingerprint, corpus, tokens, metrics), stored with the weights.
    """

    coders: dict[int, nn.Module]
    kind: str = "sae"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.coders)

    @property
    def n_features(self) -> int:
        return int(next(iter(self.coders.values())).num_latents)

    @property
    def k(self) -> int:
        return int(next(iter(self.coders.values())).cfg.k)

    @property
    def d_in(self) -> int:
        return int(next(iter(self.coders.values())).d_in)

    def coder(self, layer: int) -> nn.Module:
        if layer not in self.coders:
            raise ConfigError(f"the dictionary has no coder for layer {layer} (it has layers {self.layers})")
        return self.coders[layer]

    # ------------------------------------------------------------------------------------------------ compute
    def encode(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k ``(values, indices)`` ``[..., k]`` of the features of inputs ``x`` ``[..., d_in]``."""
        coder = self.coder(layer)
        flat = x.reshape(-1, x.shape[-1]).to(coder.dtype)
        out = coder.encode(flat)
        return (out.top_acts.reshape(*x.shape[:-1], -1), out.top_indices.reshape(*x.shape[:-1], -1))

    def features(self, layer: int, x: Tensor) -> Tensor:
        """Dense feature activations ``[..., n_features]`` (zeros except the top-k) of ``x`` ``[..., d_in]``."""
        values, indices = self.encode(layer, x)
        dense = values.new_zeros(*values.shape[:-1], self.n_features)
        return dense.scatter_(-1, indices, values)

    def decode(self, layer: int, f: Tensor) -> Tensor:
        """Reconstruction ``[..., d_out]`` of dense feature activations ``f`` ``[..., n_features]``."""
        coder = self.coder(layer)
        return f.to(coder.dtype) @ coder.W_dec + coder.b_dec

    def reconstruct(self, layer: int, x: Tensor) -> Tensor:
        """``decode(encode(x))`` for an SAE; the predicted MLP output for a transcoder."""
        coder = self.coder(layer)
        values, indices = self.encode(layer, x)
        flat = coder.decode(values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1]))
        return flat.reshape(*x.shape[:-1], -1)

    def feature_writes(self, layer: int, out_weights: Tensor) -> Tensor:
        """What each feature writes into the residual stream ``[n_features, d_model]``: decoder rows mapped
        through the MLP's output weights ``out_weights`` (``[d_mlp, d_model]``, row n = neuron n's write) for an
        SAE; the decoder rows themselves for a transcoder (they are MLP outputs already)."""
        w = self.coder(layer).W_dec.detach()
        return w if self.kind == "transcoder" else w @ out_weights.to(w.dtype)

    def requires_grad_(self, flag: bool) -> Dictionary:
        for coder in self.coders.values():
            coder.requires_grad_(flag)
        return self

    # ------------------------------------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """BLAKE2b-256 of every coder's parameters (layer order), the kind and ``k``."""
        h = hashlib.blake2b(digest_size=32)
        h.update(f"{self.kind}:{self.k}".encode())
        for layer in self.layers:
            for name, t in sorted(self.coders[layer].state_dict().items()):
                h.update(f"{layer}.{name}:{tuple(t.shape)}".encode())
                h.update(t.detach().contiguous().float().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------------ storage
    def state_tensors(self) -> dict[str, Tensor]:
        return {f"blocks.{layer}.{name}": t.detach().contiguous().clone()
                for layer in self.layers for name, t in self.coders[layer].state_dict().items()}

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write every coder to one safetensors file (atomically), with the settings as metadata."""
        from safetensors.torch import save_file

        meta = {"format": str(FORMAT_VERSION), "kind": self.kind, "layers": json.dumps(self.layers),
                "n_features": str(self.n_features), "k": str(self.k), "d_in": str(self.d_in),
                "meta": json.dumps({**self.meta, **(extra or {})}, default=str)}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(self.state_tensors(), str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, layers: Iterable[int] | None = None) -> Dictionary:
        """Read a dictionary written by :meth:`save` (a file, or a features run folder holding one)."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS
        if not path.is_file():
            raise RunDirError(f"no dictionary at {path} (train one with `neuronhunter features train`)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise RunDirError(f"{path} is not a readable dictionary: {exc}".splitlines()[0]) from None
        if meta.get("format") != str(FORMAT_VERSION) or meta.get("kind") not in KINDS:
            raise RunDirError(f"{path} is not a neuronhunter dictionary (format {meta.get('format')!r})")
        kind, k, n = meta["kind"], int(meta["k"]), int(meta["n_features"])
        d_in = int(meta["d_in"])
        stored = json.loads(meta["layers"])
        want = stored if layers is None else sorted(set(int(x) for x in layers))
        missing = sorted(set(want) - set(stored))
        if missing:
            raise ConfigError(f"the dictionary {path} has no coder for layer {missing[0]} (it has {stored})")
        coders = {}
        for layer in want:
            coder = new_coder(d_in, n, k, kind=kind)
            prefix = f"blocks.{layer}."
            coder.load_state_dict({name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)})
            coder.requires_grad_(False)
            coders[layer] = coder.eval()
        return cls(coders, kind, json.loads(meta.get("meta") or "{}"))
