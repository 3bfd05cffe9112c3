"""Chaos benchmark (issue 13 item 8): inject faults into small labelling jobs, rerun until done, count what was
lost and what was written twice.

Everything is real: a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and a worker
node as separate raylets, 1 logical CPU each, node failure noticed in ~1.5 s), a real S3 endpoint (moto's
``ThreadedMotoServer`` on 127.0.0.1) behind the TCP proxy of the fault tests (``FlakyProxy`` of
``tests/integration/test_labelling_faults.py``), real images from ``../shared/data/unlabeled/imagenet-1k`` and a
randomly initialised ``scfnet_m3`` teacher saved with ``models.save_weights`` (labels need not be meaningful).

Faults, each injected ``--rounds`` times into its own fresh job of ``--images`` inputs, at a point drawn per
injection (after the k-th label shard of the job appears, k random in [1, shards - 1]):

    driver-kill   ``sodkd label`` attached to the cluster (``RAY_ADDRESS``) is SIGKILLed (its process group);
                  the rerun starts at once, while Ray still ends the dead driver's workers (orphans)
    actor-kill    ``ray.kill`` of one of the two ``TeacherLabeler`` actors of the running job (no restart)
    node-kill     the worker node (its raylet and every process it started) is killed mid-job; a new worker
                  node joins before the next injection
    s3-pause      input and output on S3 through the proxy, which refuses and cuts every connection for 1-4 s
    s3-503        the proxy answers every request ``503 SlowDown`` for 1-4 s

After the fault the first run either finishes (retries, restarts), raises (``DeferredInputs``, a failed
job), or is gone (the killed driver); reruns of the same job follow (in this process, at once) until one
finishes with nothing deferred (at most ``--max-reruns``). Then every id in every label and reject shard is
counted, not deduplicated: *lost* = inputs with no row, *duplicated* = rows beyond the first of an id.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/chaos.py [--rounds 10] [--images 16]
        [--faults driver-kill,actor-kill,node-kill,s3-pause,s3-503] [--seed 0] [--json OUT] [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "chaos"
SHARED = Path(os.environ.get("SODKD_SHARED_DATA", REPO.parent / "shared" / "data"))
FAULTS = ("driver-kill", "actor-kill", "node-kill", "s3-pause", "s3-503")
SIZE = 64            # teacher and label size
SHARD_ROWS = 2
BUCKET = "sodkd-chaos"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
# node failure noticed in ~1.5 s (default ~15 s): read by the GCS and raylets when they start
FAST_DETECTION = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                  "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(tempfile.mkdtemp(prefix="sodkd-chaos-"))
        self.images = sorted((SHARED / "unlabeled" / "imagenet-1k").glob("*.jpg"))
        self.next_image = 0
        os.environ.update(AWS_ENV)
        os.environ.update(FAST_DETECTION)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto's request log
        import torch

        from models import create_model, save_weights
        torch.manual_seed(0)
        save_weights(create_model("scfnet_m3"), self.work / "m3.pt")
        self.teacher = f"scfnet_m3:{self.work / 'm3.pt'}"
        from moto.server import ThreadedMotoServer
        self.moto_port = _free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.moto.start()
        from cluster.storage import S3Config, boto3_client
        self.direct = S3Config(endpoint_url=f"http://127.0.0.1:{self.moto_port}")
        self.client = boto3_client(self.direct)
        self.client.create_bucket(Bucket=BUCKET)
        import ray
        from ray.cluster_utils import Cluster
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.worker = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level="ERROR", log_to_driver=False)

    def close(self) -> None:
        import ray
        ray.shutdown()
        self.cluster.shutdown()
        self.moto.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # --- one job's inputs and output -------------------------------------------------------------------

    def take(self) -> list[Path]:
        n = self.args.images
        if self.next_image + n > len(self.images):
            self.next_image = 0
        out = self.images[self.next_image:self.next_image + n]
        self.next_image += n
        return out

    def local_job(self, name: str) -> tuple[str, str, list[str]]:
        inp = self.work / name / "in"
        inp.mkdir(parents=True)
        keys = []
        for p in self.take():
            shutil.copy(p, inp / p.name)
            keys.append(p.name)
        return str(inp), str(self.work / name / "out"), keys

    def s3_job(self, name: str) -> tuple[str, str, list[str]]:
        keys = []
        for p in self.take():
            self.client.put_object(Bucket=BUCKET, Key=f"{name}/in/{p.name}", Body=p.read_bytes())
            keys.append(p.name)
        return f"s3://{BUCKET}/{name}/in", f"s3://{BUCKET}/{name}/out", keys

    def cfg(self, inp: str, out: str, s3=None, retry=None):
        from cluster.label import DecodeConfig, LabelConfig, PoolConfig, WriteConfig
        from cluster.storage import RetryConfig
        from cluster.tracking import TrackingConfig
        return LabelConfig(input=inp, output=out, teachers=(self.teacher,), teacher_size=SIZE, label_size=SIZE,
                           progress=False, tracking=TrackingConfig(enabled=False), s3=s3,
                           retry=retry or RetryConfig(),
                           pool=PoolConfig(size=2, num_cpus=0.6, batch_size=2, torch_threads=1),
                           decode=DecodeConfig(num_cpus=0.1, batch_size=2),
                           write=WriteConfig(num_cpus=0.1, shard_rows=SHARD_ROWS))

    def label_shards(self, out: str) -> int:
        """Finished label shards under ``out`` (on S3: listed straight from moto, never through the proxy)."""
        from kd import schema as S
        if out.startswith("s3://"):
            prefix = out[len(f"s3://{BUCKET}/"):] + f"/{S.LABELS_DIR}/"
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            return sum(1 for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".parquet"))
        d = Path(out) / S.LABELS_DIR
        return sum(1 for n in os.listdir(d) if n.endswith(".parquet") and not n.startswith(".")) if d.is_dir() else 0

    def count(self, out: str, keys: list[str]) -> tuple[int, int, int]:
        """(lost, duplicated, foreign): inputs in no shard, rows beyond an id's first, ids of no input."""
        import pyarrow.parquet as pq

        from cluster import labels as L
        from cluster.storage import get_filesystem
        from kd import schema as S
        fs, root = get_filesystem(out, self.direct if out.startswith("s3://") else None)
        ids: collections.Counter = collections.Counter()
        for kind in (S.LABELS_DIR, S.REJECTS_DIR):
            for p in L.shard_paths(fs, root, kind):
                ids.update(pq.read_table(p, filesystem=fs, columns=[S.ID]).column(S.ID).to_pylist())
        expected = {S.stable_id(k) for k in keys}
        return (len(expected - set(ids)), sum(c - 1 for c in ids.values() if c > 1), len(set(ids) - expected))

    def when_shards(self, out: str, k: int, then: Callable[[], None], timeout: float = 600) -> threading.Thread:
        """A thread that calls ``then()`` once ``k`` label shards are under ``out`` (looked at directly)."""
        from tests.integration.test_labelling_faults import when
        return when(lambda: self.label_shards(out) >= k, then, timeout, poll_s=0.05)

    def run_until_done(self, cfg, runs: list[str]) -> None:
        """Run ``cfg`` until a run finishes with nothing deferred; ``runs`` gets one outcome per run."""
        from cluster.label import DeferredInputs, run_labelling
        while len(runs) < 1 + self.args.max_reruns:
            try:
                s = run_labelling(cfg, samples=0)
            except DeferredInputs as e:
                runs.append(f"deferred {e.summary.deferred_transient}")
                continue
            except Exception as e:  # noqa: BLE001 - a failed job is an outcome; the next rerun follows
                runs.append(f"failed {type(e).__name__}")
                continue
            if s.deferred or s.deferred_transient:
                runs.append(f"deferred {s.deferred + s.deferred_transient}")
                continue
            runs.append(f"done ({s.labelled} new)")
            return

    # --- the faults ---------------------------------------------------------------------------------------

    def point(self) -> int:
        shards = -(-self.args.images // SHARD_ROWS)
        return self.rng.randint(1, max(1, shards - 1))

    def driver_kill(self, i: int) -> dict:
        inp, out, keys = self.local_job(f"driver-{i}")
        k = self.point()
        cmd = [sys.executable, "-m", "jobs.cli", "label", "--input", inp, "--output", out, "--teacher", self.teacher,
               f"teacher_size={SIZE}", f"label_size={SIZE}", "pool.size=2", "pool.num_cpus=0.6",
               "pool.batch_size=2", "pool.torch_threads=1", "decode.batch_size=2", "decode.num_cpus=0.1",
               "write.num_cpus=0.1", f"write.shard_rows={SHARD_ROWS}", "progress=false", "tracking.enabled=false"]
        env = {**os.environ, "RAY_ADDRESS": self.cluster.address, "PYTHONPATH": str(REPO)}
        runs: list[str] = []
        with open(self.work / f"driver-{i}.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + 600
            while self.label_shards(out) < k and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                runs.append(f"killed at {self.label_shards(out)} shards")
            else:
                runs.append(f"ended rc={proc.returncode} before the kill")
            proc.wait()
        self.run_until_done(self.cfg(inp, out), runs)   # at once: the dead driver's workers may still run
        return {"keys": keys, "out": out, "runs": runs, "at": k}

    @staticmethod
    def _teacher_actors() -> list:
        """Handles to the live ``TeacherLabeler`` pool actors (from the GCS actor table)."""
        import ray
        from ray._private.state import actors
        core = ray._private.worker.global_worker.core_worker
        return [core.get_actor_handle(ray.ActorID.from_hex(a["ActorID"])) for a in actors().values()
                if "TeacherLabeler" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"]

    def actor_kill(self, i: int) -> dict:
        """The job's teacher actors are looked up as soon as they are alive (the GCS table, polled), so the kill
        at the k-th shard is one ``ray.kill`` call, not a search while the job runs on."""
        import ray
        inp, out, keys = self.local_job(f"actor-{i}")
        k = self.point()
        fired: list[str] = []

        def watch():
            handles: list = []
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                handles = self._teacher_actors() or handles
                if self.label_shards(out) >= k:
                    if not handles:
                        fired.append(f"no live teacher actor at {self.label_shards(out)} shards (not injected)")
                        return
                    ray.kill(self.rng.choice(handles))
                    fired.append(f"actor killed at {self.label_shards(out)} shards")
                    return
                time.sleep(0.02)
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        runs: list[str] = []
        self.run_until_done(self.cfg(inp, out), runs)
        t.join(timeout=10)
        return {"keys": keys, "out": out, "runs": runs, "at": k, "fired": fired}

    def node_kill(self, i: int) -> dict:
        import ray
        if len([n for n in ray.nodes() if n["Alive"]]) < 2:
            self.worker = self.cluster.add_node(num_cpus=1)
            self.cluster.wait_for_nodes()
        inp, out, keys = self.local_job(f"node-{i}")
        k = self.point()
        fired: list[str] = []
        node = self.worker

        def kill():
            fired.append(f"node killed at {self.label_shards(out)} shards")
            self.cluster.remove_node(node, allow_graceful=False)
        t = self.when_shards(out, k, kill)
        runs: list[str] = []
        self.run_until_done(self.cfg(inp, out), runs)
        t.join(timeout=30)
        return {"keys": keys, "out": out, "runs": runs, "at": k, "fired": fired}

    def _s3_fault(self, i: int, mode: str) -> dict:
        from cluster.storage import RetryConfig, S3Config
        from tests.integration.test_labelling_faults import FlakyProxy
        name = f"{mode}-{i}"
        inp, out, keys = self.s3_job(name)
        k = self.point()
        spell = self.rng.uniform(1.0, 4.0)
        proxy = FlakyProxy(self.moto_port)
        fired: list[str] = []

        def fault():
            fired.append(f"{mode} for {spell:.1f} s at {self.label_shards(out)} shards")
            proxy.set_mode(mode)
            time.sleep(spell)
            proxy.set_mode("up")
        t = self.when_shards(out, k, fault)
        via_proxy = S3Config(endpoint_url=proxy.url, request_attempts=1)
        # short job-level retries (~1.5-3 s): some spells are waited out, longer ones defer inputs to a rerun
        retry = RetryConfig(attempts=4, delay_s=0.5, max_delay_s=1.0)
        runs: list[str] = []
        try:
            self.run_until_done(self.cfg(inp, out, s3=via_proxy, retry=retry), runs)
            t.join(timeout=10)
        finally:
            proxy.close()
        return {"keys": keys, "out": out, "runs": runs, "at": k, "fired": fired}

    def s3_pause(self, i: int) -> dict:
        return self._s3_fault(i, "refuse")

    def s3_503(self, i: int) -> dict:
        return self._s3_fault(i, "503")


def run(args) -> dict:
    bench = Bench(args)
    results: dict[str, list[dict]] = {f: [] for f in args.faults}
    started = time.time()
    try:
        for f in args.faults:
            inject = getattr(bench, f.replace("-", "_"))
            for i in range(args.rounds):
                t0 = time.perf_counter()
                r = inject(i)
                r["wall_s"] = time.perf_counter() - t0
                r["lost"], r["duplicated"], r["foreign"] = bench.count(r["out"], r["keys"])
                r["inputs"] = len(r["keys"])
                r["reruns"] = len(r["runs"]) - 1
                r["finished"] = bool(r["runs"]) and r["runs"][-1].startswith("done")
                del r["keys"]
                results[f].append(r)
                print(f"[{f} {i + 1}/{args.rounds}] {r['inputs']} inputs, fault after shard {r['at']}: "
                      f"{'; '.join(r.get('fired', []) + r['runs'])}; reruns {r['reruns']}, lost {r['lost']}, "
                      f"duplicated {r['duplicated']}, foreign {r['foreign']}, {r['wall_s']:.1f} s", flush=True)
    finally:
        bench.close()
    return {"results": results, "started": started, "wall_s": time.time() - started,
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version(),
                        "load_after": os.getloadavg()},
            "argv": sys.argv[1:]}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _landed(fault: str, r: dict) -> bool:
    """Did the fault hit the job while it ran (not after its end, not with no actor to kill)?"""
    if fault == "driver-kill":
        return r["runs"][0].startswith("killed")
    return bool(r.get("fired")) and "not injected" not in r["fired"][0]


def render(data: dict) -> str:
    res = data["results"]
    when = dt.datetime.fromtimestamp(data["started"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = data["machine"]
    lines = [
        "## Chaos (issue 13 item 8): faults injected into labelling jobs, reruns until done, lost and duplicated",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPU cores shared with other jobs (tests and a training run of other "
        f"sessions; load average {m['load_after'][0]:.1f} at the end), no GPU; Python {m['python']}, Ray 2.60, "
        f"moto's ThreadedMotoServer. Measured {when}, {data['wall_s'] / 60:.1f} min in all.",
        "",
        "Command: " + " then ".join(f"`OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/chaos.py {' '.join(a)}`"
                                    for a in data.get("commands", [data["argv"]])) + ".",
        "",
        "Each injection is a fresh job of its own images (ImageNet-1k from ../shared/data), labelled by a random "
        f"`scfnet_m3` at {SIZE} px on a 2-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, 1 CPU a "
        f"node, two teacher actors of 0.6 CPU: one per node), shards of {SHARD_ROWS} rows; the fault comes after "
        "the k-th label shard appears (k drawn per injection). Reruns: the same job run again at once, until a run "
        "ends with nothing deferred. Lost = inputs in no label or reject shard; duplicated = rows beyond the "
        "first of an id, over the raw rows of every shard (not the deduplicated view).",
        "",
        "| fault | injections (landed mid-job) | reruns needed (total; max) | first run finished anyway | inputs | "
        "lost | duplicated | wall s (total; median per injection) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    what = {"driver-kill": "driver kill (SIGKILL of `sodkd label`)", "actor-kill": "actor kill (`ray.kill`)",
            "node-kill": "node kill (worker raylet + its processes)", "s3-pause": "S3 endpoint down 1-4 s (proxy)",
            "s3-503": "S3 answering 503 for 1-4 s (proxy)"}
    for f, rs in res.items():
        if not rs:
            continue
        reruns = [r["reruns"] for r in rs]
        walls = [r["wall_s"] for r in rs]
        landed = sum(_landed(f, r) for r in rs)
        lines.append(f"| {what.get(f, f)} | {len(rs)} ({landed}) | {sum(reruns)}; {max(reruns)} | "
                     f"{sum(1 for x in reruns if x == 0)} | {sum(r['inputs'] for r in rs)} | "
                     f"{sum(r['lost'] for r in rs)} | {sum(r['duplicated'] for r in rs)} | "
                     f"{sum(walls):.0f}; {statistics.median(walls):.1f} |")
    unfinished = [(f, i) for f, rs in res.items() for i, r in enumerate(rs) if not r["finished"]]
    lines.append("")
    lines.append("Every injection ended with a finished run." if not unfinished else
                 f"Not finished within the reruns allowed: {unfinished}.")
    return "\n".join(lines)


def _merge(runs: list[dict]) -> dict:
    out = dict(runs[0], results=dict(runs[0]["results"]), commands=[runs[0]["argv"]])
    for r in runs[1:]:
        out["results"].update({f: rs for f, rs in r["results"].items() if rs})
        out["wall_s"] += r["wall_s"]
        out["machine"] = r["machine"]
        out["commands"].append(r["argv"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="injections per fault")
    p.add_argument("--images", type=int, default=12, help="inputs per injection")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    p.add_argument("--max-reruns", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--from-json", nargs="+", help="render saved runs instead of running (several: merged, a "
                   "later file's faults replacing an earlier one's)")
    p.add_argument("--notes", help="a markdown file appended to the section")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    bad = [f for f in args.faults if f not in FAULTS]
    if bad:
        p.error(f"--faults: unknown {bad}; known: {', '.join(FAULTS)}")
    if args.from_json:
        data = _merge([json.loads(Path(f).read_text()) for f in args.from_json])
    else:
        data = run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1))
    body = render(data)
    if args.notes:
        body += "\n\n" + Path(args.notes).read_text().strip()
    print(body)
    if not args.no_write:
        spec = importlib.util.spec_from_file_location("_bench_models", REPO / "benchmarks" / "models.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        bench.write_section(RESULTS, SECTION, body)
        print(f"wrote section {SECTION!r} of {RESULTS}")
    bad = sum(r["lost"] + r["duplicated"] for rs in data["results"].values() for r in rs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
