"""Live features: a neuron's activation on any text, and steering, computed by the run's model on request.

The model of a run (``config.json``'s ``model``, or the server's ``--model``) is loaded on the first live request
and kept. All model work runs in one worker thread, under a lock, so a slow live request never holds up a page
view (pages are served by other threads), and at most ``max_pending`` live requests wait at once (more get a 503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import NeuronHunterError, SiteError
from .runs import HTTPError, Run

if TYPE_CHECKING:
    from ..models.hooked import HookedModel

log = logging.getLogger(__name__)

MAX_SCALE = 1e4  # |scale| of a steering request


class NoLabels:
    """A labeller with no categories (for runs without a lexicon)."""

    categories: list[str] = []
    control: list[str] = []

    def label(self, text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
        return np.zeros((len(offsets), 0), dtype=bool)


class Live:
    """The lazily loaded models and the one worker thread that runs them.

    Args:
        device: where models are loaded (``cpu``, ``cuda``, ``auto``).
        model: load this model for every run instead of each run's own (a name, folder or ``.gguf``).
        max_pending: live requests running or waiting at once; more are answered 503.
    """

    def __init__(self, *, device: str = "cpu", model: str | None = None, max_pending: int = 8) -> None:
        self.device = device
        self.model_override = model
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuronhunter-model")
        self._lock = threading.Lock()  # around every use of a model
        self._count = threading.Lock()
        self._pending = 0
        self._models: dict[str, HookedModel] = {}
        self._labellers: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------------- the worker
    @property
    def pending(self) -> int:
        return self._pending

    @property
    def loaded(self) -> list[str]:
        return list(self._models)

    def start(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)`` on the model thread (under the model lock); 503 when too many are waiting."""
        with self._count:
            if self._pending >= self.max_pending:
                raise HTTPError(503, f"the model is busy ({self._pending} live requests running or waiting); "
                                     "try again in a moment")
            self._pending += 1

        def locked() -> Any:
            with self._lock:
                return fn(*args)

        try:
            future = self._executor.submit(locked)
        except RuntimeError:  # shut down
            with self._count:
                self._pending -= 1
            raise HTTPError(503, "the server is shutting down") from None

        def done(_: Future) -> None:
            with self._count:
                self._pending -= 1

        future.add_done_callback(done)
        return future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the model thread and await its result (the event loop stays free)."""
        return await asyncio.wrap_future(self.start(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------------- models
    def model_name(self, run: Run) -> str:
        return self.model_override or run.model_name

    def model(self, run: Run) -> HookedModel:
        """The run's model, loaded on first use (call on the model thread)."""
        name = self.model_name(run)
        model = self._models.get(name)
        if model is None:
            from ..models.loading import load_model

            t0 = time.perf_counter()
            try:
                model = load_model(name, device=self.device)
            except NeuronHunterError as exc:
                raise HTTPError(503, f"cannot load the model {name!r} of run {run.name!r} for live features: {exc} "
                                     "(start the server with --model to choose another)") from None
            log.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
            self._models[name] = model
        return model

    def labeller(self, run: Run) -> Any:
        """The run's concept labeller (its lexicon.json), or one without categories."""
        lab = self._labellers.get(run.name)
        if lab is None:
            lab = NoLabels()
            path = run.path / "lexicon.json"
            if path.exists():
                from ..data.concepts import ConceptLabeller
                from ..io import read_json

                try:
                    lab = ConceptLabeller(read_json(path), case_sensitive=bool(run.config.get("case_sensitive")),
                                          last_token_only=bool(run.config.get("label_last_token_only")))
                except (NeuronHunterError, ValueError, OSError) as exc:
                    log.warning("run %s: cannot read its lexicon (%s); live tokens are shown without labels",
                                run.name, exc)
            self._labellers[run.name] = lab
        return lab

    def _check(self, run: Run, model: HookedModel, layer: int, neuron: int) -> None:
        run.check(layer, neuron)
        if not 0 <= layer < model.n_layers or not 0 <= neuron < model.d_mlp:
            raise HTTPError(404, f"L{layer}.N{neuron} is not in the model {model.name!r} "
                                 f"({model.n_layers} layers x {model.d_mlp} neurons)")

    # ---------------------------------------------------------------------------------------------- computations
    def activations(self, run: Run, layer: int, neuron: int, text: str) -> dict[str, Any]:
        """The neuron's activation on every token of ``text`` (windows cut as the scan cuts a document; the BOS
        token the run prepends is not returned). Call on the model thread."""
        from ..hunt import activation_history

        t0 = time.perf_counter()
        model = self.model(run)
        self._check(run, model, layer, neuron)
        labeller = self.labeller(run)
        try:
            tokens, acts, labels = activation_history(model, layer, neuron, text, labeller,
                                                      context_length=run.context_length,
                                                      prepend_bos=run.prepend_bos)
        except SiteError as exc:
            raise HTTPError(404, str(exc)) from None
        except NeuronHunterError as exc:
            raise HTTPError(422, str(exc)) from None
        skip = 1 if run.prepend_bos and model.bos_token_id is not None else 0
        tokens, acts, labels = tokens[skip:], acts[skip:], labels[skip:]
        cats = list(getattr(labeller, "categories", []))
        values = [float(a) if np.isfinite(a) else None for a in acts.tolist()]
        finite = [v for v in values if v is not None]
        return {
            "run": run.name, "layer": layer, "neuron": neuron, "model": model.name,
            "context_length": run.context_length, "prepend_bos": run.prepend_bos,
            "tokens": list(tokens), "activations": values,
            "categories": [[cats[j] for j in np.flatnonzero(row)] for row in labels] if cats else None,
            "max": max(finite, default=None), "min": min(finite, default=None),
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
        }

    def steer(self, run: Run, layer: int, neuron: int, text: str, scale: float, top: int = 10) -> dict[str, Any]:
        """The next-token distribution after ``text`` with and without the neuron steered: ``scale`` is added to
        its activation at every position (its output direction ``scale * w_out[neuron]`` added to the MLP's
        output). Call on the model thread."""
        import torch

        from ..models.sites import Site

        t0 = time.perf_counter()
        model = self.model(run)
        self._check(run, model, layer, neuron)
        if not text.strip():
            raise HTTPError(422, "the text is empty")
        ids = model.to_tokens(text, prepend_bos=run.prepend_bos)
        bos = run.prepend_bos and model.bos_token_id is not None
        limit = run.context_length
        if ids.shape[1] > limit:  # the last tokens of the text, after the BOS token
            ids = torch.cat([ids[:, :1], ids[:, -(limit - 1):]], 1) if bos else ids[:, -limit:]

        def add(act: torch.Tensor, _site: Site) -> torch.Tensor:
            out = act.clone()
            out[..., neuron] += scale
            return out

        base = model.forward(ids)[0, -1].float().log_softmax(-1)
        with model.intervene({Site.mlp_post(layer): add}):
            steered = model.forward(ids)[0, -1].float().log_softmax(-1)
        p, q = base.exp(), steered.exp()
        decode = model.tokenizer.decode

        def entries(index: torch.Tensor) -> list[dict[str, Any]]:
            return [{"token": decode([int(i)]), "id": int(i), "base": float(p[i]), "steered": float(q[i])}
                    for i in index.tolist()]

        diff = q - p
        return {
            "run": run.name, "layer": layer, "neuron": neuron, "scale": scale, "model": model.name,
            "tokens": model.to_str_tokens(ids[0, 1:] if bos else ids[0]),
            "base": entries(p.topk(top).indices), "steered": entries(q.topk(top).indices),
            "promoted": entries(diff.topk(top).indices), "suppressed": entries((-diff).topk(top).indices),
            "kl": float((q * (steered - base)).sum().clamp_min(0.0)),
            "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1),
        }
