"""The Ray scan against the single-process scan, on the same corpus and model.

A short scan in a child process first compiles the statistics kernel into torch's on-disk cache, so that every
process timed here (this one, each Ray worker) finds it there. Then, in ``--rounds`` rounds (the order of the three
rotated from round to round, so that a busy spell of this shared machine does not always fall on the same one):

1. the single-process scan (``--engine local``): tokens/s over the scan itself;
2. the Ray scan with 1 worker and with 2 workers (``--engine ray``, a local Ray on this machine, ``--shards``
   shards): tokens/s over the shard phase (workers scanning), and end to end (starting the workers, which load the
   model, planning, calibrating, scanning, merging, writing; Ray's own start-up is timed apart);
3. from the shard records: the merge time (while shards run, and after the last one) and its share of the scan
   time, and Ray's overhead per shard (shard phase wall time minus the time the workers spent inside the scan loop,
   per shard: reading and skipping the corpus up to the shard, building and saving its state, scheduling).

Ratios are medians over the rounds of per-round ratios.

Each Ray run's tables are compared with the single-process run's (:func:`neuronhunter.distributed.compare_runs`);
they are bit-identical when each worker runs as many torch threads as the single-process scan (1 worker on this
machine), and may differ in the last float32 bit otherwise (2 workers x 1 thread vs 1 x 2; see docs/scale.md).

On one idle machine, one worker already uses every core (its torch threads), so 2 workers are not faster than 1
(speed-up 1.0 at best); on a busy shared machine more processes also take a bigger share of the CPU from the
others. On a cluster each worker brings its own cores or GPU.

    python benchmarks/bench_distributed.py                        # embedded model, all layers, python-stdlib
    python benchmarks/bench_distributed.py --tokens 65536 --shards 4 --layers 0-5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _ray_run(run_scan, ScanConfig, out: Path, workers: int, shards: int, kw: dict) -> dict:
    """One Ray scan; its rates, timings and shard records."""
    t = time.perf_counter()
    res = run_scan(ScanConfig(out=str(out), engine="ray", workers=workers, shards=shards, **kw), overwrite=True)
    wall = time.perf_counter() - t
    tm = res.timings
    recs = list(json.loads((out / "shards" / "index.json").read_text())["shards"].values())
    inner = sum(r["scan_s"] for r in recs)
    return dict(tokens=res.state.tokens, tps=res.state.tokens / tm["scan_s"], e2e=res.state.tokens / wall, wall=wall,
                overhead=(tm["scan_s"] * workers - inner) / len(recs), peak=max(r.get("peak_rss_mb", 0) for r in recs),
                **tm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="python-stdlib")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per scan")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (single process, Ray 1 worker, Ray 2 workers)")
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
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; {args.tokens:,} tokens a scan, {args.shards} shards, {args.rounds} rounds")
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             _system_config={"worker_niceness": 0})
    print(f"ray start: {time.perf_counter() - t:.1f} s")
    ratio1, ratio2, e2e1, local_rates = [], [], [], []
    rows: dict[int, list[dict]] = {1: [], 2: []}
    try:
        for r in range(args.rounds):
            order = ["local", 1, 2][r % 3:] + ["local", 1, 2][:r % 3]  # rotated: no engine always runs first
            rate: dict = {}
            for what in order:
                if what == "local":
                    one = run_scan(ScanConfig(out=str(out / "local"), **kw), model=model, overwrite=True)
                    rate["local"] = one.state.tokens / one.timings["scan_s"]
                    rate["local_e2e"] = one.state.tokens / (one.timings["scan_s"] + one.timings.get("write_s", 0))
                    continue
                row = _ray_run(run_scan, ScanConfig, out / f"ray{what}", what, args.shards, kw)
                rows[what].append(row)
                rate[what] = row["tps"]
            local_rates.append(rate["local"])
            ratio1.append(rate[1] / rate["local"])
            ratio2.append(rate[2] / rate[1])
            e2e1.append(rows[1][-1]["e2e"] / rate["local_e2e"])
            print(f"round {r + 1} ({' '.join(map(str, order))}; load {os.getloadavg()[0]:.1f}): single process "
                  f"{rate['local']:.0f} tok/s, Ray 1 worker {rate[1]:.0f}, Ray 2 workers {rate[2]:.0f} tok/s "
                  f"(shard phase)")
        diffs = {w: compare_runs(out / "local", out / f"ray{w}") for w in (1, 2)}
    finally:
        ray.shutdown()
    med = statistics.median
    for w in (1, 2):
        last = rows[w][-1]
        print(f"ray, {w} worker{'s' if w > 1 else ''} (last round): workers up {last['load_s']:.1f} s, plan+calibration "
              f"{last['plan_s']:.1f} s, shard phase {last['scan_s']:.1f} s, merge during it "
              f"{last['merge_during_scan_s']:.1f} s and after it {last['merge_s']:.1f} s, write {last['write_s']:.1f} s; "
              f"worker peak RSS {last['peak']:.0f} MB; tables vs single process: "
              f"{'identical' if not diffs[w] else 'differ: ' + ', '.join(diffs[w])}")
    r1 = rows[1]
    print(f"single process: {med(local_rates):.0f} tok/s (median of {args.rounds})")
    print(f"ray 1 worker / single process (shard phase): {med(ratio1):.2f} (rounds {min(ratio1):.2f}-{max(ratio1):.2f}; "
          f"goal >= 0.90)")
    print(f"ray 1 worker / single process (end to end: workers up, plan, scan, merge, write; Ray's start apart): "
          f"{med(e2e1):.2f}")
    print(f"speed-up 2 workers / 1 worker (shard phase): {med(ratio2):.2f} (one idle machine: 1.0 at best)")
    merge_after = med([x["merge_s"] / x["scan_s"] for x in r1])
    merge_all = med([(x["merge_s"] + x["merge_during_scan_s"]) / x["scan_s"] for x in r1])
    print(f"merge / scan time (1 worker): {merge_after:.3f} after the last shard (goal <= 0.05); {merge_all:.3f} "
          f"counting the merging done while shards ran; {med([x['merge_during_scan_s'] + x['merge_s'] for x in r1]) / args.shards:.2f} s a shard")
    print(f"ray overhead per shard (1 worker): {med([x['overhead'] for x in r1]):.2f} s")
    if args.out is None:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
