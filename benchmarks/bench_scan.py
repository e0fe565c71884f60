"""Scan throughput and memory against a bare forward pass.

In one process, on the same pre-tokenised batches, it times (a) a bare forward pass of the model through its last
scanned layer and (b) the full scan with every statistic (which ends its pass once the last scanned layer's neurons
are read, skipping that layer's down-projection) (moments, histogram, top-k windows, position stats, and
concept stats with ``--concepts``), alternating the two for several rounds and taking the median of each, so a
busy machine slows both alike. Then it measures peak memory (RSS) of complete scans over 1x and 4x the tokens in
fresh subprocesses. The last line is ``scan/forward ratio: X.XX``.

    python benchmarks/bench_scan.py                      # embedded model, all 30 layers, CPU
    python benchmarks/bench_scan.py --device cuda --dtype bfloat16 --tokens 65536
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """Run one complete scan (no output files) and print its peak RSS as JSON."""
    from neuronhunter.config import ScanConfig
    from neuronhunter.scan import run_scan

    cfg = ScanConfig(model=args.model, max_tokens=args.child_tokens, context_length=args.context_length,
                     batch_size=args.batch_size, device=args.device, dtype=args.dtype, compile_stats=args.compile,
                     concepts="default" if args.concepts else None)
    before = peak_rss_mb()
    result = run_scan(cfg, write=False)
    print(json.dumps({"tokens": result.state.tokens, "peak_rss_mb": peak_rss_mb(), "after_load_mb": before,
                      "stored_windows": len(result.state.windows)}))


def make_batches(model, args):
    from neuronhunter.data import Corpus, iter_batches, iter_windows

    wins = iter_windows(Corpus(None), model.tokenizer, context_length=args.context_length,
                        bos_token_id=model.bos_token_id, max_tokens=args.tokens)
    return [b for b, _ in iter_batches(wins, batch_size=args.batch_size, pad_token_id=model.tokenizer.pad_token_id,
                                       has_bos=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=4096, help="corpus tokens per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concepts", action="store_true", help="also accumulate concept statistics (default lexicon)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the statistics eagerly instead of the torch.compile-fused reduction")
    p.add_argument("--memory-tokens", type=int, default=4096, help="tokens of the 1x memory run (4x is also run)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_tokens:
        child(args)
        return

    from neuronhunter.config import ScanConfig
    from neuronhunter.data.concepts import ConceptLabeller
    from neuronhunter.models import load_model
    from neuronhunter.scan import Scanner
    from neuronhunter.stats.kernels import compile_enabled

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    labeller = ConceptLabeller() if args.concepts else None
    cfg = ScanConfig(model=args.model, context_length=args.context_length, batch_size=args.batch_size,
                     max_tokens=args.tokens, device=args.device, dtype=args.dtype, compile_stats=args.compile)
    scanner = Scanner(model, cfg, labeller)
    batches = make_batches(model, args)
    n_tokens = sum(b.n_tokens for b in batches)
    stop = max(scanner.layers) + 1
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def bare() -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model.forward(b.input_ids, b.attention_mask, stop_at_layer=stop)
        sync()
        return time.perf_counter() - t

    def scan() -> float:
        sync()
        t = time.perf_counter()
        scanner.run()  # tokenisation + forward + every statistic
        sync()
        return time.perf_counter() - t

    bare(), scan()  # warm-up (and the one-off compilation of the fused statistics)
    fwd, full = [], []
    for _ in range(args.rounds):
        fwd.append(n_tokens / bare())
        full.append(n_tokens / scan())
    f, s = statistics.median(fwd), statistics.median(full)
    print(f"model: {args.model} ({model.adapter.family}), layers {min(scanner.layers)}..{max(scanner.layers)}, "
          f"{len(scanner.layers) * scanner.n_neurons:,} neurons, device {model.device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, statistics {'torch.compile' if compile_enabled(args.compile) else 'eager'}")
    print(f"tokens per round: {n_tokens:,} (BOS included) in {len(batches)} batches of {args.batch_size}x"
          f"{args.context_length}; {args.rounds} rounds, medians")
    print(f"bare forward through layer {stop - 1}: {f:,.0f} tok/s   (rounds: {', '.join(f'{x:.0f}' for x in fwd)})")
    print(f"full scan, all statistics{' + concepts' if args.concepts else ''}: {s:,.0f} tok/s   "
          f"(rounds: {', '.join(f'{x:.0f}' for x in full)})")
    if not args.skip_memory:
        rows = []
        for mult in (1, 4):
            cmd = [sys.executable, __file__, "--child-tokens", str(args.memory_tokens * mult), "--model", args.model,
                   *(["--threads", str(args.threads)] if args.threads else []),
                   "--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
                   "--context-length", str(args.context_length)] + (["--concepts"] if args.concepts else []) \
                + ([] if args.compile else ["--no-compile"])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
        a, b = rows
        print(f"peak RSS 1x ({a['tokens']:,} tokens): {a['peak_rss_mb']:.0f} MB; 4x ({b['tokens']:,} tokens): "
              f"{b['peak_rss_mb']:.0f} MB; 4x/1x = {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}")
    print(f"scan/forward ratio: {s / f:.2f}")


if __name__ == "__main__":
    main()
