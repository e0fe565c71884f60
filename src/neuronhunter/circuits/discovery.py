"""Automated circuit discovery: edge attribution patching (EAP, EAP-IG), faithfulness curves, exact checks.

**The graph.** A pre-norm transformer's residual stream is a sum of writes: the embeddings (``input``), every
attention head (``z_h W_O,h``), every MLP unit (a neuron ``a_n W_out,n``; with a dictionary, a feature
``f_i (W_dec W_out)_i`` plus one *error* node per layer for what the dictionary misses), and constant biases.
Each component reads that sum through its input norm: layer ``L``'s attention (``attn L``: all its heads read
the same normalised stream), layer ``L``'s MLP (``mlp L``) and the unembedding (``logits``). An *edge* ``u -> c``
is one writer ``u`` upstream of one reader ``c``.

**The metric** is ``logit(answer) - logit(wrong)`` at each pair's last token, averaged over the task's contrast
pairs (:mod:`.tasks`).

**Attribution (EAP, Syed et al. 2023).** With ``x_c`` the input of ``c``'s norm and ``g_c = ∂metric/∂x_c`` along
``c`` only (on the clean run), patching edge ``u -> c`` from the corrupted run changes the metric by about
``score(u -> c) = Σ_positions (w_u^clean - w_u^corrupted) · g_c``; one forward and one backward pass give the
scores of every edge. ``g_c`` is read by giving each norm a fresh leaf (``x -> leaf + (x - x.detach())``: the
value and the upstream gradient are unchanged, the leaf collects the gradient through ``c``). **EAP-IG** (Hanna et
al. 2024) averages ``g_c`` over ``steps`` runs whose embeddings are interpolated between the corrupted and the
clean prompt, which corrects the linear approximation where the model saturates.

**Faithfulness of a circuit** ``C`` (a set of edges): the clean prompt is run with every component's input
replaced by ``x_c^corrupted + Σ_{(u -> c) ∈ C} (w_u^this run - w_u^corrupted)``: every edge outside ``C`` carries
its corrupted value, every edge inside carries what its writer computes from its own (patched) input. All edges
give the clean run exactly, no edge the corrupted run; ``faithfulness = (metric(C) - metric(corrupted)) /
(metric(clean) - metric(corrupted))``. Circuits grow by ``|score|`` and the curve reports faithfulness against the
number of edges. **Exact checks**: the top edges are patched one at a time (clean run, one edge corrupted) and the
exact change of the metric is set beside its EAP score.

Models with post-norms (Gemma 2/3, OLMo 2) are refused: their writes are not additive.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.hooked import HookedModel
from ..models.sites import Site
from .tasks import Task

log = logging.getLogger(__name__)

Comp = tuple[str, int]  # ("attn", L) | ("mlp", L) | ("logits", n_layers)


# ---------------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompts:
    clean: Tensor  # [B, P]
    corrupted: Tensor  # [B, P]
    mask: Tensor  # [B, P]
    last: Tensor  # [B]
    answer: Tensor  # [B]
    wrong: Tensor  # [B]


def prepare(model: HookedModel, task: Task, *, prepend_bos: bool = True) -> Prompts:
    """Tokenise a task's pairs (each pair checked by :func:`~neuronhunter.causal.patching.check_prompts`)."""
    from ..causal.patching import check_prompts

    rows = []
    for i, p in enumerate(task.pairs):
        try:
            rows.append(check_prompts(model, p.clean, p.corrupted, p.answer, p.wrong, prepend_bos=prepend_bos))
        except ConfigError as exc:
            raise ConfigError(f"{task.name} pair {i + 1}: {exc}") from None
    width = max(r[0].shape[-1] for r in rows)
    pad = model.tokenizer.pad_token_id or 0
    b = len(rows)
    clean = torch.full((b, width), pad, dtype=torch.long)
    corrupted = clean.clone()
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, (c, x, _a, _w) in enumerate(rows):
        n = c.shape[-1]
        clean[i, :n], corrupted[i, :n], mask[i, :n] = c[0], x[0], 1
    return Prompts(clean, corrupted, mask, mask.sum(1) - 1, torch.tensor([r[2] for r in rows]),
                   torch.tensor([r[3] for r in rows]))


def logit_diffs(model: HookedModel, hidden: Tensor, pr: Prompts) -> Tensor:
    """``[B]`` logit(answer) - logit(wrong) at each pair's last token, from the final hidden states (only the last
    positions are unembedded)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = model.unembed(hidden[rows, pr.last.to(hidden.device)])  # [B, vocab]
    return logits[rows, pr.answer.to(hidden.device)] - logits[rows, pr.wrong.to(hidden.device)]


# ---------------------------------------------------------------------------------------------------- graph
def _norm_children(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.children() if "norm" in type(m).__name__.lower()]


class Graph:
    """Writers, readers and weights of ``model`` (see the module docstring)."""

    def __init__(self, model: HookedModel) -> None:
        from .features import DictionaryModel

        a = model.adapter
        if a.has_post_norms:
            raise ConfigError(f"circuit discovery needs a pre-norm model; {a.family} normalises the outputs of its "
                              "attention and MLP, so their writes are not additive")
        self.model = model
        self.n_layers, self.n_heads, self.d_head = model.n_layers, model.n_heads, model.d_head
        self.parallel = bool(a.parallel_residual)
        self.view = model if isinstance(model, DictionaryModel) else None
        # layers whose MLP units are dictionary features (plus one error node); the others' units are neurons
        self.feature_layers = set(self.view.dictionary.layers) if self.view is not None else set()
        self.norms = self._find_norms()
        self.w_o = [self._head_out(layer) for layer in range(self.n_layers)]  # [H, dh, d]
        self.w_unit = [self._unit_out(layer) for layer in range(self.n_layers)]  # [units (+ d_mlp error), d]

    def n_units(self, layer: int) -> int:
        """Units of layer ``layer``'s MLP: features (the error columns not counted) or neurons."""
        return self.view.d_mlp if layer in self.feature_layers else self.model.d_mlp if self.view is None \
            else self.view.d_neurons

    def n_cols(self, layer: int) -> int:
        return int(self.w_unit[layer].shape[0])

    def _find_norms(self) -> dict[Comp, nn.Module]:
        norms: dict[Comp, nn.Module] = {}
        for layer in range(self.n_layers):
            found = _norm_children(self.model.block(layer))
            order: list[nn.Module] = []

            def called_with(mod: nn.Module, *_: Any, order: list[nn.Module] = order) -> None:
                order.append(mod)

            handles = [m.register_forward_pre_hook(called_with) for m in found]
            try:
                ids = torch.zeros(1, 2, dtype=torch.long)
                self.model.forward(ids, stop_at_layer=layer + 1) if layer + 1 < self.n_layers else self.model.forward(ids)
            finally:
                for h in handles:
                    h.remove()
            called = list(dict.fromkeys(order))
            if len(called) != 2:
                raise ConfigError(f"{self.model.adapter.family}: expected two input norms per block, found "
                                  f"{len(called)}; this architecture is not supported by circuit discovery")
            norms[("attn", layer)], norms[("mlp", layer)] = called
        norms[("logits", self.n_layers)] = self.model.final_norm()
        return norms

    def _head_out(self, layer: int) -> Tensor:
        proj = self.model.module(layer, self.model.adapter.attn_out_proj)
        w = proj.weight.detach()
        w = w.T if isinstance(proj, nn.Linear) else w  # [H*dh, d]
        return w.reshape(self.n_heads, self.d_head, -1)

    def _unit_out(self, layer: int) -> Tensor:
        if layer not in self.feature_layers:
            base = self.view.base if self.view is not None else self.model
            return base.neuron_output_weights(layer).detach()
        # features, then the error columns (what the dictionary misses, in neurons)
        return torch.cat([self.model.neuron_output_weights(layer).detach(),
                          self.view.base.neuron_output_weights(layer).detach()])

    def components(self) -> list[Comp]:
        out: list[Comp] = []
        for layer in range(self.n_layers):
            out += [("attn", layer), ("mlp", layer)]
        return [*out, ("logits", self.n_layers)]

    def writers_before(self, comp: Comp) -> list[tuple[str, int]]:
        """The writer groups upstream of ``comp``: ``("input", -1)``, ``("attn", L)``, ``("mlp", L)``."""
        kind, layer = comp
        out = [("input", -1)]
        for up in range(min(layer, self.n_layers)):
            out += [("attn", up), ("mlp", up)]
        if kind == "mlp" and not self.parallel:
            out.append(("attn", layer))
        return out

    def unit_label(self, layer: int, col: int) -> str:
        if layer not in self.feature_layers:
            return f"m{layer}.n{col}"
        return f"m{layer}.f{col}" if col < self.n_units(layer) else f"m{layer}.err"

    def unit_site(self, layer: int, col: int) -> str:
        site = Site.mlp_post(layer)
        if layer not in self.feature_layers:
            return f"{site}.{col}"
        kind = self.view.dictionary.kind
        return f"{site}.{kind}.{col}" if col < self.n_units(layer) else f"{site}.{kind}.error"


def comp_name(comp: Comp) -> str:
    return "logits" if comp[0] == "logits" else f"{comp[0]}{comp[1]}"


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class RunCache:
    """What one (no-grad) pass leaves: head outputs, MLP units, component inputs, the metric."""

    z: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, P, H, dh]
    u: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, P, cols]
    x: dict[Comp, Tensor] = field(default_factory=dict)  # component -> its norm's input [B, P, d]
    metric: Tensor | None = None  # [B]


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
    return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})


@contextlib.contextmanager
def _capture_units(graph: Graph, cache: RunCache, detach: bool) -> Iterator[None]:
    """Record head outputs and MLP unit activations (features + error for a dictionary view) into ``cache``."""
    model = graph.model
    keep = (lambda t: t.detach()) if detach else (lambda t: t)

    def grab_z(act: Tensor, site: Site) -> None:
        cache.z[site.layer] = keep(act)

    def grab_u(act: Tensor, site: Site) -> None:
        cache.u[site.layer] = keep(act)

    fns: dict[Site, Any] = {Site.attn_z(layer): grab_z for layer in range(graph.n_layers)}
    fns.update({Site.mlp_post(layer): grab_u for layer in range(graph.n_layers)})
    if graph.view is None:
        with model.hooks(fns):
            yield
        return
    view = graph.view
    neurons: dict[int, Tensor] = {}

    def grab_a(act: Tensor, site: Site) -> None:
        neurons[site.layer] = keep(act)

    def grab_f(f: Tensor, site: Site) -> None:  # runs after grab_a: append the error columns
        layer = site.layer
        err = neurons.pop(layer) - (f @ view.dictionary.coder(layer).W_dec + view.dictionary.coder(layer).b_dec)
        cache.u[layer] = keep(torch.cat([f, err.to(f.dtype)], dim=-1))

    feats = graph.feature_layers
    base_fns = {Site.mlp_post(layer): (grab_a if layer in feats else grab_u) for layer in range(graph.n_layers)}
    view_fns: dict[Site, Any] = {Site.attn_z(layer): grab_z for layer in range(graph.n_layers)}
    view_fns.update({Site.mlp_post(layer): grab_f for layer in feats})
    with view.base.hooks(base_fns), view.hooks(view_fns):
        yield


def _writes(graph: Graph, cache: RunCache, group: tuple[str, int], cols: Tensor | None = None) -> Tensor:
    """``[B, P, d]`` write of the selected heads / unit columns of one writer group (all when ``cols`` is None)."""
    kind, layer = group
    if kind == "input":
        return cache.x[("attn", 0)]
    if kind == "attn":
        z, w = cache.z[layer], graph.w_o[layer]
        if cols is not None:
            z, w = z[:, :, cols], w[cols]
        return torch.einsum("bphk,hkd->bpd", z, w.to(z.dtype))
    u, w = cache.u[layer], graph.w_unit[layer]
    if cols is not None:
        u, w = u[..., cols], w[cols]
    return u @ w.to(u.dtype)


def run_pass(graph: Graph, ids: Tensor, pr: Prompts, *, norm_fns: dict[Comp, Callable[[Tensor], Tensor]] | None = None,
             grad: bool = False, block0: Callable[[Tensor], Tensor] | None = None) -> RunCache:
    """One forward pass of ``ids``: captures (see :class:`RunCache`), optional replacement of component inputs
    (``norm_fns[c](x) -> x'``) and of the embeddings (``block0``)."""
    cache = RunCache()
    handles = []

    def make(comp: Comp) -> Callable[..., Any]:
        fn = (norm_fns or {}).get(comp)

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = _input_of(args, kwargs)
            if fn is not None:
                x = fn(x)
            cache.x[comp] = x if grad else x.detach()
            return _with_input(args, kwargs, x) if fn is not None else None

        return pre

    for comp, norm in graph.norms.items():
        handles.append(norm.register_forward_pre_hook(make(comp), with_kwargs=True))
    if block0 is not None:
        handles.append(graph.model.block(0).register_forward_pre_hook(
            lambda _m, args, kwargs: _with_input(args, kwargs, block0(_input_of(args, kwargs))), with_kwargs=True))
    try:
        with _capture_units(graph, cache, detach=not grad), torch.set_grad_enabled(grad):
            hidden = graph.model.final_hidden(ids, pr.mask, grad=grad)
            cache.metric = logit_diffs(graph.model, hidden, pr)
    finally:
        for h in handles:
            h.remove()
    return cache


def gradients(graph: Graph, pr: Prompts, clean: RunCache, corrupted: RunCache, *, steps: int = 1
              ) -> dict[Comp, Tensor]:
    """``g_c`` for every component, on the clean run (``steps`` = 1) or averaged over ``steps`` embeddings
    interpolated from the corrupted to the clean prompt (EAP-IG)."""
    total: dict[Comp, Tensor] = {}
    emb_clean, emb_corr = clean.x[("attn", 0)], corrupted.x[("attn", 0)]
    for k in range(steps):
        alpha = 1.0 if steps == 1 else (k + 0.5) / steps
        leaves: dict[Comp, Tensor] = {}

        def leafify(comp: Comp, leaves: dict[Comp, Tensor] = leaves) -> Callable[[Tensor], Tensor]:
            def fn(x: Tensor) -> Tensor:
                leaf = x.detach().clone().requires_grad_(True)
                leaves[comp] = leaf
                return leaf + (x - x.detach())

            return fn

        fns = {comp: leafify(comp) for comp in graph.components()}
        block0 = None if steps == 1 else (lambda _x, a=alpha: emb_corr + a * (emb_clean - emb_corr))
        with torch.enable_grad():
            cache = run_pass(graph, pr.clean, pr, norm_fns=fns, grad=True, block0=block0)
            cache.metric.mean().backward()
        for comp, leaf in leaves.items():
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            total[comp] = g.detach() / steps if comp not in total else total[comp] + g.detach() / steps
    return total


# ---------------------------------------------------------------------------------------------------- scores
@dataclass
class EdgeScores:
    """Every edge's EAP score, per reader component and writer group."""

    graph: Graph
    input: dict[Comp, float]
    heads: dict[tuple[Comp, int], Tensor]  # (reader, writer layer) -> [H]
    units: dict[tuple[Comp, int], Tensor]  # (reader, writer layer) -> [cols]

    def table(self, mlp: str = "units") -> Any:
        """One row per edge (an error node's columns summed into one row; with ``mlp="layer"`` one row per MLP
        layer and reader: the sum of its units' scores, the score of patching the whole MLP's write)."""
        import pandas as pd

        g = self.graph
        up_kind, up_layer, up_index, down, score = [], [], [], [], []
        for comp, s in self.input.items():
            up_kind.append("input"), up_layer.append(-1), up_index.append(-1), down.append(comp), score.append(s)
        for (comp, layer), s in self.heads.items():
            n = s.numel()
            up_kind += ["head"] * n
            up_layer += [layer] * n
            up_index += list(range(n))
            down += [comp] * n
            score += s.tolist()
        for (comp, layer), s in self.units.items():
            vals = s
            if mlp == "layer":
                up_kind.append("unit"), up_layer.append(layer), up_index.append(-1), down.append(comp)
                score.append(float(s.sum()))
                continue
            if layer in g.feature_layers:
                n_feat = g.n_units(layer)
                vals = torch.cat([s[:n_feat], s[n_feat:].sum().reshape(1)])
            n = vals.numel()
            up_kind += ["unit"] * n
            up_layer += [layer] * n
            up_index += list(range(n))
            down += [comp] * n
            score += vals.tolist()
        df = pd.DataFrame({"up_kind": up_kind, "up_layer": np.asarray(up_layer, dtype=np.int32),
                           "up_index": np.asarray(up_index, dtype=np.int64),
                           "down": [comp_name(c) for c in down],
                           "down_kind": [c[0] for c in down], "down_layer": np.asarray([c[1] for c in down], np.int32),
                           "score": np.asarray(score, dtype=np.float64)})
        df["upstream"] = [edge_label(g, k, la, i) for k, la, i in zip(df.up_kind, df.up_layer, df.up_index,
                                                                         strict=True)]
        df["abs_score"] = df["score"].abs()
        return df.sort_values(["abs_score", "upstream", "down"], ascending=[False, True, True],
                              kind="stable").reset_index(drop=True)


def edge_label(graph: Graph, kind: str, layer: int, index: int) -> str:
    if kind == "input":
        return "input"
    if kind == "head":
        return f"a{layer}.h{index}"
    return f"m{layer}" if index < 0 else graph.unit_label(layer, index)


def first_difference(pr: Prompts) -> int:
    """The first position where some pair's clean and corrupted tokens differ: before it every activation of the
    two runs is equal (causal attention), so every write difference is zero there."""
    diff = (pr.clean != pr.corrupted).any(0)
    return int(torch.nonzero(diff)[0]) if bool(diff.any()) else pr.clean.shape[1]


def eap_scores(graph: Graph, clean: RunCache, corrupted: RunCache, grads: dict[Comp, Tensor], *,
               start: int = 0) -> EdgeScores:
    """EAP score of every edge (see the module docstring); positions before ``start`` are skipped (their write
    differences are zero: :func:`first_difference`)."""
    inp: dict[Comp, float] = {}
    heads: dict[tuple[Comp, int], Tensor] = {}
    units: dict[tuple[Comp, int], Tensor] = {}
    d_emb = (clean.x[("attn", 0)] - corrupted.x[("attn", 0)])[:, start:]
    dz = {layer: (clean.z[layer] - corrupted.z[layer])[:, start:] for layer in clean.z}
    du = {layer: (clean.u[layer] - corrupted.u[layer])[:, start:] for layer in clean.u}
    for comp in graph.components():
        g = grads[comp][:, start:].to(d_emb.dtype)  # [B, P', d]
        for kind, layer in graph.writers_before(comp):
            if kind == "input":
                inp[comp] = float((d_emb * g).sum())
            elif kind == "attn":
                proj = torch.einsum("bpd,hkd->bphk", g, graph.w_o[layer].to(g.dtype))
                heads[(comp, layer)] = (dz[layer] * proj).sum((0, 1, 3))
            else:
                units[(comp, layer)] = (du[layer] * (g @ graph.w_unit[layer].to(g.dtype).T)).sum((0, 1))
    return EdgeScores(graph, inp, heads, units)


# ---------------------------------------------------------------------------------------------------- circuits
def _expand(graph: Graph, kind: str, layer: int, index: int) -> list[int]:
    """The columns of a writer: a whole MLP (index -1) is all its columns, an error node all its error columns."""
    if kind == "unit" and index < 0:
        return list(range(graph.n_cols(layer)))
    if kind == "unit" and layer in graph.feature_layers and index >= graph.n_units(layer):
        return list(range(graph.n_units(layer), graph.n_cols(layer)))
    return [index]


def circuit_metric(graph: Graph, pr: Prompts, corrupted: RunCache, edges: Any) -> Tensor:
    """``[B]`` metric of the clean prompt with every edge outside ``edges`` (rows of :meth:`EdgeScores.table`)
    patched from the corrupted run (see the module docstring)."""
    plan: dict[Comp, dict[tuple[str, int], list[int]]] = {}
    comps = {comp_name(c): c for c in graph.components()}
    for kind, layer, index, down in zip(edges.up_kind, edges.up_layer, edges.up_index, edges.down, strict=True):
        group = ("input", -1) if kind == "input" else ("attn" if kind == "head" else "mlp", int(layer))
        plan.setdefault(comps[down], {}).setdefault(group, []).extend(_expand(graph, kind, int(layer), int(index)))
    live = RunCache()
    full: dict[tuple[str, int], Tensor] = {}  # a writer group's whole write difference, computed once

    def difference(group: tuple[str, int], cols: list[int]) -> Tensor:
        """``Σ_{u in cols} (w_u^live - w_u^corrupted)`` of one writer group; a group that is mostly in the circuit
        is its whole difference (cached) minus the few columns left out."""
        n = graph.n_heads if group[0] == "attn" else graph.n_cols(group[1])
        chosen = sorted(set(cols))
        if len(chosen) <= n // 2:
            idx = torch.tensor(chosen)
            return _writes(graph, live, group, idx) - _writes(graph, corrupted, group, idx)
        if group not in full:
            full[group] = _writes(graph, live, group) - _writes(graph, corrupted, group)
        rest = sorted(set(range(n)) - set(chosen))
        if not rest:
            return full[group]
        idx = torch.tensor(rest)
        return full[group] - (_writes(graph, live, group, idx) - _writes(graph, corrupted, group, idx))

    def make(comp: Comp) -> Callable[[Tensor], Tensor]:
        def fn(x: Tensor) -> Tensor:
            out = corrupted.x[comp].to(x.dtype).clone()
            for group, cols in plan.get(comp, {}).items():
                if group[0] == "input":
                    out = out + (x_clean_input[0] - corrupted.x[("attn", 0)])
                else:
                    out = out + difference(group, cols)
            return out

        return fn

    x_clean_input: list[Tensor] = []

    def grab_input(x: Tensor) -> Tensor:
        x_clean_input[:] = [x.detach()]
        return x

    fns = {comp: make(comp) for comp in graph.components()}
    first = fns[("attn", 0)]
    fns[("attn", 0)] = lambda x: first(grab_input(x))
    cache = _run_live(graph, pr, fns, live)
    return cache.metric


def _run_live(graph: Graph, pr: Prompts, fns: dict[Comp, Callable[[Tensor], Tensor]], live: RunCache) -> RunCache:
    """A clean pass whose component inputs are ``fns``, writing the live head/unit activations into ``live`` as
    they are computed (the replacement functions read them)."""
    handles = []
    out = RunCache()

    def make(comp: Comp) -> Callable[..., Any]:
        fn = fns[comp]

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
            return _with_input(args, kwargs, fn(_input_of(args, kwargs)))

        return pre

    for comp, norm in graph.norms.items():
        handles.append(norm.register_forward_pre_hook(make(comp), with_kwargs=True))
    try:
        with _capture_units(graph, live, detach=True), torch.no_grad():
            out.metric = logit_diffs(graph.model, graph.model.final_hidden(pr.clean, pr.mask), pr)
    finally:
        for h in handles:
            h.remove()
    return out


def exact_edge_effect(graph: Graph, pr: Prompts, clean: RunCache, corrupted: RunCache, kind: str, layer: int,
                      index: int, down: Comp) -> float:
    """``metric(clean) - metric(clean with edge u -> down patched from the corrupted run)`` (mean over pairs)."""
    group = ("input", -1) if kind == "input" else ("attn" if kind == "head" else "mlp", layer)
    cols = None if kind == "input" else torch.tensor(_expand(graph, kind, layer, index))
    delta = _writes(graph, clean, group, cols) - _writes(graph, corrupted, group, cols)
    cache = run_pass(graph, pr.clean, pr, norm_fns={down: lambda x: x - delta.to(x.dtype)})
    return float(clean.metric.mean() - cache.metric.mean())


DEFAULT_SIZES = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


@dataclass
class CircuitResult:
    task: str
    pairs: int
    method: str
    clean: float
    corrupted: float
    edges: Any  # DataFrame of every edge, by |score|
    curve: list[dict[str, Any]]
    checks: list[dict[str, Any]]
    circuit: Any  # DataFrame: the chosen circuit's edges
    target: float
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """``circuit.json``'s content."""
        from scipy.stats import spearmanr

        ex = [c["exact"] for c in self.checks]
        sc = [c["score"] for c in self.checks]
        rho = float(spearmanr(sc, ex).statistic) if len(ex) > 2 else None
        chosen = [{"upstream": r.upstream, "downstream": r.down, "score": float(r.score),
                   "site": r.site if hasattr(r, "site") else None}
                  for r in self.circuit.itertuples()]
        nodes = sorted({r["upstream"] for r in chosen} | {r["downstream"] for r in chosen})
        return {"task": self.task, "pairs": self.pairs, "method": self.method,
                "metric": "logit(answer) - logit(wrong) at the last token, mean over pairs",
                "clean_metric": self.clean, "corrupted_metric": self.corrupted,
                "edges_total": int(len(self.edges)), "target_faithfulness": self.target,
                "circuit": {"edges": chosen, "n_edges": len(chosen), "nodes": nodes,
                            "faithfulness": next((c["faithfulness"] for c in self.curve
                                                  if c["edges"] == len(chosen)), None)},
                "curve": self.curve, "exact_checks": self.checks, "exact_vs_eap_spearman": rho,
                "timings": self.timings, **self.info}


def discover(model: HookedModel, task: Task, *, method: str = "eap", steps: int = 5, sizes: Sequence[int] | None = None,
             target: float = 0.8, check_top: int = 10, prepend_bos: bool = True, mlp: str = "units",
             progress: Callable[[str], None] | None = None) -> CircuitResult:
    """Rank every edge by EAP (``method="eap"``) or EAP-IG (``"eap-ig"``, ``steps`` interpolations), grow circuits
    by ``|score|`` and measure their faithfulness at each size in ``sizes``; check the ``check_top`` best edges by
    exact patching. The chosen circuit is the smallest measured one whose faithfulness reaches ``target``.
    ``mlp="units"``: every neuron (feature) is a writer; ``"layer"``: each MLP is one writer."""
    if method not in ("eap", "eap-ig"):
        raise ConfigError(f"unknown method {method!r}; use eap or eap-ig")
    if mlp not in ("units", "layer"):
        raise ConfigError(f"--mlp must be units or layer, got {mlp!r}")
    if method == "eap-ig" and steps < 2:
        raise ConfigError("eap-ig needs --steps of at least 2")
    def say(stage: str) -> None:
        log.info("circuit %s: %s (%.0f s)", task.name, stage, time.perf_counter() - t0)
        if progress is not None:
            progress(stage)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say("graph")
    graph = Graph(model)
    pr = prepare(model, task, prepend_bos=prepend_bos)
    clean = run_pass(graph, pr.clean, pr)
    corrupted = run_pass(graph, pr.corrupted, pr)
    m_clean, m_corr = float(clean.metric.mean()), float(corrupted.metric.mean())
    if abs(m_clean - m_corr) < 1e-6:
        raise ConfigError(f"the clean and corrupted prompts give the same logit difference ({m_clean:.4f}): "
                          "there is no behaviour to explain")
    say("gradients")
    grads = gradients(graph, pr, clean, corrupted, steps=1 if method == "eap" else steps)
    timings["attribution_s"] = time.perf_counter() - t0
    say("edge scores")
    scores = eap_scores(graph, clean, corrupted, grads, start=first_difference(pr))
    edges = scores.table(mlp)
    timings["scores_s"] = time.perf_counter() - t0 - timings["attribution_s"]
    t1 = time.perf_counter()
    say("faithfulness")
    curve = []
    span = m_clean - m_corr
    for n in sorted({s for s in (sizes or DEFAULT_SIZES) if s <= len(edges)} | {len(edges)}):
        say(f"faithfulness of {n:,} edges")
        m = float(circuit_metric(graph, pr, corrupted, edges.head(n)).mean())
        top = edges.head(n)
        curve.append({"edges": int(n), "nodes": int(top["upstream"].nunique()), "metric": m,
                      "faithfulness": (m - m_corr) / span})
    timings["faithfulness_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    say("exact checks")
    checks = []
    for r in edges.head(check_top).itertuples():
        down = next(c for c in graph.components() if comp_name(c) == r.down)
        exact = exact_edge_effect(graph, pr, clean, corrupted, r.up_kind, int(r.up_layer), int(r.up_index), down)
        checks.append({"upstream": r.upstream, "downstream": r.down, "score": float(r.score), "exact": exact,
                       "score_normalised": float(r.score) / span, "exact_normalised": exact / span})
    timings["exact_s"] = time.perf_counter() - t2
    reached = [c for c in curve if c["faithfulness"] >= target]
    size = reached[0]["edges"] if reached else curve[-1]["edges"]
    circuit = edges.head(size).copy()
    circuit["site"] = [_site(graph, k, la, i) for k, la, i in zip(circuit.up_kind, circuit.up_layer,
                                                                      circuit.up_index, strict=True)]
    info = {"model": model.name, "prepend_bos": prepend_bos, "steps": steps if method == "eap-ig" else 1,
            "units": "mlp layers" if mlp == "layer" else "features" if graph.feature_layers else "neurons",
            "feature_layers": sorted(graph.feature_layers),
            "reached_target": bool(reached), "source": task.source}
    return CircuitResult(task.name, len(task), method, m_clean, m_corr, edges, curve, checks, circuit, target,
                         timings, info)


def _site(graph: Graph, kind: str, layer: int, index: int) -> str:
    if kind == "input":
        return "embeddings"
    if kind == "head":
        return f"{Site.attn_z(layer)}.{index}"
    return str(Site(layer, "hook_mlp_out")) if index < 0 else graph.unit_site(layer, index)
