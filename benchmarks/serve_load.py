"""`erniegen serve` under load: requests a second and per-request latency with and without shared batches.

For each server batch size (1: every request decoded alone; 32: the default) a real `erniegen serve` process is
started; then for each number of concurrent clients, every client sends one dev source per request and sends
the next as soon as the answer comes (a closed loop), until the run has sent ``--requests`` requests. The
clients are threads of this process, on the same two cores as the server, as a co-located caller would be.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve_load.py --model runs/qg-teacher/best \
        --input ../shared/data/squad_qg_sent/dev.jsonl --output results/serve_load.json -- --num-beams 1 --precision int8
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from erniegen.bench import write_results  # noqa: E402
from erniegen.data import read_examples  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.loads(r.read())


def start_server(model: str, batch_size: int, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "erniegen.cli", "serve", "--model", model, "--port", str(port),
           "--batch-size", str(batch_size), *flags]
    log = Path(tempfile.gettempdir()) / f"erniegen-serve-{port}.log"  # the server's own account, if it fails
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=out,
                                  stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return server, base
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server stopped with status {server.returncode} (log: {log}): {' '.join(cmd)}")
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server did not come up in 120 s (log: {log})")


def load(base: str, sources: list[str], clients: int, requests: int) -> dict:
    """``clients`` closed-loop threads share ``requests`` one-source requests; wall time and latencies."""
    latencies: list[float] = []
    lock, sent = threading.Lock(), [0]

    def client() -> None:
        while True:
            with lock:
                if sent[0] >= requests:
                    return
                i = sent[0]
                sent[0] += 1
            t0 = time.perf_counter()
            post(f"{base}/generate", {"sources": [sources[i % len(sources)]]})
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ordered = sorted(latencies)
    return {"clients": clients, "requests": requests, "requests_per_s": round(requests / wall, 2),
            "median_ms": round(statistics.median(ordered), 1),
            "p90_ms": round(ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="jsonl whose sources the clients send")
    p.add_argument("--output", required=True)
    p.add_argument("--batch-sizes", default="1,32", help="server --batch-size values, one server each")
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--requests", type=int, default=128, help="requests per client count")
    p.add_argument("--warmup", type=int, default=8, help="requests sent first, not timed, per server")
    p.add_argument("flags", nargs="*", help="after --: erniegen serve flags (decoding defaults, precision)")
    args = p.parse_args()
    sources = [e.source for e in read_examples(args.input, require_target=False)]
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        server, base = start_server(args.model, batch_size, args.flags)
        try:
            load(base, sources[-args.warmup:], min(args.warmup, 4), args.warmup)
            for clients in [int(c) for c in args.clients.split(",")]:
                row = {"server_batch_size": batch_size} | load(base, sources, clients, args.requests)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    write_results(args.output, rows, model=args.model, input=args.input, flags=" ".join(args.flags))
    print("| server batch size | clients | requests/s | median ms | p90 ms |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server_batch_size']} | {r['clients']} | {r['requests_per_s']} | {r['median_ms']} | "
              f"{r['p90_ms']} |")


if __name__ == "__main__":
    main()
