"""Latency and load of ``neuronhunter serve`` on a real run (default: runs/hunt, the 46,080-neuron hunt of the
embedded model that ``make demo`` writes).

The server runs in its own process (``neuronhunter serve RUN --port 0``, on 127.0.0.1 only), the clients here, so
they do not share an interpreter. Measured, after the server's start-up read of the tables:

* a neuron page (HTML) and the JSON API (a neuron, searches by token, verdict, category, text, layer and a deep
  sorted page) for random neurons: median, 95th percentile and maximum latency, once the server's background
  read of the tables after start (reported) is done;
* a live activation of a 200-token text (``POST /api/activations``) on a deep and a middle layer, after the
  model's first load (reported separately);
* a bounded load test: ``--clients`` threads with keep-alive connections sending a mix of page and API requests
  (plus a few live requests) until ``--load-requests`` are done or ``--load-seconds`` pass: throughput and errors
  (any non-2xx/3xx answer or failed connection counts; zero are expected).

Targets (issue 18): neuron page and API < 200 ms at p95, live 200 tokens < 1 s on CPU. The machine this project
runs on is shared by several workers: the load average is printed with the results.

    python benchmarks/bench_serve.py [RUN] [--requests 200] [--clients 8] [--load-requests 2000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

TEXT_WORDS = ("The red fox ran across the green field while a brown dog slept under the old oak tree . On Monday "
              "12 March the ferry left Lisbon for Porto with forty passengers and a cargo of bread , cheese and "
              "olives .").split()


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def summary(name: str, ms: list[float], target: float | None = None) -> str:
    p95 = percentile(ms, 0.95)
    verdict = "" if target is None else f"  (target < {target:g} ms: {'met' if p95 < target else 'MISSED'})"
    return (f"{name:<34} n={len(ms):<4} median {percentile(ms, 0.5):7.1f} ms   p95 {p95:7.1f} ms   "
            f"max {max(ms):7.1f} ms{verdict}")


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn = http.client.HTTPConnection(host, port, timeout=900)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes, float]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        t0 = time.perf_counter()
        try:
            self.conn.request(method, path, body=data, headers=headers)
            res = self.conn.getresponse()
            payload = res.read()
            status = res.status
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=900)
            return 0, b"", (time.perf_counter() - t0) * 1000
        return status, payload, (time.perf_counter() - t0) * 1000


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MB; 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def start_server(run: Path, python: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([python, "-m", "neuronhunter", "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"http://([\d.]+):(\d+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, m.group(1), int(m.group(2))
    proc.kill()
    raise SystemExit("the server did not start (is the serve extra installed?)")


def wait_warm(client: Client, timeout: float = 900) -> tuple[float, float]:
    """Seconds until the server answers, and until its background read of the tables is done."""
    t0 = time.perf_counter()
    first = None
    while time.perf_counter() - t0 < timeout:
        status, body, _ = client.call("GET", "/api/health")
        if status == 200:
            first = first if first is not None else time.perf_counter() - t0
            if json.loads(body).get("tables_read"):
                return first, time.perf_counter() - t0
        time.sleep(0.5)
    raise SystemExit("the server did not finish reading its tables in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="runs/hunt")
    ap.add_argument("--requests", type=int, default=200, help="requests per measured endpoint")
    ap.add_argument("--live", type=int, default=10, help="live requests per layer")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--load-requests", type=int, default=2000)
    ap.add_argument("--load-seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--screenshots", type=Path, default=None, help="also take PNG screenshots of the main pages "
                    "into this folder (docs/img), with Playwright and Debian's chromium")
    ap.add_argument("--screenshots-only", action="store_true", help="take the screenshots, measure nothing")
    ap.add_argument("--browse", type=Path, default=None, help="with --screenshots: a `browse` index.html to "
                    "screenshot too")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "neurons.parquet").exists():
        raise SystemExit(f"{run} is not a run folder (make demo writes runs/hunt)")
    import pandas as pd

    neurons = pd.read_parquet(run / "neurons.parquet", columns=["layer", "neuron"])
    pairs = list(zip(neurons["layer"].tolist(), neurons["neuron"].tolist(), strict=True))
    rng = random.Random(args.seed)
    name = quote(run.resolve().name)
    print(f"run: {run} ({len(pairs):,} neurons in {neurons['layer'].nunique()} layers); "
          f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    proc, host, port = start_server(run, sys.executable)
    try:
        client = Client(host, port)
        answers, read = wait_warm(client)
        print(f"server answering after {answers:.1f} s; its background read of the tables done after {read:.1f} s; "
              f"server RSS {rss_mb(proc.pid):,.0f} MB")
        if args.screenshots_only:
            take_screenshots(host, port, name, args)
            return
        tokens = [" red", " the", " cheese", " Paris", " 12", "ing", " blue", " and"]
        searches = [f"/api/neurons?run={name}&token={quote(t)}" for t in tokens] + [
            f"/api/neurons?run={name}&verdict=monosemantic&sort=dprime",
            f"/api/neurons?run={name}&category=color", f"/api/neurons?run={name}&q=colour",
            f"/api/neurons?run={name}&layer=20&page=5", f"/api/neurons?run={name}&sort=kurtosis&order=asc&page=300"]

        def measure(label: str, paths: list[str], target: float | None) -> list[float]:
            ms = []
            for p in paths:
                status, _, t = client.call("GET", p)
                if status != 200:
                    raise SystemExit(f"{p}: HTTP {status}")
                ms.append(t)
            print(summary(label, ms, target))
            return ms

        sample = [rng.choice(pairs) for _ in range(args.requests)]
        measure("neuron page GET /neurons/L/N", [f"/neurons/{a}/{b}?run={name}" for a, b in sample], 200)
        sample = [rng.choice(pairs) for _ in range(args.requests)]
        measure("API GET /api/neurons/L/N", [f"/api/neurons/{a}/{b}?run={name}" for a, b in sample], 200)
        measure("API GET /api/neurons?... (search)", [rng.choice(searches) for _ in range(args.requests)], 200)
        measure("index page GET /", ["/"] * max(20, args.requests // 10), None)

        text = " ".join(TEXT_WORDS[i % len(TEXT_WORDS)] for i in range(400))
        body = {"text": text, "layer": 29, "neuron": 0, "run": run.resolve().name}
        status, payload, first = client.call("POST", "/api/activations", body)
        if status != 200:
            raise SystemExit(f"live request failed: HTTP {status} {payload[:200]!r}")
        data = json.loads(payload)
        words = text.split()
        while len(data["tokens"]) > 200:  # cut the text to 200 tokens of the run's tokenizer
            words = words[: max(1, len(words) * 200 // len(data["tokens"]) - 1)]
            body["text"] = " ".join(words)
            _, payload, _ = client.call("POST", "/api/activations", body)
            data = json.loads(payload)
        n_tok = len(data["tokens"])
        print(f"live: first request (loads the model) {first / 1000:.1f} s; text of {n_tok} tokens")
        for layer in (29, 15):
            ms, server_ms = [], []
            for i in range(args.live):
                status, payload, t = client.call("POST", "/api/activations", {**body, "layer": layer, "neuron": i})
                if status != 200:
                    raise SystemExit(f"live request failed: HTTP {status}")
                ms.append(t)
                server_ms.append(json.loads(payload)["elapsed_ms"])
            print(summary(f"live {n_tok} tokens, layer {layer}", ms, 1000))
            print(f"{'':<34} of which the model's work in the server: median {percentile(server_ms, 0.5):.1f} ms")
        print(f"server RSS with the model loaded: {rss_mb(proc.pid):,.0f} MB")
        bare_forward(run, body["text"])

        load_test(host, port, name, pairs, searches, body, args, rng)
        if args.screenshots is not None:
            take_screenshots(host, port, name, args)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def bare_forward(run: Path, text: str, repeats: int = 5) -> None:
    """The same text's windows through the model in this process, no hooks: what a live request costs at least
    on this machine now (the machine is shared, so its speed changes by the minute)."""
    import torch

    from neuronhunter.io import read_json
    from neuronhunter.models.loading import load_model

    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    model = load_model(str(config.get("model") or "smollm2-135m"))
    ctx = int(config.get("context_length") or 128)
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    bos = model.bos_token_id
    windows = [([bos] if bos is not None else []) + ids[i: i + ctx - 1] for i in range(0, len(ids), ctx - 1)]
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in windows:
                model.forward(torch.tensor([w]))
            times.append((time.perf_counter() - t0) * 1000)
    print(f"bare forward of the same {len(ids)} tokens ({len(windows)} windows, all layers) in this process: "
          f"median {percentile(times, 0.5):.1f} ms")


def take_screenshots(host: str, port: int, name: str, args: argparse.Namespace) -> None:
    from neuronhunter.serve.testing import screenshots

    written = screenshots(f"http://{host}:{port}", args.screenshots, run=name, layer=20, neuron=882, token="red",
                          text="She wore a red coat, a pale blue scarf and green boots.",
                          browse=args.browse if args.browse is not None and args.browse.exists() else None)
    print("screenshots:", ", ".join(f"{p} ({p.stat().st_size // 1024} KB)" for p in written))


def load_test(host: str, port: int, name: str, pairs: list, searches: list[str], live: dict,
              args: argparse.Namespace, rng: random.Random) -> None:
    """``args.clients`` threads, each with its own connection, until the request or time budget is spent."""
    lock = threading.Lock()
    done = {"n": 0, "errors": 0, "live": 0}
    ms: list[float] = []
    deadline = time.monotonic() + args.load_seconds
    seeds = [rng.randrange(2**31) for _ in range(args.clients)]

    def worker(seed: int) -> None:
        r = random.Random(seed)
        c = Client(host, port)
        while time.monotonic() < deadline:
            with lock:
                if done["n"] >= args.load_requests:
                    return
                done["n"] += 1
            roll = r.random()
            a, b = r.choice(pairs)
            if roll < 0.01:  # a few live requests among page views
                status, _, t = c.call("POST", "/api/activations", {**live, "layer": a, "neuron": b})
                with lock:
                    done["live"] += 1
            elif roll < 0.4:
                status, _, t = c.call("GET", f"/neurons/{a}/{b}?run={name}")
            elif roll < 0.7:
                status, _, t = c.call("GET", f"/api/neurons/{a}/{b}?run={name}")
            else:
                status, _, t = c.call("GET", r.choice(searches))
            with lock:
                ms.append(t)
                if not 200 <= status < 400:
                    done["errors"] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(f"load test: {args.clients} concurrent clients, {len(ms)} requests ({done['live']} live) in {wall:.1f} s: "
          f"{len(ms) / wall:.1f} requests/s, errors: {done['errors']}")
    print(summary("  latency under load", ms, None))


if __name__ == "__main__":
    main()
