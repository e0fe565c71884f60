"""Causal verification of claims about neurons: held out, against matched nulls, with multiplicity control.

The hunt (and ``explain``) make claims from correlations: *neuron N, in direction D, is about X*. ``verify``
tests each one causally, in a way a sceptical reviewer can accept:

1. **Held out.** The hunt scans the ``train`` side of a document split (:mod:`neuronhunter.data.split`, recorded
   in the run manifest as ``corpus.split``); verification reads the ``heldout`` side of the same corpus, or a second
   corpus given by the user. Every output says which (``verified_on``: ``heldout`` or ``corpus:<spec>``). A run
   that scanned all documents has no held-out side and is refused unless another corpus is given.
2. **The effect.** At each held-out token the claim is about (input-aligned, position >= 1: :mod:`neuronhunter.stats.tokens`;
   at most ``max_claim_tokens``, a seeded sample shared by all claims about the same thing), the neuron is mean-ablated *at that token alone* and the change
   of the next-token loss there is measured exactly (:mod:`neuronhunter.causal.engine`). ``causal_effect`` is the
   mean change in nats; ``causal_per_unit`` divides it by the mean norm of the residual perturbation.
3. **Matched nulls, many of them** (:mod:`neuronhunter.causal.nulls`): ``n_nulls`` same-layer neurons perturbing
   the residual stream by exactly the same norm at the same tokens, and the claimed neuron perturbed identically at
   matched non-claim tokens (stratified permutation test). ``p_value = max(p_neuron, p_token)``.
4. **Multiplicity.** Benjamini–Hochberg q-values across all tested claims of the call; ``causally_confirmed`` when
   ``q_value <= alpha`` (0.05). Claims with fewer than ``min_tokens`` held-out tokens, or whose neuron does not
   perturb the residual stream at them, are not tested (``p_value`` NaN) and never confirmed.
5. **A screen and a second test.** Attribution patching (gradient x the same perturbation, one backward pass per
   batch) estimates every neuron's effect; its correlation with the exact effects is reported, and the claim's rank
   among all neurons of its layer (per unit of perturbation) is kept as ``attribution_p``. The steering check
   (:mod:`neuronhunter.causal.steering`) adds the neuron's direction and tests whether the tokens its logit
   attribution (``steer_*``) and its claim (``steer_claim_*``) predict rise more than matched random token sets;
   BH q-values across claims give ``steering_confirmed``.

Outputs of :func:`verify_run`: ``claims.parquet`` (one row per claim, the columns of :data:`CLAIM_COLUMNS`),
``verification.parquet`` (everything per claim: nulls, attribution, steering), ``verification.json`` (settings,
data, counts, the attribution/exact correlation, timings); the hunt's claims also as ``causal_*`` columns of
``neurons.parquet`` (updated in place with :func:`neuronhunter.runfolder.updating`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from ..config import StrictModel
from ..errors import ConfigError
from ..models.hooked import HookedModel
from . import nulls as N
from . import steering as S
from .claims import CLAIM_VERDICTS, Claim, TokenMatcher, hunt_claims
from .engine import AblationEngine

log = logging.getLogger(__name__)

CLAIM_COLUMNS = ["layer", "neuron", "direction", "claim", "causal_effect", "causal_per_unit", "p_value", "q_value",
                 "causally_confirmed", "verified_on", "n_tokens", "n_nulls"]
NEURON_COLUMNS = ["causal_effect", "causal_per_unit", "causal_p", "causal_q", "causally_confirmed", "verified_on"]
_OLD_NEURON_COLUMNS = ("causal_z",)


class VerifyConfig(StrictModel):
    """Settings of ``neuronhunter verify`` (see the module docstring)."""

    verdicts: list[str] = Field(list(CLAIM_VERDICTS), description="hunt verdicts whose claims are tested")
    hunt: bool = Field(True, description="test the hunt's claims (besides claims given by hand)")
    n_nulls: int = Field(50, ge=1, description="matched null neurons per claim")
    max_nulls: int = Field(200, ge=1, description="null neurons for claims that beat all first n_nulls "
                           "(sequential Monte Carlo: the smallest p-value becomes 1/(max_nulls+1))")
    early_stop: int = Field(5, ge=0, description="stop a claim's null sequence at an interim look once this many "
                            "nulls match or beat it (Besag-Clifford; such a claim's p-value is at least "
                            "(early_stop+1)/(look+1), far above any BH threshold); 0: every claim gets n_nulls")
    null_looks: list[int] = Field([10, 20], description="interim looks (nulls run so far) before n_nulls")
    token_matches: int = Field(4, ge=1, description="matched non-claim tokens per claim token (token null)")
    n_draws: int = Field(2000, ge=50, description="Monte-Carlo draws of the stratified token permutation test")
    max_claim_tokens: int = Field(16, ge=1, description="held-out tokens tested per claim (a seeded sample)")
    min_tokens: int = Field(3, ge=1, description="claims with fewer held-out tokens are not tested")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="confirmed when the BH q-value is at most this")
    attribution: bool = Field(True, description="attribution-patching screen of every neuron")
    steer: bool = Field(True, description="steering check")
    steer_tokens: int = Field(32, ge=1, description="tokens steered at per layer")
    steer_sets: int = Field(200, ge=1, description="random token sets matched on clean probability (steering null)")
    steer_match_window: int = Field(50, ge=1, description="a null token is drawn within this many ranks of the "
                                    "predicted token it replaces")
    steer_quantile: float = Field(0.99, gt=0.5, lt=1.0, description="steering amount: this quantile of d*(a-mean)")
    steer_top_k: int = Field(10, ge=1, description="tokens of the logit-attribution prediction")
    max_tokens: int | None = Field(32768, ge=1, description="verification corpus tokens (held-out side)")
    batch_tokens: int = Field(4096, ge=64, description="positions per forward pass")
    seed: int = 0


# ------------------------------------------------------------------------------------------------ helpers
def _stable_rng(seed: int, *key: Any) -> np.random.Generator:
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _seed_key(claim: Claim) -> tuple[int, int, str]:
    """What a claim's random draws depend on: not its direction (a relabelled neuron must get the same draws)."""
    return (claim.layer, claim.neuron, claim.claim)


def write_norms(model: HookedModel, layer: int) -> np.ndarray:
    """``|w_j|``: the residual-stream norm one unit of each neuron's activation writes (through the linear part of a
    post-norm where the block has one)."""
    from ..analysis.attribution import neuron_writes

    return neuron_writes(model, layer).float().norm(dim=1).cpu().numpy().astype(np.float64)


def _logit_prediction(model: HookedModel, layer: int, neuron: int, sign: float, k: int) -> np.ndarray:
    from ..analysis.attribution import direct_logit_weights

    dla = direct_logit_weights(model, layer, [neuron])[0].float() * sign
    return dla.topk(min(k, dla.shape[0])).indices.cpu().numpy().astype(np.int64)


class _Probes:
    """Probes of one layer collected from all its claims, run in one engine call."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n = 0

    def add(self, tok: np.ndarray, unit: np.ndarray, value: np.ndarray) -> slice:
        tok, unit, value = (np.asarray(x).reshape(-1) for x in (tok, unit, value))
        self.parts.append((tok.astype(np.int64), unit.astype(np.int64), value.astype(np.float64)))
        s = slice(self.n, self.n + len(tok))
        self.n += len(tok)
        return s

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return tuple(np.concatenate([p[i] for p in self.parts]) for i in range(3))  # type: ignore[return-value]


def _row(claim: Claim, verified_on: str, **values: Any) -> dict[str, Any]:
    base = {"layer": claim.layer, "neuron": claim.neuron, "direction": claim.direction, "claim": claim.claim,
            "kind": claim.kind, "source": claim.source, "verdict": claim.verdict, "verified_on": verified_on,
            "status": "tested", "n_tokens": 0, "n_tokens_available": 0, "n_nulls": 0,
            "perturbation": np.nan, "causal_effect": np.nan, "causal_per_unit": np.nan,
            "null_neuron_mean": np.nan, "null_neuron_sd": np.nan, "p_neuron": np.nan,
            "token_null_mean": np.nan, "token_null_per_unit": np.nan, "p_token": np.nan, "p_value": np.nan, "q_value": np.nan,
            "causally_confirmed": False, "attribution_effect": np.nan, "attribution_p": np.nan,
            "steer_amount": np.nan, "steer_effect": np.nan, "steer_p": np.nan, "steer_q": np.nan, "steering_confirmed": False,
            "steer_claim_effect": np.nan, "steer_claim_p": np.nan}
    base.update(values)
    return base


# ------------------------------------------------------------------------------------------------ one layer
def _run(engine: AblationEngine, layer: int, probes: _Probes, clean: np.ndarray) -> np.ndarray:
    """Loss changes of a layer's probes (exact, one engine call)."""
    tok, unit, val = probes.arrays()
    if not len(tok):
        return np.zeros(0)
    return engine.run(layer, tok, unit, val) - clean[tok]


def _layer(engine: AblationEngine, matcher: TokenMatcher, layer: int, claims: list[tuple[int, Claim]],
           masks: dict[int, np.ndarray], cfg: VerifyConfig, verified_on: str, lexicon_words: dict[str, list[str]],
           pairs: list[np.ndarray]) -> dict[int, dict[str, Any]]:
    """Test every claim of one layer; returns ``{claim index: result row}`` and appends (exact, attribution)
    effect pairs to ``pairs``."""
    model = engine.model
    st = engine.layer(layer)
    acts = st.acts.numpy().astype(np.float64)  # [N, d]
    mu = st.means.numpy().astype(np.float64)
    wn = write_norms(model, layer)
    clean = engine.clean_nll()
    probes = _Probes()
    work: dict[int, dict[str, Any]] = {}
    rows: dict[int, dict[str, Any]] = {}
    claimed_here: dict[int, set[str]] = {}
    for _, c in claims:
        claimed_here.setdefault(c.neuron, set()).update(c.categories or c.tokens)
    for i, c in claims:
        mask = masks[i]
        avail = np.flatnonzero(mask)
        rng = _stable_rng(cfg.seed, "sample", c.claim)  # claims about the same thing share their tokens
        tok = np.sort(rng.choice(avail, size=cfg.max_claim_tokens, replace=False)) \
            if len(avail) > cfg.max_claim_tokens else avail
        n = c.neuron
        delta = np.abs(mu[n] - acts[tok, n]) * wn[n]
        info = {"n_tokens": len(tok), "n_tokens_available": len(avail)}
        if len(tok) < cfg.min_tokens:
            rows[i] = _row(c, verified_on, status=f"too few held-out tokens ({len(avail)})", **info)
            continue
        if delta.mean() <= N.TINY:
            rows[i] = _row(c, verified_on, status="no perturbation (zero write or no deviation)",
                           perturbation=float(delta.mean()), **info)
            continue
        sizes = (np.abs(mu[None, :] - acts[tok]) * wn[None, :]).mean(0)
        overlap = set(c.categories or c.tokens)
        exclude = [j for j, what in claimed_here.items() if j != n and what & overlap]
        ranked = N.match_neurons(sizes, n, max(cfg.n_nulls, cfg.max_nulls), exclude)
        candidates = np.flatnonzero(~mask)
        strata = N.match_tokens(acts[:, n] - mu[n], tok, candidates, cfg.token_matches)  # [c, k]
        filled = strata >= 0
        change = np.repeat((mu[n] - acts[tok, n])[:, None], strata.shape[1], 1)  # the claim token's change
        w = {"tok": tok, "delta": delta, "ranked": ranked, "strata": strata, "info": info,
             "own": probes.add(tok, np.full(len(tok), n), np.full(len(tok), mu[n])),
             # the same change of the neuron as at the matched claim token: the same vector added to the residual
             "tokennull": probes.add(strata[filled], np.full(int(filled.sum()), n),
                                     acts[strata[filled], n] + change[filled]),
             "nulls": ranked[:0], "null_vals": np.zeros((len(tok), 0)), "null_eff": np.zeros((len(tok), 0))}
        work[i] = w
    # the null sequence, run in stages over all claims of the layer (one engine call per stage): up to each interim
    # look, then n_nulls, then max_nulls. A claim leaves it at a look once early_stop nulls match or beat it
    # (Besag & Clifford 1991: its p-value is then at least (early_stop + 1) / (look + 1), so it could not be
    # confirmed whatever the rest of the nulls did), and goes past n_nulls only while no null matches it (so that p
    # can go below 1/(n_nulls + 1)). p = (1 + #nulls >= claim) / (n + 1) over the nulls run.
    looks = sorted({k for k in cfg.null_looks if 0 < k < cfg.n_nulls} | {cfg.n_nulls})
    stages = [*looks, cfg.max_nulls] if cfg.max_nulls > cfg.n_nulls else looks
    eff = _run(engine, layer, probes, clean)  # the claims themselves and their token nulls
    for w in work.values():
        w["own_eff"] = eff[w["own"]]
        w["tokennull_eff"] = eff[w["tokennull"]]
    for stage in stages:
        more = _Probes()
        for w in work.values():
            done = len(w["nulls"])
            beaten = int(np.sum(w["null_eff"].mean(0) >= w["own_eff"].mean())) if done else 0
            if done >= len(w["ranked"]) or done >= stage:
                continue
            if done >= cfg.n_nulls and beaten > 0:  # past n_nulls only while no null matches the claim
                continue
            if cfg.early_stop and done and beaten >= cfg.early_stop:
                continue
            add = w["ranked"][done:stage]
            vals = N.null_values(acts[w["tok"]], mu, wn, w["delta"], add)
            w["stage"] = (more.add(np.repeat(w["tok"], len(add)), np.tile(add, len(w["tok"])), vals), add, vals)
        if not more.n:
            break
        stage_eff = _run(engine, layer, more, clean)
        for w in work.values():
            if "stage" in w:
                sl, add, vals = w.pop("stage")
                w["null_eff"] = np.concatenate([w["null_eff"], stage_eff[sl].reshape(len(w["tok"]), len(add))], 1)
                w["nulls"] = np.concatenate([w["nulls"], add])
                w["null_vals"] = np.concatenate([w["null_vals"], vals], 1)
    grads = None
    if cfg.attribution and work:
        union = np.unique(np.concatenate([w["tok"] for w in work.values()]))
        g = engine.gradients(layer, union).numpy().astype(np.float64)  # [u, d]
        grads = (union, g)
    for i, c in claims:
        if i not in work:
            continue
        w = work[i]
        n, tok, delta = c.neuron, w["tok"], w["delta"]
        own = w["own_eff"]
        null_eff = w["null_eff"]  # [c, J]
        strata = w["strata"]
        tn, tn_size = np.full(strata.shape, np.nan), np.full(strata.shape, np.nan)
        tn[strata >= 0] = w["tokennull_eff"]
        tn_size[strata >= 0] = np.repeat(delta[:, None], strata.shape[1], 1)[strata >= 0]
        effect = float(own.mean())
        null_means = null_eff.mean(0)
        p_neuron = N.rank_p(effect, null_means)
        p_token, draws = N.stratified_p(own, delta, tn, tn_size, cfg.n_draws, _stable_rng(cfg.seed, "tokens", *_seed_key(c)))
        per_unit_tn = np.nansum(tn) / np.nansum(tn_size) if np.nansum(tn_size) > N.TINY else np.nan
        row = _row(c, verified_on, **w["info"], n_nulls=len(w["nulls"]), perturbation=float(delta.mean()),
                   causal_effect=effect, causal_per_unit=effect / float(delta.mean()),
                   null_neuron_mean=float(null_means.mean()) if len(null_means) else np.nan,
                   null_neuron_sd=float(null_means.std(ddof=1)) if len(null_means) > 1 else np.nan,
                   p_neuron=p_neuron, token_null_mean=float(np.nanmean(tn)) if np.isfinite(tn).any() else np.nan,
                   token_null_per_unit=float(per_unit_tn), p_token=p_token, p_value=max(p_neuron, p_token))
        if grads is not None:
            union, g = grads
            at = np.searchsorted(union, tok)
            gt = g[at]  # [c, d]
            attr_own = gt[:, n] * (mu[n] - acts[tok, n])
            attr_null = gt[:, w["nulls"]] * (w["null_vals"] - acts[tok][:, w["nulls"]])
            pairs.append(np.stack([np.concatenate([own, null_eff.reshape(-1)]),
                                   np.concatenate([attr_own, attr_null.reshape(-1)])]))
            # the screen: every neuron of the layer mean-ablated at these tokens, per unit of perturbation
            all_attr = (gt * (mu[None, :] - acts[tok])).sum(0)
            all_size = (np.abs(mu[None, :] - acts[tok]) * wn[None, :]).sum(0)
            per_unit = np.where(all_size > N.TINY, all_attr / np.maximum(all_size, N.TINY), np.nan)
            row["attribution_effect"] = float(attr_own.mean())
            row["attribution_p"] = N.rank_p(float(per_unit[n]), np.delete(per_unit, n))
        rows[i] = row
    if cfg.steer and work:
        before = engine.seconds["probes"]
        t0 = time.perf_counter()
        _steer_layer(engine, matcher, layer, claims, work, rows, acts, mu, cfg, lexicon_words)
        engine.seconds["probes"] = before  # steering probes are counted as steering
        engine.seconds["steering"] = engine.seconds.get("steering", 0.0) + time.perf_counter() - t0
    return rows


def _steer_layer(engine: AblationEngine, matcher: TokenMatcher, layer: int, claims: list[tuple[int, Claim]],
                 work: dict[int, Any], rows: dict[int, dict[str, Any]], acts: np.ndarray, mu: np.ndarray,
                 cfg: VerifyConfig, lexicon_words: dict[str, list[str]]) -> None:
    """Run the steering check (:mod:`neuronhunter.causal.steering`) for the tested claims of a layer."""
    import torch

    rng = _stable_rng(cfg.seed, "steer", layer)
    pos = np.sort(rng.choice(len(acts), size=min(cfg.steer_tokens, len(acts)), replace=False))
    clean: dict[str, Any] = {}

    def keep_clean(idx: np.ndarray, logp: torch.Tensor) -> None:
        clean.setdefault("parts", []).append((idx, logp))

    engine.run(layer, pos, np.full(len(pos), -1), np.zeros(len(pos)), readout=keep_clean)
    order = np.concatenate([i for i, _ in clean["parts"]])
    clean_logp = torch.cat([lp for _, lp in clean["parts"]])[torch.as_tensor(np.argsort(order))]  # [P, vocab]
    ranked, rank = S.clean_ranking(clean_logp)
    tested = [(i, c) for i, c in claims if i in work]
    tests: dict[int, list[S.SteerTest]] = {}
    probes = _Probes()
    where: dict[int, slice] = {}
    for i, c in tested:
        crng = _stable_rng(cfg.seed, "steer-sets", *_seed_key(c))
        predictions = [("logit", _logit_prediction(engine.model, layer, c.neuron, c.sign, cfg.steer_top_k)),
                       ("claim", matcher.vocabulary(c, lexicon_words))]
        tests[i] = [S.SteerTest(name, np.concatenate([pred[None, :], S.matched_sets(
            pred, rank, ranked, cfg.steer_sets, cfg.steer_match_window, crng)]))
            for name, pred in predictions if len(pred)]
        q = S.high_quantile(acts[:, c.neuron], float(mu[c.neuron]), c.sign, cfg.steer_quantile)
        where[i] = probes.add(pos, np.full(len(pos), c.neuron), acts[pos, c.neuron] + c.sign * q)
        rows[i]["steer_amount"] = q
    tok, unit, val = probes.arrays()
    owner = np.empty(len(tok), dtype=np.int64)
    for i, sl in where.items():
        owner[sl] = i
    steered: dict[int, dict[str, np.ndarray]] = {i: {t.name: np.zeros((len(pos), len(t.sets))) for t in tests[i]}
                                                 for i in where}

    def read(idx: np.ndarray, logp: torch.Tensor) -> None:
        for i in np.unique(owner[idx]):
            sel = np.flatnonzero(owner[idx] == i)
            at = idx[sel] - where[int(i)].start  # position index within the claim's probes
            for t in tests[int(i)]:
                steered[int(i)][t.name][at] = S.set_logp(logp[torch.as_tensor(sel)], t.sets).double().numpy()

    engine.run(layer, tok, unit, val, readout=read)
    for i, _ in tested:
        for t in tests[i]:
            base = S.set_logp(clean_logp, t.sets).double().numpy()
            effect, p = S.steer_statistics(steered[i][t.name], base)
            key = "steer" if t.name == "logit" else "steer_claim"
            rows[i][f"{key}_effect"], rows[i][f"{key}_p"] = effect, p


# ------------------------------------------------------------------------------------------------ all claims
def verify_claims(model: HookedModel, batches: Sequence[Any], claims: Sequence[Claim], categories: Sequence[str],
                  config: VerifyConfig | None = None, *, verified_on: str = "heldout",
                  lexicon_words: dict[str, list[str]] | None = None,
                  progress: Callable[[int], None] | None = None,
                  on_layer: Callable[[int, Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Test ``claims`` on ``batches`` (labelled TokenBatches of the verification corpus; see the module docstring).

    Args:
        categories: the names of the batches' label columns.
        lexicon_words: words per category (the steering check's claim token set).
        progress: called with the number of claims done, after each layer.
        on_layer: called after each layer with ``(layer, its rows as a DataFrame)`` (p-values, no q-values yet):
            long runs can keep what is done.

    Returns:
        ``(details DataFrame, summary dict)``; the details have one row per claim, in the order given.
    """
    import pandas as pd

    cfg = config or VerifyConfig()
    t0 = time.perf_counter()
    claims = list(claims)
    if not claims:
        raise ConfigError("no claims to verify")
    for c in claims:
        if not 0 <= c.layer < model.n_layers:
            raise ConfigError(f"claim {c.layer}:{c.neuron}: layer out of range ({model.name} has layers "
                              f"0..{model.n_layers - 1})")
        if not 0 <= c.neuron < model.d_mlp:
            raise ConfigError(f"claim {c.layer}:{c.neuron}: neuron out of range ({model.name} has neurons "
                              f"0..{model.d_mlp - 1} per layer)")
    engine = AblationEngine(model, batches, batch_tokens=cfg.batch_tokens)
    t = engine.tokens
    matcher = TokenMatcher(model.tokenizer, categories, t)
    masks = {i: matcher.mask(c) for i, c in enumerate(claims)}
    by_layer: dict[int, list[tuple[int, Claim]]] = {}
    for i, c in enumerate(claims):
        by_layer.setdefault(c.layer, []).append((i, c))
    rows: dict[int, dict[str, Any]] = {}
    pairs: list[np.ndarray] = []
    for layer in sorted(by_layer):
        done = _layer(engine, matcher, layer, by_layer[layer], masks, cfg, verified_on, lexicon_words or {}, pairs)
        rows.update(done)
        if on_layer is not None:
            on_layer(layer, pd.DataFrame([done[i] for i, _ in by_layer[layer]]))
        log.info("layer %d: %d claims verified (%.0f s so far)", layer, len(by_layer[layer]),
                 time.perf_counter() - t0)
        if progress is not None:
            progress(len(by_layer[layer]))
    df = pd.DataFrame([rows[i] for i in range(len(claims))])
    tested = df.p_value.notna().to_numpy()
    q = np.full(len(df), np.nan)
    q[tested] = N.bh_qvalues(df.p_value.to_numpy()[tested])
    df["q_value"] = q
    df["causally_confirmed"] = tested & (np.nan_to_num(q, nan=1.0) <= cfg.alpha)
    steered = df.steer_p.notna().to_numpy()
    sq = np.full(len(df), np.nan)
    sq[steered] = N.bh_qvalues(df.steer_p.to_numpy()[steered])
    df["steer_q"] = sq
    df["steering_confirmed"] = steered & (np.nan_to_num(sq, nan=1.0) <= cfg.alpha)
    summary = summarise(df, cfg)
    summary.update(n_tokens=len(t), n_windows=t.n_windows, n_documents=int(len(np.unique(t.doc_ids))),
                   seconds=round(time.perf_counter() - t0, 1), probes=engine.n_probes, positions=engine.n_positions,
                   seconds_by_stage={k: round(v, 1) for k, v in engine.seconds.items()},
                   attribution_vs_exact=_correlation(pairs))
    return df, summary


def _correlation(pairs: list[np.ndarray]) -> dict[str, Any]:
    """Pearson and Spearman correlation of attribution estimates with exact single-token effects."""
    if not pairs:
        return {"n": 0}
    x = np.concatenate(pairs, 1)
    ok = np.isfinite(x).all(0)
    exact, attr = x[0, ok], x[1, ok]
    if len(exact) < 3 or exact.std() == 0 or attr.std() == 0:
        return {"n": int(len(exact))}
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable")  # noqa: E731
    return {"n": int(len(exact)), "pearson": float(np.corrcoef(exact, attr)[0, 1]),
            "spearman": float(np.corrcoef(rank(exact), rank(attr))[0, 1]),
            "sign_agreement": float(np.mean(np.sign(exact) == np.sign(attr)))}


def summarise(df: Any, cfg: VerifyConfig) -> dict[str, Any]:
    """Counts per source/verdict: claims, tested, confirmed; effect sizes of tested and confirmed claims."""
    tested = df[df.p_value.notna()]

    def counts(g: Any) -> dict[str, Any]:
        t = g[g.p_value.notna()]
        return {"claims": int(len(g)), "tested": int(len(t)), "confirmed": int(g.causally_confirmed.sum()),
                "steering_confirmed": int(g.steering_confirmed.sum())}

    groups = df.assign(group=[v if isinstance(v, str) and v else s for v, s in zip(df.verdict, df.source,
                                                                                     strict=True)])
    return {"config": cfg.model_dump(mode="json"), **counts(df),
            "by_group": {str(k): counts(g) for k, g in groups.groupby("group")},
            "not_tested": {str(k): int(v) for k, v in df[df.p_value.isna()].status.value_counts().items()},
            "median_effect": float(tested.causal_effect.median()) if len(tested) else None,
            "median_effect_confirmed": float(tested[tested.causally_confirmed].causal_effect.median())
            if tested.causally_confirmed.any() else None,
            "median_null_effect": float(tested.null_neuron_mean.median()) if len(tested) else None}


# ------------------------------------------------------------------------------------------------ run folders
def run_settings(run: str | Path) -> dict[str, Any]:
    """Model, corpus, windowing, lexicon and document split of a run folder (``config.json``, ``manifest.json``)."""
    from ..io import read_json, require_run

    run = require_run(run)
    cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
    manifest = read_json(run / "manifest.json") if (run / "manifest.json").exists() else {}
    lexicon = read_json(run / "lexicon.json") if (run / "lexicon.json").exists() else None
    if lexicon is None and cfg.get("categories"):
        lexicon = {"categories": cfg["categories"]}
    corpus_info = manifest.get("corpus") if isinstance(manifest.get("corpus"), dict) else {}
    split = corpus_info.get("split") or {"side": cfg.get("split", "all"),
                                         "heldout_fraction": cfg.get("heldout_fraction", 0.3),
                                         "seed": cfg.get("split_seed", 0)}
    return {"model": cfg.get("model") or "smollm2-135m", "corpus": cfg.get("corpus"),
            "context_length": int(cfg.get("context_length") or 128), "prepend_bos": bool(cfg.get("prepend_bos", True)),
            "lexicon": lexicon or cfg.get("categories_file") or cfg.get("concepts"),
            "labeller_options": {"last_token_only": bool(cfg.get("label_last_token_only", False)),
                                 "case_sensitive": bool(cfg.get("case_sensitive", False))},
            "split": split}


def verification_documents(settings: dict[str, Any], corpus: Any = None) -> tuple[list[Any], str, dict[str, Any]]:
    """The documents to verify on and what they are: the held-out side of the run's split, or all of ``corpus``.

    Returns:
        ``(documents, verified_on, description)``.
    """
    from ..data.corpus import Corpus
    from ..data.split import DocumentSplit

    if corpus is not None:
        if isinstance(corpus, list):
            return corpus, "corpus:given", {"corpus": "given documents", "documents": len(corpus)}
        docs = list(Corpus(corpus))
        return docs, f"corpus:{corpus}", {"corpus": str(corpus), "documents": len(docs)}
    split = settings.get("split") or {}
    if split.get("side") != "train":
        raise ConfigError(f"the run scanned {split.get('side', 'all')!r} documents, so it has no held-out side to "
                          "verify on; give a second corpus with --corpus, or hunt with --split train")
    ds = DocumentSplit(float(split.get("heldout_fraction", 0.3)), int(split.get("seed", 0)))
    spec = settings.get("corpus")
    docs = list(ds.select(Corpus(spec), "heldout"))
    if not docs:
        raise ConfigError(f"the held-out side of {spec or 'the default corpus'} has no documents")
    return docs, "heldout", {"corpus": spec or "default", "split": ds.manifest("heldout"), "documents": len(docs)}


def update_neurons_table(run: Path, results: Any) -> Path:
    """Put the hunt claims' results into ``RUN/neurons.parquet`` as :data:`NEURON_COLUMNS` (replacing earlier ones;
    untested neurons get NaN / False / null)."""
    from ..io import read_table, write_table

    neurons = read_table(run / "neurons.parquet")
    neurons = neurons.drop(columns=[c for c in (*NEURON_COLUMNS, *_OLD_NEURON_COLUMNS) if c in neurons.columns])
    hunt = results[results.source == "hunt"].drop_duplicates(["layer", "neuron"])
    res = hunt[["layer", "neuron", "causal_effect", "causal_per_unit", "p_value", "q_value", "causally_confirmed",
                "verified_on"]].rename(columns={"p_value": "causal_p", "q_value": "causal_q"})
    merged = neurons.merge(res, how="left", on=["layer", "neuron"])
    merged["causally_confirmed"] = merged["causally_confirmed"].astype("boolean").fillna(False).astype(bool)
    formats = ("parquet", "csv") if (run / "neurons.csv").exists() else ("parquet",)
    write_table(merged, run / "neurons", formats=formats)
    return run / "neurons.parquet"


def write_outputs(folder: Path, results: Any, summary: dict[str, Any]) -> None:
    """``claims.parquet``, ``verification.parquet`` and ``verification.json`` in ``folder``."""
    from ..io import write_json, write_table

    write_table(results[CLAIM_COLUMNS], folder / "claims")
    write_table(results, folder / "verification")
    write_json(folder / "verification.json", summary)


def collect_claims(run: str | Path | None, config: VerifyConfig, claims: Sequence[Claim] = ()
                   ) -> tuple[list[Claim], dict[str, Any]]:
    """The claims to test (the run's, unless ``config.hunt`` is off, then ``claims``; each once) and the run's
    settings (:func:`run_settings`; defaults without a run). Raises a ConfigError when there is nothing to test."""
    from ..io import read_table, require_run
    from .claims import dedupe

    if run is None:
        settings = {"model": "smollm2-135m", "corpus": None, "context_length": 128, "prepend_bos": True,
                    "lexicon": None, "labeller_options": {}, "split": {}}
        found: list[Claim] = []
    else:
        run = require_run(run, "neurons.parquet")
        settings = run_settings(run)
        found = hunt_claims(read_table(run / "neurons.parquet"), config.verdicts) if config.hunt else []
    out = dedupe([*found, *claims])
    if not out:
        where = f"{run} has no claims with verdicts {', '.join(config.verdicts)}" if run else "no claims"
        raise ConfigError(f"{where}; give --claim to test your own")
    return out, settings


def verify_run(run: str | Path | None, model: HookedModel | None = None, config: VerifyConfig | None = None, *,
               claims: Sequence[Claim] = (), corpus: Any = None, labeller: Any = None, out: str | Path | None = None,
               progress_total: Callable[[int], None] | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Verify a run's claims (and ``claims`` given by hand) and write the results (module docstring).

    Args:
        run: a hunt (or scan) run folder; None to verify hand-given claims on ``corpus`` alone (needs ``out``).
        model: the loaded model (default: the run's model).
        claims: extra claims.
        corpus: a second corpus (spec or list of documents) instead of the run's held-out documents.
        labeller: a concept labeller (default: the run's lexicon).
        out: write here instead of into the run (the run's neurons table is then left alone).
        progress_total: called once with the number of claims (``progress`` counts claims done).

    Returns:
        ``(details DataFrame, summary dict)``.
    """
    from ..models import load_model
    from ..runfolder import updating
    from .interventions import corpus_batches, load_concept_labeller

    cfg = config or VerifyConfig()
    run = Path(run) if run is not None else None
    if run is None and out is None:
        raise ConfigError("without a run folder, verify needs --claim, --corpus and --out")
    all_claims, settings = collect_claims(run, cfg, claims)
    docs, verified_on, data = verification_documents(settings, corpus)
    model = model or load_model(settings["model"])
    labeller = labeller or load_concept_labeller(settings["lexicon"], **settings["labeller_options"])
    batches = corpus_batches(model, docs, context_length=settings["context_length"], max_tokens=cfg.max_tokens,
                             batch_size=16, prepend_bos=settings["prepend_bos"], labeller=labeller)
    if progress_total is not None:
        progress_total(len(all_claims))
    words = {name: list(spec.words) for name, spec in getattr(getattr(labeller, "lexicon", None), "categories",
                                                                {}).items()}
    results, summary = verify_claims(model, batches, all_claims, labeller.categories, cfg, verified_on=verified_on,
                                     lexicon_words=words, progress=progress)
    summary.update(run=str(run) if run is not None else None, verified_on=verified_on, data=data,
                   model=settings["model"] if run is not None else model.name)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_outputs(folder, results, summary)
        return results, summary
    assert run is not None
    with updating(run) as manifest:  # the run reads as incomplete while its tables are rewritten
        write_outputs(run, results, summary)
        update_neurons_table(run, results)
        manifest["verification"] = {"claims": summary["claims"], "tested": summary["tested"],
                                    "confirmed": summary["confirmed"], "verified_on": verified_on,
                                    "alpha": cfg.alpha}
    return results, summary
