"""Scan throughput and memory against a bare forward pass.

In one process, on the same pre-tokenised batches, it times (a) a bare forward pass of the model through its last
scanned layer and (b) the full scan with every statistic (which ends its pass once the last scanned layer's neurons
are read, skipping that layer's down-projection) (moments, histogram, top-k windows, position stats, and
concept stats with ``--concepts``), alternating the two for several rounds; the ratio is the median of the
per-round ratios (each scan round against the forward round just before it), so a busy spell slows both sides of
a pair alike. Then it measures memory (RSS) of scans over 1x and 4x the tokens (the bundled corpus repeated as
often as needed) in fresh subprocesses: the whole process's peak, the scan's own peak after a one-batch warm-up
(model loaded, kernel compiled; Linux) and the memory held at the end (after ``malloc_trim``). The last line is
``scan/forward ratio: X.XX``.

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


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def held_mb() -> float | None:
    """RSS once glibc has returned its free pages to the system (``malloc_trim``): the memory actually held,
    without the allocator's slack, which varies from run to run by ~10%."""
    from neuronhunter.scan import release_free_memory

    return _status_mb("VmRSS") if release_free_memory() else None


def repeated_corpus(tokens: int, folder: str) -> str:
    """A JSONL corpus of the bundled documents, repeated until it holds well over ``tokens`` tokens."""
    from neuronhunter.data import Corpus

    docs = [d.text for d in Corpus(None)]
    words = sum(len(t.split()) for t in docs)
    copies = max(1, -(-2 * tokens // max(words, 1)))  # a word is at least one token: twice the words is ample
    path = f"{folder}/corpus.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(copies):
            for text in docs:
                fh.write(json.dumps({"text": text}) + "\n")
    return path


def child(args: argparse.Namespace) -> None:
    """Load the model, warm up, then scan ``--child-tokens`` tokens and print as JSON the process's peak RSS, the
    peak of the scan itself (the peak reset after the warm-up) and the memory held at the end (the scan state still
    alive).

    The warm-up reads every weight once (the loaded weights are memory-mapped, so each embedding row would
    otherwise become resident only when its token first appears: ~65 MB over the first ~30k tokens of the bundled
    corpus, bounded by the vocabulary, not the corpus) and scans a batch and a half (allocator, both compiled
    kernels: full batches and the shape-generic one of a last, partial batch)."""
    import tempfile

    from neuronhunter.config import ScanConfig
    from neuronhunter.models import load_model
    from neuronhunter.scan import Scanner

    with tempfile.TemporaryDirectory() as tmp:
        corpus = repeated_corpus(args.child_tokens, tmp)
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        labeller = None
        if args.concepts:
            from neuronhunter.data.concepts import ConceptLabeller

            labeller = ConceptLabeller()

        def scan(tokens: int):
            cfg = ScanConfig(model=args.model, corpus=corpus, max_tokens=tokens, context_length=args.context_length,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                             compile_stats=args.compile, concepts="default" if args.concepts else None)
            return Scanner(model, cfg, labeller).run()

        with torch.no_grad():
            for p in model.model.parameters():
                p.sum()
        scan(args.batch_size * args.context_length * 3 // 2)
        warm = _status_mb("VmRSS")
        reset = reset_peak()
        state = scan(args.child_tokens)
        scan_peak = _status_mb("VmHWM") if reset else None
        print(json.dumps({"tokens": state.tokens, "peak_rss_mb": peak_rss_mb(), "after_warmup_mb": warm,
                          "scan_peak_mb": scan_peak, "held_mb": held_mb(), "stored_windows": len(state.windows)}))


def make_batches(model, args):
    from neuronhunter.data import Corpus, iter_batches, iter_windows

    wins = iter_windows(Corpus(None), model.tokenizer, context_length=args.context_length,
                        bos_token_id=model.bos_token_id, max_tokens=args.tokens)
    return [b for b, _ in iter_batches(wins, batch_size=args.batch_size, pad_token_id=model.tokenizer.pad_token_id,
                                       has_bos=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=8192, help="corpus tokens per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concepts", action="store_true", help="also accumulate concept statistics (default lexicon)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the statistics eagerly instead of the torch.compile-fused reduction")
    p.add_argument("--memory-tokens", type=int, default=8192, help="tokens of the 1x memory run (4x is also run)")
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
    from neuronhunter.stats.native import used_by_scan

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    labeller = ConceptLabeller() if args.concepts else None
    cfg = ScanConfig(model=args.model, context_length=args.context_length, batch_size=args.batch_size,
                     max_tokens=args.tokens, device=args.device, dtype=args.dtype, compile_stats=args.compile)
    scanner = Scanner(model, cfg, labeller)
    batches = make_batches(model, args)
    n_tokens = sum(b.n_tokens for b in batches)
    stop = max(scanner.layers) + 1
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def bare(batch) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.forward(batch.input_ids, batch.attention_mask, stop_at_layer=stop)
        sync()
        return time.perf_counter() - t

    def scan_round() -> tuple[float, float]:
        """One scan of the tokens, batch by batch, each scan step paired with a bare forward pass of the same
        batch (in alternating order); returns the total seconds of both."""
        steps = scanner.steps(scanner.new_state())
        t_fwd = t_scan = 0.0
        for i in range(len(batches) + 1):  # the last step ends the iteration (final pruning)
            if i < len(batches) and i % 2:
                t_fwd += bare(batches[i])
            sync()
            t = time.perf_counter()
            state = next(steps, None)  # tokenisation + forward + every statistic
            sync()
            t_scan += time.perf_counter() - t
            if i < len(batches) and not i % 2:
                t_fwd += bare(batches[i])
            if state is not None and i < len(batches):
                assert state.batches_done == i + 1
        return t_fwd, t_scan

    scan_round()  # warm-up (and the one-off compilation of the fused statistics)
    fwd, full = [], []
    for _ in range(args.rounds):
        a, b = scan_round()
        fwd.append(a)
        full.append(b)
    pairs = [a / b for a, b in zip(fwd, full, strict=True)]
    f, s = n_tokens * args.rounds / sum(fwd), n_tokens * args.rounds / sum(full)
    print(f"model: {args.model} ({model.adapter.family}), layers {min(scanner.layers)}..{max(scanner.layers)}, "
          f"{len(scanner.layers) * scanner.n_neurons:,} neurons, device {model.device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, statistics {'torch.compile' if compile_enabled(args.compile) else 'eager'}"
          f", histograms {'native' if used_by_scan(args.compile, model.device) else 'bincount'}")
    print(f"tokens per round: {n_tokens:,} (BOS included) in {len(batches)} batches of {args.batch_size}x"
          f"{args.context_length}; {args.rounds} rounds, each scan step paired with a bare forward of its batch")
    print(f"bare forward through layer {stop - 1}: {f:,.0f} tok/s   (rounds: "
          f"{', '.join(f'{n_tokens / x:.0f}' for x in fwd)})")
    print(f"full scan, all statistics{' + concepts' if args.concepts else ''}: {s:,.0f} tok/s   "
          f"(rounds: {', '.join(f'{n_tokens / x:.0f}' for x in full)})")
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
        print(f"peak RSS, whole process (load, compile, scan): 1x ({a['tokens']:,} tokens) {a['peak_rss_mb']:.0f} MB; "
              f"4x ({b['tokens']:,} tokens) {b['peak_rss_mb']:.0f} MB; 4x/1x = {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}")
        if a["scan_peak_mb"] and b["scan_peak_mb"]:
            print(f"peak RSS of the scan after the warm-up: 1x {a['scan_peak_mb']:.0f} MB; "
                  f"4x {b['scan_peak_mb']:.0f} MB; 4x/1x = {b['scan_peak_mb'] / a['scan_peak_mb']:.3f}")
        if a["held_mb"] and b["held_mb"]:
            print(f"held at the end (RSS after malloc_trim, scan state alive): 1x {a['held_mb']:.0f} MB; "
                  f"4x {b['held_mb']:.0f} MB; 4x/1x = {b['held_mb'] / a['held_mb']:.3f}")
    print(f"per-round ratios: {', '.join(f'{r:.3f}' for r in pairs)} (range {min(pairs):.3f}-{max(pairs):.3f}, "
          f"median {statistics.median(pairs):.3f})")
    print(f"scan/forward ratio: {sum(fwd) / sum(full):.2f}")


if __name__ == "__main__":
    main()
