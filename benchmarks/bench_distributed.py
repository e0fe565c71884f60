"""The Ray scan against the single-process scan, on the same corpus and model.

A short scan in a child process first compiles the statistics kernel into torch's on-disk cache, so that every
process timed here (this one, each Ray worker) finds it there. Then it times, one after the other:

1. the single-process scan (``--engine local``): tokens/s over the scan itself;
2. the Ray scan with 1 worker, then with 2 workers (``--engine ray``, a local Ray on this machine, ``--shards``
   shards): tokens/s over the shard phase (workers scanning), and end to end (starting the workers, which load the
   model, planning, calibrating, scanning, merging, writing; Ray's own start-up is timed apart);
3. from the shard records: the merge time and its share of the scan time, and Ray's overhead per shard (shard
   phase wall time minus the time the workers spent inside the scan loop, per shard: reading and skipping the
   corpus up to the shard, building and saving its state, scheduling).

Each Ray run's tables are compared with the single-process run's (:func:`neuronhunter.distributed.compare_runs`);
they are bit-identical when each worker runs as many torch threads as the single-process scan (1 worker on this
machine), and may differ in the last float32 bit otherwise (2 workers x 1 thread vs 1 x 2; see docs/scale.md).

On one machine, one worker already uses every core (its torch threads), so 2 workers cannot be faster than 1: the
"speed-up 2/1" line is 1.0 at best here; on a cluster each worker brings its own cores or GPU.

    python benchmarks/bench_distributed.py                        # embedded model, all layers, python-stdlib
    python benchmarks/bench_distributed.py --tokens 65536 --shards 4 --layers 0-5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="python-stdlib")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--layers", default=None, help="e.g. '0-5' [default: all]")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="folder for the runs [default: a temporary folder]")
    args = p.parse_args()

    import ray
    import torch

    from neuronhunter.cli.common import parse_int_list
    from neuronhunter.config import ScanConfig
    from neuronhunter.distributed import compare_runs
    from neuronhunter.models.loading import load_model
    from neuronhunter.scan import run_scan

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-distributed-"))
    kw = dict(model=args.model, corpus=args.corpus, max_tokens=args.tokens, layers=parse_int_list(args.layers, "--layers"),
              context_length=args.context_length, batch_size=args.batch_size, formats=["parquet"])
    warm = [sys.executable, "-m", "neuronhunter", "scan", "--model", args.model, "--corpus", args.corpus, "--out",
            str(out / "warm-up"), "--overwrite", "--max-tokens", str(2 * args.batch_size * args.context_length),
            "--context-length", str(args.context_length), "--batch-size", str(args.batch_size)]
    subprocess.run(warm + (["--layers", args.layers] if args.layers else []), check=True, capture_output=True)
    model = load_model(args.model)
    threads = torch.get_num_threads()
    print(f"machine: {os.cpu_count()} CPUs, torch {threads} threads, load average {os.getloadavg()[0]:.1f}")

    t = time.perf_counter()
    one = run_scan(ScanConfig(out=str(out / "local"), **kw), model=model, overwrite=True)
    local_wall = time.perf_counter() - t
    local_tps = one.state.tokens / one.timings["scan_s"]
    print(f"single process: {one.state.tokens:,} tokens, scan {one.timings['scan_s']:.1f} s = {local_tps:.0f} tok/s "
          f"(wall {local_wall:.1f} s)")
    del model  # the workers load their own copies

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             _system_config={"worker_niceness": 0})
    print(f"ray start: {time.perf_counter() - t:.1f} s")
    rows = {}
    try:
        for workers in (1, 2):
            t = time.perf_counter()
            res = run_scan(ScanConfig(out=str(out / f"ray{workers}"), engine="ray", workers=workers, shards=args.shards,
                                      **kw), overwrite=True)
            wall = time.perf_counter() - t
            tm = res.timings
            index = json.loads((out / f"ray{workers}" / "shards" / "index.json").read_text())
            recs = list(index["shards"].values())
            inner = sum(r["scan_s"] for r in recs)
            overhead = (tm["scan_s"] * workers - inner) / len(recs)
            diffs = compare_runs(out / "local", out / f"ray{workers}")
            rows[workers] = dict(tps=res.state.tokens / tm["scan_s"], e2e=res.state.tokens / wall, wall=wall, **tm,
                                 overhead=overhead, diffs=diffs, peak=max(r.get("peak_rss_mb", 0) for r in recs))
            print(f"ray, {workers} worker{'s' if workers > 1 else ''}: shard phase {tm['scan_s']:.1f} s = "
                  f"{rows[workers]['tps']:.0f} tok/s; end to end {wall:.1f} s = {rows[workers]['e2e']:.0f} tok/s "
                  f"(workers up {tm['load_s']:.1f} s, plan+calibration {tm['plan_s']:.1f} s, merge {tm['merge_s']:.1f} s, "
                  f"write {tm['write_s']:.1f} s); overhead per shard {overhead:.2f} s; worker peak RSS "
                  f"{rows[workers]['peak']:.0f} MB; tables {'identical' if not diffs else 'differ: ' + ', '.join(diffs)}")
    finally:
        ray.shutdown()
    r1, r2 = rows[1], rows[2]
    print(f"ray 1 worker / single process (shard phase): {r1['tps'] / local_tps:.2f}  (goal >= 0.90)")
    print(f"ray 1 worker / single process (end to end, without Ray's start): {r1['e2e'] / (one.state.tokens / local_wall):.2f}")
    print(f"speed-up 2 workers / 1 worker (shard phase): {r2['tps'] / r1['tps']:.2f}  (one machine: 1.0 at best; "
          f"scaling efficiency {r2['tps'] / (2 * r1['tps']):.2f} of 2x)")
    print(f"merge / scan time (1 worker, {args.shards} shards): {r1['merge_s'] / r1['scan_s']:.3f}  (goal <= 0.05); "
          f"merge per shard {r1['merge_s'] / args.shards:.2f} s")
    print(f"ray overhead per shard (1 worker): {r1['overhead']:.2f} s")
    if args.out is None:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
