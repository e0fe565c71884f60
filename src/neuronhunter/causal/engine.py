"""Exact single-token interventions on MLP neurons, thousands per forward pass.

Causal verification needs the effect of many small interventions: "set neuron ``j`` of layer ``L`` to ``v`` at one
token ``t`` of one window; how does the next-token loss at ``t`` change?", for a claimed neuron and for dozens of
null neurons, at every token of a claim. One full forward pass per intervention costs ``layers x window`` token
computations each. Three facts make it cheap and keep it exact:

1. **Start at the ablated layer.** Nothing before block ``L`` depends on the intervention, so the residual stream
   entering block ``L`` is computed once per window (the clean pass, advanced layer by layer) and every
   intervention at layer ``L`` starts there (:meth:`HookedModel.starting_at <neuronhunter.models.hooked.HookedModel.starting_at>`,
   equal to a full pass bit for bit in every supported family).
2. **Probe positions.** In a causal model an intervention at position ``t`` changes nothing at positions ``< t``,
   and the loss at ``t`` depends on positions ``<= t`` only. So one sequence holds the clean window prefix
   ``0 .. P-1`` followed by many *probe* positions: each a copy of some position ``t`` (same residual input, same
   position id for rotary/learned positions) that attends to the clean prefix ``0 .. t-1`` and to itself only
   (a 4-D additive attention mask), and carries its own intervention. A probe computes exactly what position
   ``t`` computes in a full pass with that single intervention (up to float rounding, ~1e-7 on the logits; tested
   for every family). Hundreds of interventions share one prefix.
3. **Logits only where they are read.** The unembedding (a third of the cost of a small model) runs on the probe
   positions only.

The same machinery gives **attribution patching** (gradient x perturbation) for every neuron of a layer at once:
one backward pass from the probes' losses gives ``d loss_t / d a_j(t)`` (the same-position gradient: the prefix is
held fixed, as it is under the exact intervention), and ``g_j(t) * (v_j - a_j(t))`` estimates every neuron's
effect. It is a screen; verification reports how well it correlates with the exact effects.

Which tokens are intervened on follows :mod:`neuronhunter.stats.tokens`: position 0 (BOS or a window's first
token) never, padding never, and only tokens that have a next token to predict.

Limits: the probe mask is one mask for all layers, so models whose sliding attention window is shorter than the
verification windows are refused (none of the supported real models at the default context length). GPU flash
attention does not take 4-D masks; the default SDPA/eager implementations do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.hooked import HookedModel
from ..models.sites import Site
from ..stats.tokens import counted_tokens

log = logging.getLogger(__name__)

NO_UNIT = -1  # a probe without intervention (clean value, or a gradient probe)
UNEMBED_ROWS = 256  # probes unembedded at once (logits of 256 x 262,144 vocabulary entries are 268 MB)


@dataclass
class VerificationTokens:
    """The tokens interventions may touch, flattened: ``N`` (window, position) pairs that count and have a target.

    Attributes:
        ids, mask: ``[W, T]`` token ids and attention mask of every window.
        window, pos: ``[N]`` the window and position of each token.
        input_ids, target_ids: ``[N]`` the token at ``pos`` and the one after it (what the loss at ``pos`` predicts).
        doc_ids: ``[N]`` the document of each token.
        labels: ``[N, C]`` concept labels of the input token (None without a labeller).
        prev_ids, prev_labels: the same for the token before (position 0 of a window: its BOS or first token).
        next_labels: the labels of the token after (its id is ``target_ids``).
    """

    ids: Tensor
    mask: Tensor
    window: np.ndarray
    pos: np.ndarray
    input_ids: np.ndarray
    target_ids: np.ndarray
    doc_ids: np.ndarray
    labels: np.ndarray | None
    prev_ids: np.ndarray
    prev_labels: np.ndarray | None
    next_labels: np.ndarray | None

    @classmethod
    def from_batches(cls, batches: Sequence[Any]) -> VerificationTokens:
        """From :class:`~neuronhunter.data.batches.TokenBatch` objects (right-padded windows)."""
        if not batches:
            raise ConfigError("no verification tokens: the corpus gave no windows")
        width = max(int(b.input_ids.shape[1]) for b in batches)
        ids = torch.cat([F.pad(b.input_ids, (0, width - b.input_ids.shape[1])) for b in batches])
        mask = torch.cat([F.pad(b.attention_mask, (0, width - b.attention_mask.shape[1])) for b in batches])
        docs = torch.cat([b.doc_ids for b in batches]).numpy()
        keep = counted_tokens(mask)
        keep[:, :-1] &= mask[:, 1:].bool()  # a next token to predict
        keep[:, -1] = False
        window, pos = (x.numpy() for x in torch.nonzero(keep, as_tuple=True))
        labels = prev_labels = next_labels = None
        if all(b.labels is not None for b in batches):
            lab = torch.cat([F.pad(b.labels, (0, 0, 0, width - b.labels.shape[1])) for b in batches])
            labels = lab[window, pos].numpy().astype(bool)
            prev_labels = lab[window, pos - 1].numpy().astype(bool)
            next_labels = lab[window, pos + 1].numpy().astype(bool)
        np_ids = ids.numpy()
        return cls(ids, mask, window, pos, np_ids[window, pos], np_ids[window, pos + 1], docs[window], labels,
                   np_ids[window, pos - 1], prev_labels, next_labels)

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def n_windows(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class LayerState:
    """The clean pass at one layer: residual stream entering the block, neuron activations, their means."""

    layer: int
    resid: Tensor  # [W, T, d_model] hook_resid_pre of the layer
    acts: Tensor  # [N, d_mlp] clean activations at the verification tokens (float32)
    means: Tensor  # [d_mlp] mean activation over the verification tokens


class AblationEngine:
    """Exact single-token interventions at the neurons of any layer (see the module docstring).

    Args:
        model: the model.
        batches: the verification windows (labelled TokenBatches).
        batch_tokens: positions per forward pass (rows x sequence length); memory grows with it.
        probes_per_row: probe positions appended to one window prefix.
    """

    def __init__(self, model: HookedModel, batches: Sequence[Any], *, batch_tokens: int = 4096,
                 probes_per_row: int = 256) -> None:
        self.model = model
        self.tokens = VerificationTokens.from_batches(batches)
        if len(self.tokens) == 0:
            raise ConfigError("no verification tokens: every window is shorter than two real tokens")
        window = getattr(model.config, "sliding_window", None)
        width = int(self.tokens.ids.shape[1])
        if window is not None and int(window) < width and getattr(model.config, "use_sliding_window", True):
            raise ConfigError(f"{model.name} attends over a sliding window of {window} tokens, shorter than the "
                              f"verification windows ({width}); use a --context-length of at most {window}")
        self.batch_tokens = int(batch_tokens)
        self.probes_per_row = int(probes_per_row)
        self._state: LayerState | None = None
        self._clean_nll: np.ndarray | None = None
        self.n_probes = 0  # probe positions run so far (for benchmarks)
        self.n_positions = 0  # positions computed so far, prefixes included
        self.seconds = {"clean": 0.0, "layers": 0.0, "probes": 0.0, "gradients": 0.0}

    # ------------------------------------------------------------------------------------------ clean pass
    def _window_batches(self) -> list[np.ndarray]:
        W, T = self.tokens.ids.shape
        per = max(1, self.batch_tokens // max(T, 1))
        return [np.arange(i, min(i + per, W)) for i in range(0, W, per)]

    def clean_nll(self) -> np.ndarray:
        """Next-token loss ``[N]`` of the clean model at every verification token."""
        if self._clean_nll is None:
            t0 = time.perf_counter()
            out = np.zeros(len(self.tokens))
            where = {}
            for i, (w, p) in enumerate(zip(self.tokens.window, self.tokens.pos, strict=True)):
                where.setdefault(int(w), []).append((i, int(p)))
            for rows in self._window_batches():
                h = self.model.final_hidden(self.tokens.ids[rows], self.tokens.mask[rows])
                idx = [(i, r, p) for r, w in enumerate(rows) for i, p in where.get(int(w), [])]
                if not idx:
                    continue
                ii, rr, pp = (torch.as_tensor(x) for x in zip(*idx, strict=True))
                hp, tgt = h[rr, pp], torch.as_tensor(self.tokens.target_ids[ii.numpy()])
                for a in range(0, len(ii), UNEMBED_ROWS):
                    with torch.no_grad():
                        nll = self._nll(hp[a : a + UNEMBED_ROWS], tgt[a : a + UNEMBED_ROWS])
                    out[ii[a : a + UNEMBED_ROWS].numpy()] = nll.double().cpu().numpy()
            self._clean_nll = out
            self.seconds["clean"] += time.perf_counter() - t0
        return self._clean_nll

    def layer(self, layer: int) -> LayerState:
        """The clean pass at ``layer`` (advanced from the last layer asked for; going back restarts at 0)."""
        self.model.check_layers([layer])
        st = self._state
        if st is not None and st.layer == layer:
            return st
        t0 = time.perf_counter()
        start, resid = (st.layer, st.resid) if st is not None and st.layer < layer else (0, None)
        pre, post = Site(layer, "hook_resid_pre"), Site(layer, "mlp.hook_post")
        resid_out, acts = [], []
        counted = torch.zeros_like(self.tokens.mask, dtype=torch.bool)
        counted[torch.as_tensor(self.tokens.window), torch.as_tensor(self.tokens.pos)] = True
        for rows in self._window_batches():
            with self.model.capture([pre, post]) as cache:
                self.model.forward(self.tokens.ids[rows], self.tokens.mask[rows], stop_at_layer=layer + 1,
                                   start_at_layer=start if resid is not None else None,
                                   resid=None if resid is None else resid[rows])
            resid_out.append(cache[pre].float())
            acts.append(cache[post][counted[rows]].float())
        self._state = None  # release the previous layer before keeping this one
        acts_t = torch.cat(acts)
        self._state = LayerState(layer, torch.cat(resid_out), acts_t, acts_t.double().mean(0).float())
        self.seconds["layers"] += time.perf_counter() - t0
        return self._state

    # ------------------------------------------------------------------------------------------ probes
    def _nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        logits = self.model.unembed(hidden).float()
        return F.cross_entropy(logits, targets.to(logits.device), reduction="none")

    def _rows(self, tok: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Probe rows ``(window, prefix length, probe indices)``: probes grouped by window, sorted by position."""
        t = self.tokens
        order = np.lexsort((t.pos[tok], t.window[tok]))
        rows = []
        win = t.window[tok][order]
        bounds = np.flatnonzero(np.diff(win)) + 1
        for group in np.split(order, bounds):
            for i in range(0, len(group), self.probes_per_row):
                chunk = group[i : i + self.probes_per_row]
                rows.append((int(t.window[tok[chunk[0]]]), int(t.pos[tok[chunk]].max()) + 1, chunk))
        return rows

    def _batches(self, rows: list[tuple[int, int, np.ndarray]]) -> list[list[tuple[int, int, np.ndarray]]]:
        rows = sorted(rows, key=lambda r: r[1] + len(r[2]))
        out, cur, width = [], [], 0
        for r in rows:
            s = r[1] + len(r[2])
            if cur and max(width, s) * (len(cur) + 1) > self.batch_tokens:
                out.append(cur)
                cur, width = [], 0
            cur.append(r)
            width = max(width, s)
        if cur:
            out.append(cur)
        return out

    def _inputs(self, state: LayerState, batch: list[tuple[int, int, np.ndarray]], tok: np.ndarray
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Residual input, ids, position ids and additive mask of one batch of probe rows, and where each probe
        sits (row, column)."""
        t = self.tokens
        S = max(p + len(c) for _, p, c in batch)
        R = len(batch)
        d = state.resid.shape[-1]
        resid = torch.zeros(R, S, d, dtype=state.resid.dtype)
        ids = torch.zeros(R, S, dtype=torch.long)
        pos = torch.zeros(R, S, dtype=torch.long)
        limit = torch.zeros(R, S, dtype=torch.long)  # query i sees keys j < limit[i] (and itself)
        prow, pcol = [], []
        for r, (w, p, chunk) in enumerate(batch):
            tp = torch.as_tensor(t.pos[tok[chunk]])
            n = len(chunk)
            resid[r, :p] = state.resid[w, :p]
            resid[r, p : p + n] = state.resid[w, tp]
            ids[r, :p] = t.ids[w, :p]
            ids[r, p : p + n] = t.ids[w, tp]
            pos[r, :p] = torch.arange(p)
            pos[r, p : p + n] = tp
            limit[r, :p] = torch.arange(1, p + 1)
            limit[r, p : p + n] = tp
            prow.append(torch.full((n,), r))
            pcol.append(torch.arange(p, p + n))
        keys = torch.arange(S)
        allow = (keys[None, None, :] < limit[:, :, None]) | torch.eye(S, dtype=torch.bool)[None]
        dtype = self.model.dtype
        mask = torch.zeros(R, 1, S, S, dtype=dtype).masked_fill_(~allow[:, None], torch.finfo(dtype).min)
        self.n_positions += R * S
        return resid, ids, pos, mask, torch.cat(prow), torch.cat(pcol)

    def run(self, layer: int, tok: np.ndarray, unit: np.ndarray, value: np.ndarray | Tensor, *,
            readout: Callable[[np.ndarray, Tensor], None] | None = None,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Set neuron ``unit[i]`` of ``layer`` to ``value[i]`` at verification token ``tok[i]`` (alone); return the
        next-token loss at each probe ``[n]``.

        Args:
            tok: ``[n]`` indices into :attr:`tokens`.
            unit: ``[n]`` neuron per probe; :data:`NO_UNIT` (-1) leaves the probe clean.
            value: ``[n]`` the value written (e.g. the neuron's mean: mean ablation).
            readout: called after each pass with ``(probe indices, log-probabilities [b, vocab])`` to read more than
                the loss (the steering check reads token sets).
            progress: called with the number of probes done after each pass.
        """
        tok = np.asarray(tok, dtype=np.int64)
        unit = np.asarray(unit, dtype=np.int64)
        value = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if not (len(tok) == len(unit) == len(value)):
            raise ValueError("tok, unit and value must have the same length")
        nll = np.zeros(len(tok))
        if not len(tok):
            return nll
        state = self.layer(layer)
        t0 = time.perf_counter()
        site = Site(layer, "mlp.hook_post")
        for batch in self._batches(self._rows(tok)):
            resid, ids, pos, mask, prow, pcol = self._inputs(state, batch, tok)
            idx = np.concatenate([c for _, _, c in batch])
            u = torch.as_tensor(unit[idx])
            sel = u >= 0
            r_i, c_i, u_i, v_i = prow[sel], pcol[sel], u[sel], value[torch.as_tensor(idx)][sel]

            def write(act: Tensor, _site: Site, r_i=r_i, c_i=c_i, u_i=u_i, v_i=v_i) -> Tensor:
                if not len(u_i):
                    return act
                act = act.clone()
                act[r_i, c_i, u_i] = v_i.to(act.dtype)
                return act

            with self.model.hooks({site: write}):
                h = self.model.final_hidden(ids, mask, start_at_layer=layer, resid=resid, position_ids=pos)
            hp = h[prow, pcol]
            tgt = torch.as_tensor(self.tokens.target_ids[tok[idx]])
            # the unembedding in slices of probes: [probes, vocab] at once is gigabytes for a large vocabulary
            for a in range(0, len(idx), UNEMBED_ROWS):
                b = min(a + UNEMBED_ROWS, len(idx))
                with torch.no_grad():
                    logp = torch.log_softmax(self.model.unembed(hp[a:b]).float(), -1)
                nll[idx[a:b]] = (-logp.gather(1, tgt[a:b, None])[:, 0]).double().numpy()
                if readout is not None:
                    readout(idx[a:b], logp)
            self.n_probes += len(idx)
            if progress is not None:
                progress(len(idx))
        self.seconds["probes"] += time.perf_counter() - t0
        return nll

    def gradients(self, layer: int, tok: np.ndarray, progress: Callable[[int], None] | None = None) -> Tensor:
        """``d loss_t / d a_j(t)`` for every neuron ``j`` of ``layer`` at each verification token ``tok[i]``:
        ``[n, d_mlp]`` (one backward pass per batch of probes; the prefix is held fixed)."""
        tok = np.asarray(tok, dtype=np.int64)
        out = torch.zeros(len(tok), self.model.d_mlp)
        if not len(tok):
            return out
        state = self.layer(layer)
        t0 = time.perf_counter()
        site = Site(layer, "mlp.hook_post")
        for batch in self._batches(self._rows(tok)):
            resid, ids, pos, mask, prow, pcol = self._inputs(state, batch, tok)
            idx = np.concatenate([c for _, _, c in batch])
            leaf: dict[str, Tensor] = {}

            def grab(act: Tensor, _site: Site, prow=prow, pcol=pcol, leaf=leaf) -> Tensor:
                # only the probes' own activations are leaves: autograd then skips the prefix entirely
                leaf["a"] = act[prow, pcol].detach().requires_grad_(True)
                out = act.detach().clone()
                out[prow, pcol] = leaf["a"]
                return out

            with torch.enable_grad():
                with self.model.hooks({site: grab}):
                    h = self.model.final_hidden(ids, mask, start_at_layer=layer, resid=resid, position_ids=pos,
                                                grad=True)
                tgt = torch.as_tensor(self.tokens.target_ids[tok[idx]])
                loss = self._nll(h[prow, pcol], tgt).sum()
                (g,) = torch.autograd.grad(loss, leaf["a"])
            out[torch.as_tensor(idx)] = g.float()
            self.n_probes += len(idx)
            if progress is not None:
                progress(len(idx))
        self.seconds["gradients"] += time.perf_counter() - t0
        return out


def full_pass_effects(model: HookedModel, tokens: VerificationTokens, layer: int, tok: np.ndarray,
                      unit: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The reference for :meth:`AblationEngine.run`: one full forward pass of the window per intervention, with a
    plain hook, returning the next-token loss at the intervened token. Slow; for tests and benchmarks."""
    out = np.zeros(len(tok))
    site = Site(layer, "mlp.hook_post")
    for i, (k, j, v) in enumerate(zip(tok, unit, value, strict=True)):
        w, p = int(tokens.window[k]), int(tokens.pos[k])

        def write(act: Tensor, _site: Site, p=p, j=int(j), v=float(v)) -> Tensor:
            if j < 0:
                return act
            act = act.clone()
            act[0, p, j] = v
            return act

        with model.hooks({site: write}):
            logits = model.forward(tokens.ids[w : w + 1, : p + 1], tokens.mask[w : w + 1, : p + 1])
        out[i] = float(F.cross_entropy(logits[0, p].float()[None], torch.tensor([int(tokens.target_ids[k])])))
    return out
