"""Cost of the explanation held-out pass against a bare forward pass over the same held-out text.

It derives every candidate explanation of every neuron of a run (default ``runs/hunt``; without one it first hunts
the train side of the bundled master text into a temporary folder), then, in one process and alternating for
several rounds, times (a) a bare forward pass of the model through the run's last layer over the held-out batches
(pre-tokenised) and (b) the held-out pass that scores every rule-based candidate (tokenisation, labelling, batch
features and the per-layer sufficient statistics included: :class:`~neuronhunter.judge.explain.heldout.HeldoutScanner`).
The ratio is total (b) time over total (a) time (the issue's target is at most 2); the fixed costs that do not
grow with the held-out text (deriving the candidates, building each layer's index of neuron-feature pairs,
turning the sums into scores) are printed apart. The last line is
``explain/forward ratio: X.XX``.

    python benchmarks/bench_explain.py                       # runs/hunt (or a fresh train-side hunt), 3 rounds
    python benchmarks/bench_explain.py --run runs/hunt --rounds 5 --max-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def ensure_run(path: str | None) -> Path:
    if path and (Path(path) / "manifest.json").exists():
        return Path(path)
    from neuronhunter.hunt import HuntConfig, run_hunt

    out = Path(tempfile.mkdtemp(prefix="bench-explain-")) / "hunt"
    print(f"no run at {path}: hunting the train side of the master text into {out} ...", flush=True)
    run_hunt(HuntConfig(split="train", out=str(out)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/hunt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=None, help="held-out tokens per round [default: all]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from neuronhunter.data.batches import iter_batches
    from neuronhunter.data.concepts import ConceptLabeller
    from neuronhunter.io import read_json
    from neuronhunter.judge.explain.candidates import CandidateSettings, derive_candidates
    from neuronhunter.judge.explain.features import Vocabulary
    from neuronhunter.judge.explain.heldout import HeldoutScanner, run_heldout
    from neuronhunter.judge.explain.pipeline import (
        ExplainConfig,
        explanation_table,
        run_lexicon,
        scan_config,
        scoring_side,
        train_domains,
    )
    from neuronhunter.models.loading import load_model
    from neuronhunter.stats.state import load_state

    run = ensure_run(args.run)
    manifest, config = read_json(run / "manifest.json"), read_json(run / "config.json")
    cfg = ExplainConfig(max_tokens=args.max_tokens, batch_size=args.batch_size)
    side = scoring_side(manifest, config, cfg)
    scfg = scan_config(config, manifest, side, cfg)
    model = load_model(config.get("model") or "smollm2-135m")
    t = time.perf_counter()
    state = load_state(run / "stats.pt")[0]
    vocab = Vocabulary(model.tokenizer)
    domains, domain_of = train_domains(config, side)
    categories = list(manifest.get("categories") or [])
    cands = derive_candidates(state, vocab, categories=categories, domains=domains, domain_of=domain_of,
                              include_first=bool(manifest.get("include_first")), bos=bool(manifest.get("prepend_bos")),
                              settings=CandidateSettings())
    derive_s = time.perf_counter() - t
    del state
    labeller = ConceptLabeller(run_lexicon(run, config)) if categories else None
    n_neurons = sum(len(set(lc.neuron.tolist())) for lc in cands.layers.values())
    n_pairs = sum(len(lc.pairs) for lc in cands.layers.values())

    def scanner() -> HeldoutScanner:
        return HeldoutScanner(model, scfg, labeller, cands, vocab, domains=cands.space.domains, fold_seed=0)

    probe = scanner()
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batches = [b for b, _ in iter_batches(probe.windows(), batch_size=scfg.batch_size, pad_token_id=pad,
                                          has_bos=probe.bos is not None)]
    stop = max(probe.layers) + 1
    tokens = sum(int(b.attention_mask.sum()) for b in batches)

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model.forward(b.input_ids, b.attention_mask, stop_at_layer=stop)
        return time.perf_counter() - t0

    t = time.perf_counter()
    sc = scanner()
    est = sc.new_explain_state()  # index structures of every layer's pairs: a fixed cost, timed apart
    setup_s = time.perf_counter() - t

    def scored() -> float:
        est.batches_done = 0  # the same state each round (its sums grow; the work per round is the same)
        t0 = time.perf_counter()
        run_heldout(sc, state=est)
        return time.perf_counter() - t0

    bare()  # warm-up
    fwd, sco = [], []
    for r in range(args.rounds):
        order = (bare, scored) if r % 2 == 0 else (scored, bare)
        times = {f.__name__: f() for f in order}
        fwd.append(times["bare"])
        sco.append(times["scored"])
    t = time.perf_counter()
    table = explanation_table(cands, est, vocab, "bench")
    table_s = time.perf_counter() - t
    ratios = [s / f for s, f in zip(sco, fwd, strict=True)]
    print(json.dumps({"run": str(run), "scored_on": side["corpus"], "side": side["side"]}))
    print(f"model: {model.name}, layers {min(probe.layers)}..{max(probe.layers)}, {n_neurons:,} neurons, "
          f"{len(table):,} candidate explanations ({n_pairs:,} neuron-feature pairs), threads {torch.get_num_threads()}")
    print(f"held-out: {tokens:,} tokens (BOS included) in {len(batches)} batches of {scfg.batch_size}x"
          f"{scfg.context_length}; {args.rounds} rounds, alternating")
    print(f"fixed costs (once per run, not in the ratio): candidates from the run's train statistics {derive_s:.1f} s, "
          f"pair index structures {setup_s:.1f} s, scores from the sums {table_s:.1f} s")
    print(f"bare forward: {tokens / statistics.mean(fwd):.0f} tok/s  (rounds: "
          + ", ".join(f"{tokens / x:.0f}" for x in fwd) + ")")
    print(f"held-out scoring pass: {tokens / statistics.mean(sco):.0f} tok/s  (rounds: "
          + ", ".join(f"{tokens / x:.0f}" for x in sco) + ")")
    print("per-round ratios: " + ", ".join(f"{x:.2f}" for x in ratios))
    print(f"explain/forward ratio: {sum(sco) / sum(fwd):.2f}")


if __name__ == "__main__":
    main()
