"""``HookedModel``: an unmodified Hugging Face causal LM plus plain PyTorch hooks at named sites.

We wrap rather than reimplement: the forward pass is the HF model's own, so activations equal a plain HF forward
to the last bit (tests check max |diff| against hand-written hooks). Hooks are attached only for the sites a caller
asks for and are always removed when the ``with`` block exits, even on error.

Two context managers do all the work:

* :meth:`HookedModel.capture` records activations at sites (detached, on the model's device).
* :meth:`HookedModel.intervene` replaces activations at sites with ``fn(activation, site)``.

``stop_at_layer=L`` ends the forward pass after block ``L - 1`` (like TransformerLens), so a scan of the first
layers does not pay for the rest of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SiteError
from .adapters import ArchitectureAdapter, adapter_for
from .bos import BosPolicy, bos_policy
from .sites import Site

Intervention = Callable[[Tensor, Site], Tensor | None]


class StopForward(Exception):
    """Raised by a hook to end the forward pass there; ``forward(stop_at_layer=...)`` catches it (the scan stops
    right after reading its last layer's neurons, skipping that layer's down-projection)."""


def _linear_in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)  # GPT-2 Conv1D stores weight as [in, out]
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    raise TypeError(f"cannot read input size of {type(module).__name__}")


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _replace_first(x: Any, value: Tensor) -> Any:
    if isinstance(x, tuple):
        return (value, *x[1:])
    if isinstance(x, list):
        return [value, *x[1:]]
    return value


class HookedModel:
    """A Hugging Face causal LM with named hook sites.

    Args:
        model: an HF ``*ForCausalLM`` of a family in :data:`~neuronhunter.models.adapters.ADAPTERS` (GPT-2,
            GPT-NeoX/Pythia, Llama, Mistral, Qwen2/3, Gemma 1/2/3, OLMo 1/2).
        tokenizer: its tokenizer (a fast tokenizer is needed for word offsets).
        name: a display name (alias or path) recorded in run manifests.
        info: extra facts about where the model came from (for manifests).
        adapter: override the architecture table (defaults to the one for ``config.model_type``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str = "model",
        info: Mapping[str, Any] | None = None,
        adapter: ArchitectureAdapter | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.info = dict(info or {})
        self._bos_policy: BosPolicy | None = None
        self.config = model.config
        self.adapter = (adapter or adapter_for(model.config.model_type)).resolved(model.config)
        self.blocks: nn.ModuleList = model.get_submodule(self.adapter.layers)
        block0 = self.blocks[0]
        self.n_layers = len(self.blocks)
        self.d_model = int(getattr(self.config, "hidden_size", None) or self.config.n_embd)
        self.d_mlp = _linear_in_features(block0.get_submodule(self.adapter.mlp_out_proj))
        self.n_heads = int(getattr(self.config, "num_attention_heads", None) or self.config.n_head)
        self.d_head = _linear_in_features(block0.get_submodule(self.adapter.attn_out_proj)) // self.n_heads
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def bos_policy(self) -> BosPolicy:
        """Which token windows start with, and why (:func:`neuronhunter.models.bos.bos_policy`; computed once)."""
        if self._bos_policy is None:
            self._bos_policy = bos_policy(str(getattr(self.config, "model_type", "") or self.adapter.family),
                                          self.tokenizer, self.name, self.config)
        return self._bos_policy

    @property
    def bos_token_id(self) -> int | None:
        """The token prepended as BOS (the model's :attr:`bos_policy`: the token it was trained to start documents
        with, e.g. ``<|endoftext|>`` for SmolLM2 rather than its chat marker ``<|im_start|>``), or None."""
        return self.bos_policy.token_id

    @property
    def tied_embeddings(self) -> bool:
        out = self.model.get_output_embeddings()
        return out is not None and out.weight is self.model.get_input_embeddings().weight

    def __repr__(self) -> str:
        return (
            f"HookedModel({self.name!r}, family={self.adapter.family}, layers={self.n_layers}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp}, heads={self.n_heads})"
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> HookedModel:
        self.model.to(device=device, dtype=dtype)
        return self

    # ---------------------------------------------------------------------------------------------- modules
    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def module(self, layer: int, path: str) -> nn.Module:
        """A submodule of block ``layer`` by adapter path (e.g. ``self.adapter.mlp_out_proj``)."""
        return self.blocks[layer].get_submodule(path)

    def check_site(self, site: Site | str) -> Site:
        site = Site.parse(site)
        if site.layer >= self.n_layers:
            raise SiteError(f"layer {site.layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return site

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        out = sorted(set(int(x) for x in layers))
        bad = [x for x in out if x < 0 or x >= self.n_layers]
        if bad:
            raise SiteError(f"layer {bad[0]} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return out

    def _target(self, site: Site) -> tuple[nn.Module, str]:
        """The module and hook mode for ``site``: ``pre`` reads the input, ``post`` the output."""
        a, L = self.adapter, site.layer
        return {
            "hook_resid_pre": (self.blocks[L], "pre"),
            "hook_resid_post": (self.blocks[L], "post"),
            # what the block adds to the residual stream: the post-norm's output where there is one
            "hook_attn_out": (self.module(L, a.attn_out_norm or a.attn), "post"),
            "hook_mlp_out": (self.module(L, a.mlp_out_norm or a.mlp), "post"),
            "mlp.hook_pre": (self.module(L, a.mlp_in_proj), "post"),
            "mlp.hook_post": (self.module(L, a.mlp_out_proj), "pre"),
            "attn.hook_z": (self.module(L, a.attn_out_proj), "pre"),
            "attn.hook_pattern": (self.module(L, a.attn), "pattern"),
        }[site.kind]

    # ---------------------------------------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def hooks(
        self,
        fns: Mapping[Site | str, Intervention | list[Intervention]],
        *,
        stop_at_layer: int | None = None,
    ) -> Iterator[None]:
        """Attach ``fn(activation, site)`` at each site; a non-None return value replaces the activation.

        Several functions per site run in order. All hooks are removed on exit, even on error.
        """
        handles: list[Any] = []
        needs_eager = False
        try:
            for key, fn_or_list in fns.items():
                site = self.check_site(key)
                fn_list = fn_or_list if isinstance(fn_or_list, list) else [fn_or_list]
                module, mode = self._target(site)
                if mode == "pattern":
                    needs_eager = True
                handles.append(self._attach(module, mode, site, fn_list))
            if stop_at_layer is not None:
                if not 1 <= stop_at_layer <= self.n_layers:
                    raise SiteError(f"stop_at_layer must be in 1..{self.n_layers}, got {stop_at_layer}")
                if stop_at_layer < self.n_layers:
                    handles.append(self.blocks[stop_at_layer].register_forward_pre_hook(self._stop))
            with self._eager_attention(needs_eager):
                yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _stop(*_: Any) -> None:
        raise StopForward

    def _attach(self, module: nn.Module, mode: str, site: Site, fns: list[Intervention]) -> Any:
        heads, d_head = self.n_heads, self.d_head

        def apply(act: Tensor) -> Tensor | None:
            changed = None
            for fn in fns:
                out = fn(act if changed is None else changed, site)
                if out is not None:
                    changed = out
            return changed

        if mode == "pre":
            reshape = site.kind == "attn.hook_z"

            def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    act = args[0]
                else:
                    act = kwargs["hidden_states"]
                view = act.view(*act.shape[:-1], heads, d_head) if reshape else act
                new = apply(view)
                if new is None:
                    return None
                if reshape:
                    new = new.reshape(act.shape)
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        if mode == "post":

            def post_hook(_mod: nn.Module, _args: tuple, output: Any) -> Any:
                new = apply(_first(output))
                return None if new is None else _replace_first(output, new)

            return module.register_forward_hook(post_hook)

        def pattern_hook(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise SiteError(f"{site}: this model's attention returned no pattern (needs eager attention)")
            if apply(weights) is not None:
                raise SiteError("attention patterns can be read but not replaced; intervene on attn.hook_z")
            return None

        return module.register_forward_hook(pattern_hook)

    @contextlib.contextmanager
    def _eager_attention(self, needed: bool) -> Iterator[None]:
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        if not needed or impl == "eager":
            yield
            return
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(impl)

    @contextlib.contextmanager
    def capture(self, sites: Iterable[Site | str], *, stop_at_layer: int | None = None) -> Iterator[dict[Site, Tensor]]:
        """Record the activations at ``sites`` during forward passes inside the block.

        Yields a dict ``{site: tensor}`` that each forward pass overwrites (detached tensors).
        """
        cache: dict[Site, Tensor] = {}

        def record(act: Tensor, site: Site) -> None:
            cache[site] = act.detach()

        with self.hooks({Site.parse(s): record for s in sites}, stop_at_layer=stop_at_layer):
            yield cache

    @contextlib.contextmanager
    def intervene(self, interventions: Mapping[Site | str, Intervention]) -> Iterator[None]:
        """Replace activations: inside the block, each forward pass uses ``fn(activation, site)`` at each site."""
        with self.hooks(interventions):
            yield

    # ---------------------------------------------------------------------------------------------- forward
    @contextlib.contextmanager
    def starting_at(self, layer: int, resid: Tensor | None) -> Iterator[None]:
        """Inside the block, forward passes start at block ``layer`` from the residual stream ``resid``.

        ``resid`` (``[batch, pos, d_model]``) is what block ``layer`` reads, ``hook_resid_pre`` of that layer, e.g.
        cached from an earlier pass. Blocks ``0 .. layer - 1`` hand their input through untouched (they compute
        nothing) and block ``layer``'s input is replaced by ``resid``. Everything else is still the model's own
        forward, built from ``input_ids``/``attention_mask``/``position_ids`` as in a full pass: the embeddings
        (computed and discarded: learned position embeddings such as GPT-2's are already inside ``resid``), the
        attention masks (including sliding windows and per-layer attention types), the rotary tables, post-norms
        and soft-caps. So blocks ``layer ..`` compute exactly what they compute in a full pass (tests check equality
        for every family). Sites before ``layer`` see placeholders; do not read them. ``layer == 0`` or ``resid``
        None leaves the pass unchanged except that block 0's input is replaced (or not).
        """
        if not 0 <= layer < self.n_layers:
            raise SiteError(f"start_at_layer must be in 0..{self.n_layers - 1}, got {layer}")
        if resid is None:
            if layer:
                raise SiteError("start_at_layer needs the residual stream at that layer (resid)")
            yield
            return
        target = resid

        def passthrough(hidden_states: Tensor, *_: Any, **__: Any) -> Tensor:
            return hidden_states

        def replace(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            value = target.to(device=self.device, dtype=(args[0] if args else kwargs["hidden_states"]).dtype)
            if args:
                if tuple(args[0].shape) != tuple(value.shape):
                    raise SiteError(f"start_at_layer: resid has shape {tuple(value.shape)}, the block reads "
                                    f"{tuple(args[0].shape)}")
                return (value, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": value}

        saved = [self.blocks[i].__dict__.get("forward") for i in range(layer)]
        handle = self.blocks[layer].register_forward_pre_hook(replace, with_kwargs=True)
        try:
            for i in range(layer):
                self.blocks[i].forward = passthrough
            yield
        finally:
            handle.remove()
            for i, fwd in enumerate(saved):
                if fwd is None:
                    del self.blocks[i].forward
                else:
                    self.blocks[i].forward = fwd

    def _base(self) -> nn.Module:
        return getattr(self.model, self.model.base_model_prefix, None) or self.model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
        resid: Tensor | None = None,
        position_ids: Tensor | None = None,
        grad: bool = False,
    ) -> Tensor | None:
        """Run the model; return logits ``[batch, pos, vocab]``.

        With ``stop_at_layer`` only blocks ``0 .. stop_at_layer - 1`` run (no final norm when stopped earlier, never
        the unembedding) and None is returned. With ``start_at_layer`` (and ``resid``, that layer's
        ``hook_resid_pre``) the pass starts there (:meth:`starting_at`). ``attention_mask`` may be ``[batch, pos]``
        (1 = real token) or a prepared additive ``[batch, 1, pos, pos]`` mask, used as is. Runs without autograd
        unless ``grad=True``.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        extra = {} if position_ids is None else {"position_ids": position_ids.to(self.device)}
        start = contextlib.nullcontext() if start_at_layer is None else self.starting_at(start_at_layer, resid)
        with contextlib.nullcontext() if grad else torch.no_grad(), start:
            if stop_at_layer is not None:
                with self.hooks({}, stop_at_layer=stop_at_layer):
                    try:
                        self._base()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
                    except StopForward:
                        pass
                return None
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        return out.logits

    def final_hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                     start_at_layer: int | None = None, resid: Tensor | None = None,
                     position_ids: Tensor | None = None, grad: bool = False) -> Tensor:
        """The last hidden state ``[batch, pos, d_model]`` (after the final norm), without the unembedding; logits of
        a few positions are then cheap with :meth:`unembed`. Arguments as in :meth:`forward`."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        extra = {} if position_ids is None else {"position_ids": position_ids.to(self.device)}
        start = contextlib.nullcontext() if start_at_layer is None else self.starting_at(start_at_layer, resid)
        with contextlib.nullcontext() if grad else torch.no_grad(), start:
            out = self._base()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        return out.last_hidden_state

    def unembed(self, hidden: Tensor) -> Tensor:
        """Logits of final hidden states ``[..., d_model]``: the output embedding, then the final-logit soft-cap of
        models that have one (Gemma 2/3), as the model's own head does."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    __call__ = forward

    def run_with_cache(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        sites: Iterable[Site | str],
        stop_at_layer: int | None = None,
    ) -> tuple[Tensor | None, dict[Site, Tensor]]:
        """Forward pass recording ``sites``; returns ``(logits or None, {site: activation})``.

        With ``stop_at_layer`` the pass ends after block ``stop_at_layer - 1`` and no logits are computed.
        """
        sites = [self.check_site(s) for s in sites]
        with self.capture(sites) as cache:
            logits = self.forward(input_ids, attention_mask, stop_at_layer=stop_at_layer)
        return logits, dict(cache)

    # ---------------------------------------------------------------------------------------------- tokens
    def to_tokens(self, text: str | list[str], *, prepend_bos: bool = True) -> Tensor:
        """Tokenise text into ``[batch, pos]`` ids (right-padded), prepending BOS when asked and available."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            if prepend_bos and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            rows.append(ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)

    def to_str_tokens(self, ids: Tensor | list[int]) -> list[str]:
        """Decode each id separately (what a token 'looks like' in text)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return [self.tokenizer.decode([i]) for i in ids]

    # ---------------------------------------------------------------------------------------------- weights
    def neuron_output_weights(self, layer: int) -> Tensor:
        """Output weights of layer ``layer``'s neurons as ``[d_mlp, d_model]`` (row n is neuron n's write)."""
        proj = self.module(layer, self.adapter.mlp_out_proj)
        w = proj.weight
        return w.T if isinstance(proj, nn.Linear) else w  # Conv1D stores [in, out]

    def unembed_matrix(self) -> Tensor:
        """The unembedding ``[d_model, vocab]``."""
        return self.model.get_output_embeddings().weight.T

    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.adapter.final_norm)

    def mlp_out_norm(self, layer: int) -> nn.Module | None:
        """The norm applied to layer ``layer``'s MLP output before the residual add (post/sandwich norms), or None."""
        path = self.adapter.mlp_out_norm
        return None if path is None else self.module(layer, path)

    def attn_out_norm(self, layer: int) -> nn.Module | None:
        """The norm applied to layer ``layer``'s attention output before the residual add, or None."""
        path = self.adapter.attn_out_norm
        return None if path is None else self.module(layer, path)
