"""The Ray scan against the single-process scan, on the same corpus and model, each run as a user runs it.

Every scan here is a fresh ``neuronhunter scan`` process (``--engine local``, then ``--engine ray`` with 1 and with
2 workers, a local Ray started by the command itself), so each pays what a user's command pays: loading the model,
warming up the compiled statistics kernel (a short scan in a child process first puts it in torch's on-disk cache,
as any earlier scan on the machine would), the calibration pass. The order of the three is rotated from round to
round so that a busy spell of this shared machine does not always fall on the same one. Per run, from its
``manifest.json`` (and, for Ray, ``shards/index.json``):

* **scan time** -- the same span for both engines: from the first corpus read to the merged statistics, model
  loading and table writing excluded. Single process: ``timings.scan_s`` (calibration + the scan loop). Ray:
  ``plan_s`` (tokenising the corpus to cut it into shards, calibration) + the shard phase (``scan_s``: the first
  shard's start to the last one's end) + ``merge_s`` (merging left after the last shard). Tokens / scan time is
  each engine's rate, and Ray 1 worker / single process the ratio the goal is about (>= 0.90);
* the shard phase alone (the workers' throughput) and the whole command's wall clock (Ray's start included);
* Ray's own time inside each Ray run (planning without the calibration, the gaps around the workers' scan loops,
  merging after the last shard) as a share of the work one process would do (calibration + the same loops): an
  estimate of the ratio that the noise between runs of a shared machine does not touch;
* from the shard records: the merge time (while shards run, and after the last one) and its share of the scan time
  (goal <= 5%), and Ray's overhead per shard (shard-phase wall time minus the time the workers spent inside the
  scan loop, per shard: reading the corpus up to the shard, building and saving its state, scheduling, and the
  cycles the driver's merging takes from a worker on the same cores).

Ratios are medians over the rounds of per-round ratios. Each Ray run's tables are compared with the
single-process run's (:func:`neuronhunter.distributed.compare_runs`): bit-identical when each worker runs as many
torch threads as the single-process scan (1 worker on this machine), within the last float32 bit otherwise (2
workers x 1 thread vs 1 x 2; see docs/scale.md).

On one machine, one worker already uses every core (its torch threads), so 2 workers can only gain by running two
single-threaded processes instead of one two-threaded one; on a cluster each worker brings its own cores or GPU.

    python benchmarks/bench_distributed.py                        # embedded model, all layers, python-stdlib
    python benchmarks/bench_distributed.py --tokens 32768 --shards 2 --layers 0-5 --rounds 1
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


def _scan(common: list[str], out: Path, engine: str, workers: int = 0, shards: int = 0) -> dict:
    """One ``neuronhunter scan`` process; its timings (manifest), wall clock and, for Ray, its shard records."""
    cmd = [*common, "--out", str(out), "--overwrite", "--engine", engine]
    if engine == "ray":
        cmd += ["--workers", str(workers), "--shards", str(shards)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    tm = manifest["timings"]
    tokens = int(manifest["tokens"])
    row = dict(tokens=tokens, wall=wall, **tm)
    if engine == "local":
        row["scan_time"] = tm["scan_s"]
        return row
    recs = list(json.loads((out / "shards" / "index.json").read_text())["shards"].values())
    row["scan_time"] = tm["plan_s"] + tm["scan_s"] + tm["merge_s"]
    inner = sum(r["scan_s"] for r in recs)
    row["overhead"] = (tm["scan_s"] * workers - inner) / len(recs)
    # Ray's own cost inside this run (plan without calibration, time between and around the workers' scan loops,
    # merge after the last shard), over what one process would spend on the same work (calibration + the loops)
    own = tm["plan_s"] - tm.get("calibrate_s", 0.0) + tm["scan_s"] - inner / workers + tm["merge_s"]
    row["own_share"] = own / (tm.get("calibrate_s", 0.0) + inner / workers)
    row["peak"] = max(r.get("peak_rss_mb", 0) for r in recs)
    row["shards"] = len(recs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="python-stdlib")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per scan")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (single process, Ray 1 worker, Ray 2 workers)")
    p.add_argument("--layers", default=None, help="e.g. '0-5' [default: all]")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="folder for the runs [default: a temporary folder]")
    args = p.parse_args()

    import torch

    from neuronhunter.distributed import compare_runs

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-distributed-"))
    base = [sys.executable, "-m", "neuronhunter", "scan", "--model", args.model, "--corpus", args.corpus,
            "--context-length", str(args.context_length), "--batch-size", str(args.batch_size), "--formats", "parquet"]
    base += ["--layers", args.layers] if args.layers else []
    warm = [*base, "--out", str(out / "warm-up"), "--overwrite", "--max-tokens",
            str(2 * args.batch_size * args.context_length)]
    subprocess.run(warm, check=True, capture_output=True)
    common = [*base, "--max-tokens", str(args.tokens)]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; {args.tokens:,} tokens a scan, {args.shards} shards, {args.rounds} rounds; "
          "every scan a fresh `neuronhunter scan` process")
    rows: dict[object, list[dict]] = {"local": [], 1: [], 2: []}
    for r in range(args.rounds):
        order = ["local", 1, 2][r % 3:] + ["local", 1, 2][:r % 3]  # rotated: no engine always runs first
        for what in order:
            if what == "local":
                rows["local"].append(_scan(common, out / "local", "local"))
            else:
                rows[what].append(_scan(common, out / f"ray{what}", "ray", what, args.shards))  # type: ignore[arg-type]
        one, r1, r2 = rows["local"][-1], rows[1][-1], rows[2][-1]
        print(f"round {r + 1} ({' '.join(map(str, order))}; load {os.getloadavg()[0]:.1f}): tokens / scan time: "
              f"single process {one['tokens'] / one['scan_time']:.0f} tok/s, Ray 1 worker "
              f"{r1['tokens'] / r1['scan_time']:.0f}, Ray 2 workers {r2['tokens'] / r2['scan_time']:.0f} "
              f"(shard phase {r1['tokens'] / r1['scan_s']:.0f} and {r2['tokens'] / r2['scan_s']:.0f}; whole "
              f"commands {one['wall']:.0f} s, {r1['wall']:.0f} s, {r2['wall']:.0f} s)")
    diffs = {w: compare_runs(out / "local", out / f"ray{w}") for w in (1, 2)}
    med = statistics.median

    def ratio(a: object, b: object, key: str = "scan_time") -> list[float]:
        return [(x["tokens"] / x[key]) / (y["tokens"] / y[key]) for x, y in zip(rows[a], rows[b], strict=True)]

    for w in (1, 2):
        last = rows[w][-1]
        print(f"ray, {w} worker{'s' if w > 1 else ''} (last round): workers up {last['load_s']:.1f} s, plan+calibration "
              f"{last['plan_s']:.1f} s, shard phase {last['scan_s']:.1f} s, merge during it "
              f"{last['merge_during_scan_s']:.1f} s and after it {last['merge_s']:.1f} s, write {last['write_s']:.1f} s; "
              f"worker peak RSS {last['peak']:.0f} MB; tables vs single process: "
              f"{'identical' if not diffs[w] else 'differ: ' + ', '.join(diffs[w])}")
    local = [x["tokens"] / x["scan_time"] for x in rows["local"]]
    print(f"single process: {med(local):.0f} tok/s (median of {args.rounds}; calibration + scan loop)")
    q = ratio(1, "local")
    print(f"ray 1 worker / single process (scan time: plan, calibration, shards, merge): {med(q):.2f} "
          f"(rounds {min(q):.2f}-{max(q):.2f}; goal >= 0.90)")
    print(f"ray 1 worker / single process, shard phase only: {med(ratio(1, 'local', 'scan_s')):.2f}; whole commands "
          f"(Ray's start, model loading, writing): {med(ratio(1, 'local', 'wall')):.2f}")
    print(f"scaling 2 workers / 1 worker (scan time): {med(ratio(2, 1)):.2f} (one 2-core machine)")
    r1 = rows[1]
    merge_after = med([x["merge_s"] / x["scan_time"] for x in r1])
    merge_all = med([(x["merge_s"] + x["merge_during_scan_s"]) / x["scan_time"] for x in r1])
    print(f"merge / scan time (1 worker): {merge_after:.3f} after the last shard (goal <= 0.05); {merge_all:.3f} "
          f"counting the merging done while shards ran; "
          f"{med([x['merge_during_scan_s'] + x['merge_s'] for x in r1]) / args.shards:.2f} s a shard")
    print(f"ray overhead per shard (1 worker): {med([x['overhead'] for x in r1]):.2f} s")
    own = med([x["own_share"] for x in r1])
    print(f"ray's own time inside the 1-worker runs (plan without calibration, gaps around the workers' scan loops, "
          f"merge after the last shard): {100 * own:.1f}% of the work -> {1 / (1 + own):.2f} of the single process "
          "if the workers' scan loops ran as fast as its loop (the same machine within one run: no round-to-round "
          "noise; not counted: the cycles Ray's daemons and the driver's merging take from the loops)")
    if args.out is None:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
