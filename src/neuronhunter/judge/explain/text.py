"""Natural-language explanations: an explainer model reads exemplars, a simulator model predicts activations.

**Explainer** (pluggable, :class:`ChatModel`): the embedded instruct model (:class:`EmbeddedChat`, offline, greedy
decoding through the tokenizer's chat template) or any OpenAI-compatible chat endpoint (:class:`EndpointChat`:
``POST {base}/chat/completions``; llama.cpp's server, vLLM, Ollama). It is shown the neuron's top exemplars in
the chosen direction, a few from the middle of its range (band samples) and the opposite extreme, each with the
peak token marked ``[[like this]]``, and asked what the marked tokens have in common (:func:`explain_prompt`).

**Simulator** (OpenAI's explain-simulate-score): reads the explanation and a held-out excerpt and predicts, for
every token, a score 0-9. The embedded simulator does it "all at once" in one forward pass (:class:`LogitSimulator`):
a one-shot example, then one line per token ``token<TAB>unknown``, and at each tab it reads the model's
probabilities of the digits 0-9 and predicts their expectation. An endpoint simulator (:class:`EndpointSimulator`)
is asked for one ``index<TAB>score`` line per token.

**Scoring** on held-out text: for each sampled neuron, ``text_windows`` excerpts of 24 tokens from held-out
documents, half around its strongest held-out activations and half at random, both chosen with a fixed seed; the
text explanation's simulation r is Pearson's r between the simulator's scores and ``s a`` over all their tokens, and
the neuron's best rule-based explanation is scored on *the same tokens* for comparison (its r on all held-out text
is in ``explanations.parquet``). Text rows never count as the best explanation: they are scored on fewer, top-heavy
tokens, and their cost is ~seconds per neuron (a forward pass per excerpt), which is why only a sample gets one.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ...errors import ConfigError
from ...models.sites import Site

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

EXCERPT = 24  # tokens per simulated excerpt
ONE_SHOT = ("colour words", ["The", " red", " car", " and", " a", " blue", " door"], [0, 9, 1, 0, 0, 8, 1])


class ChatModel(Protocol):
    """Anything that answers a chat: ``messages`` ({role, content}) -> the assistant's reply."""

    name: str

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 32) -> str: ...


class Simulator(Protocol):
    name: str

    def simulate(self, explanation: str, tokens: Sequence[str]) -> np.ndarray: ...


def shown(token: str) -> str:
    """A token as a prompt line shows it (white space made visible)."""
    return token.replace("\n", "\\n").replace("\t", "\\t") or "∅"


def explain_prompt(top: Sequence[str], middle: Sequence[str], opposite: Sequence[str]) -> list[dict[str, str]]:
    """The explainer's messages for exemplar contexts (each with its peak token marked ``[[...]]``)."""
    lines = ["In each text excerpt below, one token is marked like [[this]]. A neuron of a language model fires "
             "strongly on the marked tokens."]
    lines += [f"{i + 1}. {' '.join(c.split())}" for i, c in enumerate(top)]
    if middle:
        lines.append("It fires weakly on these:")
        lines += [f"- {' '.join(c.split())}" for c in middle]
    if opposite:
        lines.append("It is most negative on these:")
        lines += [f"- {' '.join(c.split())}" for c in opposite]
    lines.append("What do the strongly marked tokens have in common? Answer with a short phrase.")
    return [{"role": "user", "content": "\n".join(lines)}]


def clean_explanation(text: str) -> str:
    text = " ".join(text.strip().split())
    text = re.sub(r"^(the marked (tokens|words) (are|have in common)[:,]?\s*)", "", text, flags=re.I)
    return text[:200] or "(no answer)"


# ------------------------------------------------------------------------------------------------ embedded
class EmbeddedChat:
    """The embedded instruct model as a chat model (greedy, no sampling: deterministic)."""

    def __init__(self, model: Any) -> None:
        self.model, self.tokenizer = model, model.tokenizer
        self.name = f"embedded:{model.name}"

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 32) -> str:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        ids = ids.to(self.model.device)
        with torch.inference_mode():
            out = self.model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                            do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class LogitSimulator:
    """All-at-once simulation with the embedded model (see the module docstring)."""

    def __init__(self, model: Any) -> None:
        self.model, self.tokenizer = model, model.tokenizer
        self.name = f"embedded:{model.name}"
        digits = [self.tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
        if any(len(d) != 1 for d in digits):
            raise ConfigError(f"{model.name}: the digits 0-9 are not single tokens; use an endpoint simulator")
        self.digits = torch.tensor([d[0] for d in digits])

    def _messages(self, explanation: str) -> list[dict[str, str]]:
        ex, toks, scores = ONE_SHOT
        demo = "\n".join(f"{shown(t)}\t{s}" for t, s in zip(toks, scores, strict=True))
        return [{"role": "user", "content": (
            "A neuron of a language model fires on: " + ex + ". For each token, rate the neuron's activation "
            "from 0 (none) to 9 (strongest).")},
            {"role": "assistant", "content": demo},
            {"role": "user", "content": f"A neuron fires on: {explanation}. Rate each token the same way."}]

    def simulate(self, explanation: str, tokens: Sequence[str]) -> np.ndarray:
        tok = self.tokenizer
        ids = tok.apply_chat_template(self._messages(explanation), add_generation_prompt=True, return_tensors="pt")
        ids = (ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids)[0].tolist()
        slots = []
        for t in tokens:
            ids += tok.encode(f"{shown(t)}\t", add_special_tokens=False)
            slots.append(len(ids) - 1)  # the logits here predict the score
            ids += tok.encode("unknown\n", add_special_tokens=False)
        with torch.inference_mode():
            logits = self.model.model(torch.tensor([ids], device=self.model.device)).logits[0]
        probs = torch.softmax(logits[slots][:, self.digits.to(logits.device)].float(), -1)
        return (probs * torch.arange(10, device=probs.device)).sum(-1).cpu().numpy()


# ------------------------------------------------------------------------------------------------ endpoint
class EndpointChat:
    """An OpenAI-compatible chat endpoint (``base`` like ``http://localhost:8080/v1``)."""

    def __init__(self, base: str, model: str | None = None, *, timeout: float = 120.0) -> None:
        self.base, self.model_name, self.timeout = base.rstrip("/"), model or "default", timeout
        self.name = f"endpoint:{self.base}:{self.model_name}"

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 32) -> str:
        body = json.dumps({"model": self.model_name, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{self.base}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (user-given URL)
                data = json.loads(resp.read().decode("utf-8"))
            return str(data["choices"][0]["message"]["content"])
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"chat endpoint {self.base} failed: {exc}") from None


class EndpointSimulator:
    """Simulation by asking a chat endpoint for one ``index<TAB>score`` line per token (missing lines: 0)."""

    def __init__(self, chat: EndpointChat) -> None:
        self.chat_model, self.name = chat, chat.name

    def simulate(self, explanation: str, tokens: Sequence[str]) -> np.ndarray:
        listing = "\n".join(f"{i + 1}\t{shown(t)}" for i, t in enumerate(tokens))
        reply = self.chat_model.chat([{"role": "user", "content": (
            f"A neuron of a language model fires on: {explanation}.\nFor each numbered token below, rate the "
            "neuron's activation from 0 (none) to 9 (strongest). Reply with one line per token: "
            f"index<TAB>score, nothing else.\n{listing}")}], max_tokens=8 * len(tokens) + 16)
        out = np.zeros(len(tokens))
        for m in re.finditer(r"^\s*(\d+)\s*[\t:,.)\s]\s*(\d+(?:\.\d+)?)", reply, flags=re.M):
            i = int(m.group(1)) - 1
            if 0 <= i < len(tokens):
                out[i] = min(float(m.group(2)), 9.0)
        return out


def make_clients(spec: str, model_name: str | None, model: Any) -> tuple[ChatModel, Simulator]:
    if spec == "embedded":
        from ...models.loading import DEFAULT_MODEL, EMBEDDED_ALIASES, load_model

        if model is None or str(model.name).lower() not in EMBEDDED_ALIASES:
            model = load_model(DEFAULT_MODEL)  # the embedded instruct model, whatever model the run scanned
        return EmbeddedChat(model), LogitSimulator(model)
    if not re.match(r"^https?://", spec):
        raise ConfigError(f"explainer/simulator must be 'embedded' or an http(s) URL, not {spec!r}")
    chat = EndpointChat(spec, model_name)
    return chat, EndpointSimulator(chat)


# ------------------------------------------------------------------------------------------------ pipeline
def parse_units(units: Sequence[str]) -> list[tuple[int, int]]:
    out = []
    for u in units:
        m = re.fullmatch(r"\s*[Ll]?(\d+)\s*[.:]\s*[Nn]?(\d+)\s*", u)
        if not m:
            raise ConfigError(f"neurons must look like 'LAYER.NEURON' (e.g. 20.882), got {u!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def exemplar_contexts(run: Path, units: list[tuple[int, int, str]], n_top: int = 8) -> dict[tuple[int, int], dict]:
    """Train exemplars of each ``(layer, neuron, direction)``: top, middle (band) and opposite contexts."""
    import pyarrow.dataset as ds

    from ...results import _decoded

    path = run / "examples.parquet"
    if not path.exists():
        return {}
    layers = sorted({u[0] for u in units})
    neurons = sorted({u[1] for u in units})
    table = _decoded(ds.dataset(str(path)).to_table(
        columns=["layer", "neuron", "kind", "direction", "band", "rank", "context"],
        filter=ds.field("layer").isin(layers) & ds.field("neuron").isin(neurons))).to_pandas()
    out = {}
    for layer, neuron, direction in units:
        ex = table[(table.layer == layer) & (table.neuron == neuron)]
        strong, weak = ("top", "bottom") if direction == "+" else ("bottom", "top")
        top = ex[ex.kind == strong].sort_values("rank")["context"].head(n_top).tolist()
        mid = ex[(ex.kind == "band") & (ex.direction == direction) & ex.band.isin([1, 2])]["context"].head(3).tolist()
        opp = ex[ex.kind == weak].sort_values("rank")["context"].head(2).tolist()
        out[(layer, neuron)] = {"top": top, "middle": mid, "opposite": opp}
    return out


def rule_prediction(rule: dict[str, Any], vocab: Any, norm: np.ndarray, labels: np.ndarray | None,
                    categories: list[str], positions: np.ndarray, docpos: np.ndarray, domain: str) -> np.ndarray:
    """A rule-based explanation's prediction on consecutive tokens of one window (``norm``: normalised ids of the
    whole window; predictions for every position)."""
    fam, weights = rule["family"], rule.get("weights") or [1.0]
    n = len(norm)
    out = np.zeros(n)
    prev = np.concatenate([[-1], norm[:-1]])
    nxt = np.concatenate([norm[1:], [-1]])

    def lab(c: str, shift: int) -> np.ndarray:
        if labels is None or c not in categories:
            return np.zeros(n, dtype=bool)
        col = labels[:, categories.index(c)].astype(bool)
        return np.roll(col, shift) & (np.arange(n) >= shift if shift > 0 else np.arange(n) < n + shift)

    if fam in ("tok", "prev", "next"):
        src = {"tok": norm, "prev": prev, "next": nxt}[fam]
        for w, t in zip(weights, rule["tokens"], strict=False):
            out[src == vocab.index.get(t, -2)] = w
    elif fam == "bigram":
        for w, (a, b) in zip(weights, rule["bigrams"], strict=False):
            out[(prev == vocab.index.get(a, -2)) & (norm == vocab.index.get(b, -2))] = w
    elif fam in ("cat", "prevcat", "nextcat"):
        out[lab(rule["category"], {"cat": 0, "prevcat": 1, "nextcat": -1}[fam])] = 1.0
    elif fam == "pos":
        for w, p in zip(weights, rule["positions"], strict=False):
            out[positions == p] = w
    elif fam == "docstart":
        out[docpos < rule["first_tokens"]] = 1.0
    elif fam == "domain":
        out[:] = float(domain in rule["domains"])
    return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) < 1e-12 or np.std(y) < 1e-12:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of a graded score (ties share a threshold)."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="stable")
    s, p = score[order], positive[order].astype(float)
    last = np.r_[s[1:] != s[:-1], True]
    tp, k = np.cumsum(p)[last], (np.arange(len(s)) + 1)[last]
    rec = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, rec]) * tp / k))


def heldout_windows(model: Any, scanner: Any, units: list[tuple[int, int]], max_windows: int) -> list[dict]:
    """The first ``max_windows`` held-out windows with the units' activations (one capture pass)."""
    from ...data.batches import iter_batches

    layers = sorted({u[0] for u in units})
    sites = [Site.mlp_post(layer) for layer in layers]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    out: list[dict] = []
    import itertools

    wins = itertools.islice(scanner.windows(), max_windows)
    for batch, ws in iter_batches(wins, batch_size=scanner.cfg.batch_size, pad_token_id=pad,
                                  has_bos=scanner.bos is not None):
        _, cache = model.run_with_cache(batch.input_ids, sites=sites, stop_at_layer=max(layers) + 1,
                                        attention_mask=batch.attention_mask)
        for i, w in enumerate(ws):
            acts = np.stack([cache[Site.mlp_post(layer)][i, : len(w.ids), neuron].float().cpu().numpy()
                             for layer, neuron in units], axis=1)
            out.append({"window": w, "acts": acts})
        scanner.pending.clear()
    return out


def explain_text(model: Any, scanner: Any, table: pd.DataFrame, best: pd.DataFrame, run: Path, cfg: Any,
                 vocab: Any) -> pd.DataFrame:
    """Text explanations for a sample of neurons, simulated on held-out excerpts (see the module docstring)."""
    import pandas as pd

    explainer, simulator = make_clients(cfg.explainer, cfg.explainer_model, model)
    if cfg.simulator is not None and cfg.simulator != cfg.explainer:
        simulator = make_clients(cfg.simulator, cfg.explainer_model, model)[1]
    if cfg.text_units:
        chosen = parse_units(cfg.text_units)
        missing = [u for u in chosen if not ((best.layer == u[0]) & (best.neuron == u[1])).any()]
        if missing:
            raise ConfigError(f"no explanation to compare for neuron {missing[0][0]}.{missing[0][1]} "
                              "(not scanned, or no exemplars)")
    else:
        rng = np.random.default_rng(cfg.seed)
        pool = best[["layer", "neuron"]].to_numpy()
        take = rng.choice(len(pool), size=min(cfg.text_neurons, len(pool)), replace=False) if len(pool) else []
        chosen = sorted((int(pool[i][0]), int(pool[i][1])) for i in take)
    direction = {(int(r.layer), int(r.neuron)): str(r.explanation_direction) for r in best.itertuples()}
    units = [(layer, neuron, direction.get((layer, neuron), "+")) for layer, neuron in chosen]
    if not units:
        return pd.DataFrame()
    contexts = exemplar_contexts(run, units)
    windows = heldout_windows(model, scanner, [(u[0], u[1]) for u in units], max_windows=256)
    first = 1 if scanner.bos is not None or not scanner.cfg.include_first else 0
    cats = scanner.candidates.space.categories
    domains = scanner.candidates.space.domains
    rows = []
    for j, (layer, neuron, d) in enumerate(units):
        sign = 1.0 if d == "+" else -1.0
        lc = scanner.candidates.layers[layer]
        scale = float(lc.scale[0 if d == "+" else 1][neuron])
        high = scanner.candidates.settings.high_fraction * scale if np.isfinite(scale) and scale > 0 else np.inf
        ctx = contexts.get((layer, neuron), {"top": [], "middle": [], "opposite": []})
        t0 = time.perf_counter()
        explanation = clean_explanation(explainer.chat(explain_prompt(ctx["top"], ctx["middle"], ctx["opposite"])))
        t_explain = time.perf_counter() - t0
        excerpts = _excerpts(windows, j, sign, first, cfg.text_windows, seed=cfg.seed * 1_000_003 + layer * 65_537 + neuron)
        best_row = table[(table.layer == layer) & (table.neuron == neuron) & (table.direction == d) & table.is_best]
        rule = json.loads(best_row["rule"].iloc[0]) if len(best_row) else None
        sim, actual, rule_pred = [], [], []
        t1 = time.perf_counter()
        for wi, lo, hi in excerpts:
            w = windows[wi]["window"]
            toks = [model.tokenizer.decode([i]) for i in w.ids[lo:hi]]
            sim.append(simulator.simulate(explanation, toks))
            actual.append(sign * windows[wi]["acts"][lo:hi, j])
            if rule is not None:
                norm = vocab.norm_of[np.asarray(w.ids)]
                pos = np.arange(len(w.ids))
                dom_i = scanner.doc_info.get(w.doc_id, (-1, 0))[0]
                pred = rule_prediction(rule, vocab, norm, w.labels, cats, pos,
                                       w.start + pos - (1 if scanner.bos is not None else 0),
                                       domains[dom_i] if dom_i >= 0 else "")
                rule_pred.append(pred[lo:hi])
        t_sim = time.perf_counter() - t1
        s, a = np.concatenate(sim) if sim else np.zeros(0), np.concatenate(actual) if actual else np.zeros(0)
        positive = a > high
        rows.append({
            "layer": layer, "neuron": neuron, "direction": d, "kind": "text", "explanation": explanation,
            "simulation_r": _pearson(s, a), "detection_auprc": average_precision(s, positive),
            "detection_f1": _f1(s >= 4.5, positive), "hard_negative_accuracy": float("nan"),
            "n_heldout_tokens": len(a), "n_high": int(positive.sum()), "is_best": False,
            "simulation_r_select": float("nan"),
            "rule": json.dumps({"family": "text", "explainer": explainer.name, "simulator": simulator.name}),
            "scored_on": str(table["scored_on"].iloc[0]) + ":excerpts",
            "rule_kind": best_row["kind"].iloc[0] if len(best_row) else None,
            "rule_explanation": best_row["explanation"].iloc[0] if len(best_row) else None,
            "rule_r_same_tokens": _pearson(np.concatenate(rule_pred), a) if rule_pred else float("nan"),
            "rule_r_heldout": float(best_row["simulation_r"].iloc[0]) if len(best_row) else float("nan"),
            "explain_s": t_explain, "simulate_s": t_sim, "n_excerpts": len(excerpts),
            "exemplars_shown": len(ctx["top"]) + len(ctx["middle"]) + len(ctx["opposite"]),
        })
        log.info("L%d.N%d %s: %r (text r %.3f, rule r %.3f on the same tokens)", layer, neuron, d, explanation,
                 rows[-1]["simulation_r"], rows[-1]["rule_r_same_tokens"])
    return pd.DataFrame(rows)


def _f1(pred: np.ndarray, positive: np.ndarray) -> float:
    tp = float((pred & positive).sum())
    denom = float(pred.sum() + positive.sum())
    return 2 * tp / denom if positive.any() and denom else float("nan")


def _excerpts(windows: list[dict], j: int, sign: float, first: int, n: int, seed: int) -> list[tuple[int, int, int]]:
    """``(window index, start, end)`` of ``n`` excerpts: half around the strongest activations, half at random."""
    if not windows:
        return []
    peaks = []
    for wi, w in enumerate(windows):
        v = sign * w["acts"][first:, j]
        if len(v):
            p = int(np.argmax(v))
            peaks.append((float(v[p]), wi, p + first))
    peaks.sort(key=lambda x: (-x[0], x[1]))
    out = []
    for _, wi, p in peaks[: n // 2]:
        length = len(windows[wi]["window"].ids)
        lo = max(first, min(p - EXCERPT + 5, length - EXCERPT))
        out.append((wi, lo, min(length, lo + EXCERPT)))
    rng = np.random.default_rng(seed)
    for _ in range(n - len(out)):
        wi = int(rng.integers(len(windows)))
        length = len(windows[wi]["window"].ids)
        lo = int(rng.integers(first, max(first + 1, length - EXCERPT + 1)))
        out.append((wi, lo, min(length, lo + EXCERPT)))
    return out
