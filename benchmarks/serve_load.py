"""Serving load test of ``sodkd serve``: throughput and latency over HTTP on 127.0.0.1, batching on and off.

    .venv/bin/python benchmarks/serve_load.py [--model WEIGHTS_OR_SPEC] [--requests 200] [--time-cap-s 60]
        [--concurrency 1 4 16] [--batching on off] [--num-cpus 1] [--no-write] [KEY=VALUE ...]

A private Ray (``cluster.serve.connect(local=True)``) runs the real application (``cluster.serve.deploy``, config
``jobs/configs/serve.yaml`` plus the flags and dotted overrides), once with ``batching.enabled=true`` and once
with ``false``. For every concurrency C, C client threads (one keep-alive HTTP connection each) POST real images
(``--images``, ECSSD samples by default, cycled) to ``/predict`` until ``--requests`` have been sent or
``--time-cap-s`` has passed, whichever comes first (requests in flight at the cap are finished and counted).
Reported per case: answers, errors (non-200 or broken connections), req/s (200s / wall time of the case),
p50 / p99 latency of the 200s (client side: send to last byte), and the mean / largest batch the replicas
reported (``X-Sodkd-Batch-Size``). The table is printed and, unless ``--no-write``, written to
benchmarks/RESULTS.md between ``<!-- section: serve-load -->`` and ``<!-- end: serve-load -->``.

Closed loop: each client waits for its answer before sending the next request, so concurrency C is at most C
requests in flight; with batching on, a lone client pays ``batching.batch_wait_timeout_s`` per request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import importlib.util
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "serve-load"
DEFAULT_MODEL = REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt"
DEFAULT_IMAGES = REPO / "sample-data" / "ecssd" / "images"
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "serve.yaml"


def _bench_helpers():
    """benchmarks/models.py (cpu_model, load_average, write_section), loaded under another name than ``models``."""
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "benchmarks" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of ``values`` (nan when empty)."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Client:
    """One keep-alive connection to the service; reconnects after a failure."""

    def __init__(self, port: int, path: str, timeout: float):
        self.port, self.path, self.timeout = port, path, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.conn.request("POST", self.path, body=data, headers={"Content-Type": "application/octet-stream"})
            r = self.conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        except Exception:
            self.close()
            raise

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_case(port: int, path: str, images: list[bytes], concurrency: int, requests: int, time_cap_s: float,
             timeout: float) -> dict:
    """``concurrency`` closed-loop clients until ``requests`` are sent or ``time_cap_s`` passes."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + time_cap_s

    def worker() -> None:
        client = Client(port, path, timeout)
        try:
            while True:
                with lock:
                    if issued[0] >= requests or time.perf_counter() >= deadline:
                        return
                    i = issued[0]
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    status, headers, _ = client.post(images[i % len(images)])
                except Exception as e:  # noqa: BLE001 - a broken request is an error of the case, not the run
                    with lock:
                        errors.append(type(e).__name__)
                    continue
                dt_s = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        latencies.append(dt_s)
                        if "x-sodkd-batch-size" in headers:
                            batches.append(int(headers["x-sodkd-batch-size"]))
                    else:
                        errors.append(str(status))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = len(latencies)
    return {"concurrency": concurrency, "sent": issued[0], "ok": ok, "errors": len(errors),
            "error_kinds": sorted(set(errors)), "wall_s": wall, "rps": ok / wall if wall > 0 else float("nan"),
            "p50_ms": 1000.0 * percentile(latencies, 50), "p99_ms": 1000.0 * percentile(latencies, 99),
            "mean_batch": (sum(batches) / len(batches)) if batches else float("nan"),
            "max_batch": max(batches) if batches else 0, "capped": issued[0] < requests}


def wait_healthy(port: int, prefix: str, batching: bool, timeout_s: float) -> dict:
    """/healthz of the application once it answers with the wanted batching setting (a redeploy replaces the
    replica; until then the old one may still answer)."""
    client = Client(port, prefix, 30.0)
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            status, body = client.get(f"{prefix}/healthz")
            if status == 200:
                h = json.loads(body)
                if h.get("batching", {}).get("enabled") == batching:
                    return h
            last = f"{status} {body[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"/healthz not ready with batching={batching} within {timeout_s} s (last: {last})")


def table(rows: list[dict]) -> list[str]:
    out = ["| batching | concurrency | sent | 200s | errors | wall s | req/s | p50 ms | p99 ms | mean batch | "
           "max batch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['batching']} | {r['concurrency']} | {r['sent']}{' (cap)' if r['capped'] else ''} | "
                   f"{r['ok']} | {r['errors']}{' ' + ','.join(r['error_kinds']) if r['error_kinds'] else ''} | "
                   f"{r['wall_s']:.1f} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                   f"{r['mean_batch']:.2f} | {r['max_batch']} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="a Predictor spec (default: the committed KD m3)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of images to send (cycled)")
    ap.add_argument("--requests", type=int, default=200, help="requests per case at most")
    ap.add_argument("--time-cap-s", type=float, default=60.0, help="seconds per case at most")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batching", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-s", type=float, default=0.01)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per replica")
    ap.add_argument("--local-cpus", type=int, default=None, help="CPUs of the private Ray (default: all cores)")
    ap.add_argument("--warmup", type=int, default=4, help="sequential requests before each batching mode")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="HTTP timeout of one request")
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--section", default=SECTION)
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted ServeConfig overrides")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.time_cap_s <= 0 or min(args.concurrency) < 1:
        ap.error("--requests, --time-cap-s and --concurrency must be positive")

    from ray import serve

    import ray
    from cluster.serve import connect, deploy, load_serve_config
    from kd.config import load_yaml

    images = [p.read_bytes() for p in sorted(args.images.iterdir())
              if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")]
    if not images:
        raise SystemExit(f"{args.images}: no images")
    bench = _bench_helpers()
    port = _free_port()
    base = load_yaml(DEFAULT_CONFIG)
    base.update(model=args.model, port=port, host="127.0.0.1", num_cpus=args.num_cpus, num_replicas=args.replicas,
                threads=args.threads, app_name="serve-load")
    rows: list[dict] = []
    t_start = time.perf_counter()
    connect(local=True, num_cpus=args.local_cpus or os.cpu_count())
    try:
        for i, mode in enumerate(args.batching):
            data = dict(base, batching={"enabled": mode == "on", "max_batch_size": args.max_batch_size,
                                        "batch_wait_timeout_s": args.batch_wait_s})
            cfg = load_serve_config(data, args.overrides)
            t0 = time.perf_counter()
            deploy(cfg, start_http=(i == 0))
            health = wait_healthy(port, cfg.route_prefix.rstrip("/"), mode == "on", args.startup_timeout_s)
            print(f"batching {mode}: {health['model']} ({health['backend']}) at {health['size']} px up in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            path = cfg.route_prefix.rstrip("/") + "/predict"
            warm = Client(port, path, args.timeout_s)
            for k in range(args.warmup):
                warm.post(images[k % len(images)])
            warm.close()
            for c in args.concurrency:
                r = run_case(port, path, images, c, args.requests, args.time_cap_s, args.timeout_s)
                r["batching"] = mode
                rows.append(r)
                print(table([r])[-1], flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    total_s = time.perf_counter() - t_start

    lines = table(rows)
    print("\n".join(lines))
    if not args.no_write:
        head = [
            "## Serving load (`sodkd serve`, HTTP on 127.0.0.1)",
            "",
            f"Model `{Path(args.model).name}` ({health['model']}, {health['backend']}, {health['size']} px); "
            f"{args.replicas} replica(s) x {args.num_cpus} Ray CPU, {args.threads} torch thread(s); batching on = "
            f"at most {args.max_batch_size} per forward, waiting {args.batch_wait_s} s. Closed-loop clients, "
            f"at most {args.requests} requests or {args.time_cap_s:.0f} s per case; images: "
            f"{len(images)} from `{args.images.relative_to(REPO) if args.images.is_relative_to(REPO) else args.images}`"
            f" (cycled). Latency is client side (send to last byte), req/s counts 200s.",
            "",
            f"Machine: {bench.cpu_model()}, {os.cpu_count()} cores, load average {bench.load_average()} at the end; "
            f"Python {platform.python_version()}, Ray {ray.__version__}; "
            f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {total_s:.0f} s in all. Command: "
            f"`.venv/bin/python benchmarks/serve_load.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
            "",
        ]
        bench.write_section(args.results, args.section, "\n".join(head + lines))
        print(f"wrote section {args.section!r} of {args.results}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
