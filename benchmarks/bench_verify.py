"""Causal verification speed: the probe engine against full forward passes, and the time per claim.

Three measurements, in one process, on the held-out documents of a hunt run (default ``runs/hunt``; without a run,
the held-out side of the bundled master text):

1. **Bare forward** throughput (tokens/s of a full forward pass over verification windows), the unit every
   other number is compared with. Measured in rounds alternating with (2), so a busy spell slows both sides.
2. **Exact single-token interventions** with the engine (:mod:`neuronhunter.causal.engine`) at three layers, laid
   out as verification lays them out (each sampled token carries the claim and ``n_nulls`` null neurons). The
   naive way to get the same numbers runs one full forward pass of the window up to the token per intervention;
   its cost is ``(mean prefix length) / (bare tokens/s)`` per intervention (and a few are timed directly as a
   check). ``speed-up`` = naive time / engine time per intervention.
3. **Time per claim**: ``verify_claims`` with the default settings on every claim of a few layers spread over depth
   (``--layers``; default three, at 1/6, 1/2 and 5/6 of the depth), split into stages; projected to every
   monosemantic/polysemantic claim of the run and compared with the goal (45 minutes on 2 CPU cores). Whole layers,
   because verification shares work between the claims of a layer (clean passes, the attribution backward passes,
   the steering passes, and engine passes holding many claims' probes): a sample of single claims from many layers
   pays each layer's shared cost for one claim and overstates the cost of a full run several times. The
   projection scales the per-claim stage (``probes``) by the number of claims, the per-layer stages
   (``gradients``, ``steering``) by the number of layers with claims, and the clean passes by depth.

Timings depend on the machine and on what else runs on it: the output also prints the bare-forward rate (a full
pass with the unembedding at every position), so a reader can compare machines.

    python benchmarks/bench_verify.py                         # runs/hunt, every claim of layers 5, 15, 25
    python benchmarks/bench_verify.py --run runs/hunt --layers 4,14,24 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/hunt", help="a hunt run folder (its claims and held-out documents)")
    ap.add_argument("--layers", default="auto", help="layers whose claims are all verified for the time per claim "
                    "(comma-separated; auto: three at 1/6, 1/2, 5/6 of the depth; none: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probes", type=int, default=1200, help="interventions per engine round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--rows", default=None, help="also write the sampled claims' verification rows (Parquet) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from neuronhunter.causal.claims import hunt_claims
    from neuronhunter.causal.engine import AblationEngine, full_pass_effects
    from neuronhunter.causal.interventions import corpus_batches, load_concept_labeller
    from neuronhunter.causal.verification import (
        VerifyConfig,
        run_settings,
        verification_documents,
        verify_claims,
    )
    from neuronhunter.io import read_table
    from neuronhunter.models import load_model

    cfg = VerifyConfig()
    run = Path(args.run)
    if (run / "manifest.json").exists():
        settings = run_settings(run)
        claims = hunt_claims(read_table(run / "neurons.parquet"), cfg.verdicts)
    else:
        print(f"no run at {run}: held-out side of the master text, no claims")
        settings = {"model": "smollm2-135m", "corpus": "master", "context_length": 128, "prepend_bos": True,
                    "lexicon": None, "labeller_options": {}, "split": {"side": "train", "heldout_fraction": 0.3,
                                                                      "seed": 0}}
        claims = []
    docs, verified_on, data = verification_documents(settings)
    model = load_model(settings["model"])
    labeller = load_concept_labeller(settings["lexicon"], **settings["labeller_options"])
    batches = corpus_batches(model, docs, context_length=settings["context_length"], max_tokens=cfg.max_tokens,
                             batch_size=16, prepend_bos=settings["prepend_bos"], labeller=labeller)
    engine = AblationEngine(model, batches, batch_tokens=cfg.batch_tokens)
    t = engine.tokens
    print(f"model {model.name}, {verified_on}: {data['documents']} documents, {len(t):,} verification tokens, "
          f"{t.n_windows} windows; {torch.get_num_threads()} threads")

    rng = np.random.default_rng(args.seed)
    windows = slice(0, min(8, t.n_windows))
    n_fwd = int(t.mask[windows].sum())
    layers = [model.n_layers // 6, model.n_layers // 2, model.n_layers - 2]
    per_token = max(1, args.probes // (1 + cfg.n_nulls))
    results: dict[str, list[float]] = {"forward": [], **{f"engine L{L}": [] for L in layers}}
    prefix = {}
    for r in range(args.rounds):
        t0 = time.perf_counter()
        model.forward(t.ids[windows], t.mask[windows])
        results["forward"].append(n_fwd / (time.perf_counter() - t0))
        for L in layers:
            st = engine.layer(L)
            tok = np.repeat(rng.choice(len(t), size=per_token, replace=False), 1 + cfg.n_nulls)
            unit = rng.integers(0, model.d_mlp, len(tok))
            t0 = time.perf_counter()
            engine.run(L, tok, unit, st.means.numpy()[unit])
            results[f"engine L{L}"].append((time.perf_counter() - t0) / len(tok))
            prefix[L] = float(np.mean(t.pos[tok] + 1))
        print(f"round {r + 1}: forward {results['forward'][-1]:.0f} tok/s; engine "
              + ", ".join(f"L{L} {1000 * results[f'engine L{L}'][-1]:.1f} ms" for L in layers) + " per intervention")
    fwd = statistics.median(results["forward"])
    out: dict[str, object] = {"bare_forward_tok_s": fwd, "verification_tokens": len(t)}
    print(f"\nbare forward: {fwd:.0f} tokens/s (median of {args.rounds} rounds)")
    for L in layers:
        eng = statistics.median(results[f"engine L{L}"])
        naive = prefix[L] / fwd
        print(f"layer {L:2d}: engine {1000 * eng:.1f} ms per intervention; one full pass of the window prefix "
              f"(mean {prefix[L]:.0f} tokens) {1000 * naive:.0f} ms; speed-up over full passes {naive / eng:.0f}x")
        out[f"layer_{L}"] = {"engine_ms": 1000 * eng, "full_pass_ms": 1000 * naive, "speedup": naive / eng}
    L = layers[1]
    st = engine.layer(L)
    tok = rng.choice(len(t), size=4, replace=False)
    unit = rng.integers(0, model.d_mlp, 4)
    t0 = time.perf_counter()
    ref = full_pass_effects(model, t, L, tok, unit, st.means.numpy()[unit])
    direct = (time.perf_counter() - t0) / 4
    got = engine.run(L, tok, unit, st.means.numpy()[unit])
    print(f"check at layer {L}: 4 interventions by plain full passes {1000 * direct:.0f} ms each; "
          f"max |loss difference| to the engine {np.abs(ref - got).max():.2e}")

    if args.layers == "auto":
        sample_layers = sorted({int(model.n_layers * f) for f in (1 / 6, 1 / 2, 5 / 6)})
    else:
        sample_layers = [] if args.layers == "none" else [int(x) for x in args.layers.split(",")]
    picked = [c for c in claims if c.layer in sample_layers]
    if picked:
        words = {name: list(spec.words) for name, spec in labeller.lexicon.categories.items()}
        t0 = time.perf_counter()
        df, summary = verify_claims(model, batches, picked, labeller.categories, cfg, lexicon_words=words)
        total = time.perf_counter() - t0
        stages = summary["seconds_by_stage"]
        claim_layers = len({c.layer for c in claims})
        per_layer = stages.get("gradients", 0.0) + stages.get("steering", 0.0)
        projected = (stages.get("clean", 0.0)
                     + stages.get("layers", 0.0) * (model.n_layers - 1) / max(1, max(sample_layers))
                     + per_layer * claim_layers / len(sample_layers)
                     + stages.get("probes", 0.0) * len(claims) / len(picked))
        nulls = df.n_nulls[df.p_value.notna()]
        print(f"\nall {len(picked)} claims of layers {', '.join(map(str, sample_layers))} ({len(claims)} claims "
              f"in {claim_layers} layers): {total:.0f} s, {total / len(picked):.2f} s per claim; stages "
              f"{json.dumps(stages)}")
        print(f"null neurons per tested claim: median {nulls.median():.0f}, {int((nulls < cfg.n_nulls).sum())} of "
              f"{len(nulls)} stopped early (at {', '.join(map(str, cfg.null_looks))} nulls), "
              f"{int((nulls > cfg.n_nulls).sum())} extended past {cfg.n_nulls}")
        print(f"projected for all {len(claims)} claims: {projected / 60:.0f} min on this machine now (goal: 45 min; "
              "the projection assumes the sampled layers' cost per claim is typical)")
        print(f"confirmed in the sample: {int(df.causally_confirmed.sum())} of {int(df.p_value.notna().sum())} "
              f"tested (q-values over the sample only)")
        if args.rows:
            df.to_parquet(args.rows, index=False)
        out.update(sample_layers=sample_layers, sample_claims=len(picked), sample_seconds=total,
                   seconds_per_claim=total / len(picked), projected_minutes=projected / 60,
                   stages=stages)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
