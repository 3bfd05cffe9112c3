"""Node loss (issue 13 item 6) on a real multi-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` starts a head and worker nodes as separate raylets, each with its own logical CPUs
(and its own worker processes); a node is lost the way a machine is, by killing its raylet and everything it
started (``remove_node(..., allow_graceful=False)``), while the job runs. Checked:

- a worker node killed mid-labelling: the job finishes on what is left, and every input is in exactly one
  label or reject shard (the raw ids of every shard, not the deduplicated view). This found a bug: a write
  task that had written its shard on the dying node was retried by Ray Data and wrote the same rows again
  under a new random name (2 of 40 ids in two shards, seen before the fix); shard names are now a digest of their ids
  (``cluster.labels.shard_name``), so the retry replaces the shard;
- the node of one worker of a 2-worker training run killed: Ray Train restarts the group on the nodes left
  and the run resumes from its last checkpoint (epoch 1) and finishes;
- a killed driver's orphaned workers (Ray ends them, not at once): a rerun started at once still ends with
  every input exactly once.

The teacher is a randomly initialised ``scfnet_m3`` at 64 px (labels need not be meaningful here).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster import labels as L
from cluster.label import load_label_config, run_labelling
from cluster.training.launch import run_training
from cluster.training.sections import load_train_config
from kd import schema as S
from models import create_model, save_weights
from tests.integration.conftest import environ

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIZE = 64


# A dead node is noticed by the GCS's health checks of its raylet (default: 5 missed checks 3 s apart, ~15 s);
# here ~1.5 s, and Ray Train polls its workers every 0.5 s (default 2 s), so a test does not wait on defaults.
_FAST_FAILURE_DETECTION = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
                           "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3",
                           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def cluster():
    """A head node (1 CPU) this process drives; each test adds and kills its own worker nodes."""
    with environ(_FAST_FAILURE_DETECTION):   # before the GCS and raylets start: they read it then
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def _add_node(c: Cluster, num_cpus: float):
    node = c.add_node(num_cpus=num_cpus)
    c.wait_for_nodes()
    return node


def _alive_nodes() -> int:
    return len([n for n in ray.nodes() if n["Alive"]])


def _alive_nodes_soon(want: int, within_s: float = 60.0) -> int:
    """The live node count once it is ``want`` (or after ``within_s``): a job can finish on the nodes left
    before the GCS's health checks have marked the killed one dead (seen on a loaded machine)."""
    deadline = time.monotonic() + within_s
    while _alive_nodes() != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive_nodes()


def _kill_node(c: Cluster, node) -> None:
    """The node is lost as a machine is: its raylet and every process it started are killed (SIGKILL)."""
    c.remove_node(node, allow_graceful=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "m3.pt"
    save_weights(create_model("scfnet_m3"), path)
    return f"scfnet_m3:{path}"


def _images(shared_data, dst: Path, n: int, start: int = 0) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for p in sorted((shared_data / "unlabeled" / "imagenet-1k").glob("*.jpg"))[start:start + n]:
        shutil.copy(p, dst / p.name)
        names.append(p.name)
    return names


def _raw_ids(out: Path) -> collections.Counter:
    """Every id in every label and reject shard, NOT deduplicated: what "exactly once" is checked on."""
    fs = pafs.LocalFileSystem()
    ids: collections.Counter = collections.Counter()
    for kind in (S.LABELS_DIR, S.REJECTS_DIR):
        for p in L.shard_paths(fs, str(out), kind):
            ids.update(pq.read_table(p, filesystem=fs, columns=[S.ID]).column(S.ID).to_pylist())
    return ids


def _assert_exactly_once(out: Path, keys) -> None:
    ids = _raw_ids(out)
    assert set(ids) == {S.stable_id(k) for k in keys}
    dupes = {i: c for i, c in ids.items() if c != 1}
    assert not dupes, f"ids written more than once: {dupes}"


def _shards(out: Path) -> list[str]:
    d = out / S.LABELS_DIR
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if d.is_dir() else []


def _label_cfg(inp: Path, out: Path, teacher: str, **over):
    cfg = {"input": str(inp), "output": str(out), "teachers": [teacher], "teacher_size": SIZE, "label_size": SIZE,
           "progress": False, "tracking": {"enabled": False},
           "pool": {"size": 2, "num_cpus": 0.6, "batch_size": 2, "torch_threads": 1},
           "decode": {"num_cpus": 0.1, "batch_size": 2}, "write": {"num_cpus": 0.1, "shard_rows": 2}}
    cfg.update(over)
    return load_label_config(cfg)


def test_worker_node_killed_mid_labelling_finishes_exactly_once(cluster, teacher, shared_data, tmp_path):
    """Two teacher actors (0.6 CPU each, one per 1-CPU node); the worker node dies once the first shards are
    written. Its actor, and any decode or write task on it, are lost; Ray Data retries them on the head."""
    worker = _add_node(cluster, 1)
    assert _alive_nodes() == 2
    n = 24
    keys = _images(shared_data, tmp_path / "in", n, start=500)
    out = tmp_path / "out"
    at_kill: list[int] = []

    def kill_when_labelling():
        deadline = time.monotonic() + 300
        while len(_shards(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        at_kill.append(len(_shards(out)))
        _kill_node(cluster, worker)

    t = threading.Thread(target=kill_when_labelling, daemon=True)
    t.start()
    summary = run_labelling(_label_cfg(tmp_path / "in", out, teacher), samples=0)
    t.join(timeout=60)
    assert at_kill and _alive_nodes_soon(1) == 1
    assert at_kill[0] < n // 2, f"the kill came after the last shard ({at_kill[0]} of {n // 2})"
    assert (summary.labelled, summary.rejected, summary.deferred) == (n, 0, 0)
    _assert_exactly_once(out, keys)
    again = run_labelling(_label_cfg(tmp_path / "in", out, teacher, pool={"size": 1, "num_cpus": 0.6}), samples=0)
    assert (again.labelled, again.skipped_done) == (0, n)


def test_a_retried_write_replaces_its_shard():
    """What makes a write task retried after its node died harmless: the same rows get the same shard name."""
    import pyarrow as pa
    t = pa.table({S.ID: ["b", "a"], S.KEY: ["x", "y"]})
    assert L.shard_name(t) == L.shard_name(t.take([1, 0])) != L.shard_name(t.slice(0, 1))


def _train_cfg(shared_data, tmp: Path, name: str, **over) -> dict:
    data = tmp / "data"
    for set_name, n in (("duts-tr", 8), ("ecssd", 4)):
        for p in sorted((shared_data / set_name / "images").glob("*.jpg"))[:n]:
            for kind, src in (("images", p), ("masks", shared_data / set_name / "masks" / f"{p.stem}.png")):
                (data / set_name / kind).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, data / set_name / kind / src.name)
    cfg = {"mode": "supervised", "model": {"name": "scfnet_m3"},
           "data": {"paired": [{"uri": str(data / "duts-tr")}], "load_size": SIZE, "sizes": [SIZE],
                    "decode_batch": 4, "decode_cpus": 0.1},
           "val": {"uri": str(data / "ecssd"), "size": SIZE, "panel": 0, "batch_size": 4},
           "optim": {"epochs": 2, "batch_size": 4, "warmup_epochs": 1},
           "scaling": {"num_workers": 2, "cpus_per_worker": 0.75, "torch_threads": 1},
           "run": {"name": name, "storage": str(tmp / "runs"), "max_failures": 1},
           "mlflow": {"enabled": False}, "output": {"dir": str(tmp / "out")}}
    for dotted, value in over.items():
        node = cfg
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def _train_worker_nodes() -> set[str]:
    """Node ids of the live Ray Train workers (from the GCS actor table)."""
    from ray._private.state import actors
    return {a["Address"]["NodeID"] for a in actors().values()
            if a.get("ActorClassName", "").endswith("RayTrainWorker") and a.get("State") == "ALIVE"}


def test_node_of_a_training_worker_killed_resumes_from_the_last_checkpoint(cluster, shared_data, tmp_path):
    """Two DDP workers of 0.75 CPU on three 1-CPU nodes (the head and two worker nodes): one worker a node. At
    step 3 (epoch 2, after the epoch-1 checkpoint) rank 1 stops (``debug.fail_at_step`` with a long
    ``fail_after_s``: it waits, it does not exit), so the group stands still while a worker node holding one of
    them is killed. Ray Train restarts the group on the two nodes left, from the epoch-1 checkpoint."""
    nodes = [_add_node(cluster, 1), _add_node(cluster, 1)]
    assert _alive_nodes() == 3
    marker = tmp_path / "paused"
    cfg = load_train_config(_train_cfg(shared_data, tmp_path, "node-loss", **{
        "debug.fail_at_step": 3, "debug.fail_marker": str(marker), "debug.fail_rank": 1,
        "debug.fail_after_s": 600.0}))
    events: list[str] = []

    def kill_when_paused():
        deadline = time.monotonic() + 400
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not marker.exists():
            return
        time.sleep(2.0)           # Ray Train registers the epoch-1 checkpoint at its next poll (every 0.5 s)
        holding = _train_worker_nodes()
        victim = next(n for n in nodes if n.node_id in holding)   # at most one of the two workers is on the head
        _kill_node(cluster, victim)
        events.append(f"killed a node of {len(holding)}")

    t = threading.Thread(target=kill_when_paused, daemon=True)
    t.start()
    t0 = time.monotonic()
    out = run_training(cfg)
    t.join(timeout=60)
    assert events == ["killed a node of 2"] and marker.read_text().startswith("worker rank 1 exited at step 3")
    assert time.monotonic() - t0 < 500, "the run waited out fail_after_s: the node kill did not end the group"
    assert out.resumed_from == [1] and out.metrics["epoch"] == 2 and out.metrics["step"] == 4
    meta = json.loads((Path(out.checkpoint) / "meta.json").read_text())
    assert meta["resumed_from"] == [1]
    assert _alive_nodes_soon(2) == 2
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)


def test_rerun_at_once_after_a_driver_kill_ends_exactly_once(cluster, teacher, shared_data, tmp_path):
    """`sodkd label` attached to the cluster gets SIGKILL once its first shards are written; its workers (write
    tasks, teacher actors) may outlive it until Ray ends them. The rerun starts at once, without waiting for
    them to be gone (test_labelling.py's kill test waits for 3 s without a new shard), and every input still
    ends in exactly one shard."""
    worker = _add_node(cluster, 1)
    n = 20
    keys = _images(shared_data, tmp_path / "in", n, start=600)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.cli", "label", "--input", str(tmp_path / "in"), "--output", str(out),
           "--teacher", teacher, f"teacher_size={SIZE}", f"label_size={SIZE}", "pool.size=2", "pool.num_cpus=0.6",
           "pool.batch_size=2", "pool.torch_threads=1", "decode.batch_size=2", "decode.num_cpus=0.1",
           "write.num_cpus=0.1", "write.shard_rows=2", "progress=false", "tracking.enabled=false"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "job.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while not _shards(out) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"the job ended before it could be killed:\n{log_path.read_text()[-3000:]}"
            assert _shards(out), f"no shard within 400 s:\n{log_path.read_text()[-3000:]}"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    at_kill = len(_raw_ids(out))
    summary = run_labelling(_label_cfg(tmp_path / "in", out, teacher), samples=0)   # at once
    assert at_kill < n and summary.skipped_done >= at_kill
    assert summary.skipped_done + summary.labelled == n and summary.deferred == 0
    _assert_exactly_once(out, keys)
    cluster.remove_node(worker)
