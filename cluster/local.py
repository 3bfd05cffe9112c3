"""A local stack that a job cannot tell from a cluster: Ray head, MLflow server and S3 endpoint on 127.0.0.1.

``sodkd local up`` starts, under one directory (default ``~/.sodkd/local``, or ``$SODKD_LOCAL_DIR``):
- a Ray head (``ray start --head``) with its dashboard, so jobs go through the Ray Jobs API as on AWS;
- an MLflow tracking server (sqlite backend store, local artifact root served by the server);
- an S3 endpoint (moto's server) with a bucket ``sodkd`` created.
Ports, pids and addresses go to ``state.json`` there; ``down`` stops what ``up`` started. The environment a
job needs (``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``) is printed by ``sodkd local env``.
The S3 endpoint accepts any credentials; the stack uses fixed dummy ones and never prints real ones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

LOCAL_BUCKET = "sodkd"
# moto accepts any key; these dummy values make the stack self-contained without touching real credentials.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sodkd-local", "AWS_SECRET_ACCESS_KEY": "sodkd-local-secret"}


def default_dir() -> Path:
    return Path(os.environ.get("SODKD_LOCAL_DIR", Path.home() / ".sodkd" / "local"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalState:
    dir: str
    ray_port: int
    dashboard_port: int
    mlflow_port: int
    s3_port: int
    mlflow_pid: int
    s3_pid: int
    num_cpus: int

    @property
    def ray_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """What a client needs to talk to this stack (addresses plus the stack's dummy credentials)."""
        return {"RAY_ADDRESS": self.ray_address, "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_REGION": "us-east-1", "RAY_AUTH_MODE": "token",
                **LOCAL_CREDENTIALS}


def _state_path(d: Path) -> Path:
    return d / "state.json"


def load_state(d: Path | None = None) -> LocalState | None:
    p = _state_path(d or default_dir())
    if not p.is_file():
        return None
    return LocalState(**json.loads(p.read_text()))


def _bin(name: str) -> str:
    """Executables of this environment first (the venv's ray/mlflow/moto_server), then PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: not found next to {sys.executable} or on PATH")
    return found


def _wait_http(url: str, what: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception as e:  # connection refused while starting
            if getattr(e, "code", None):  # an HTTP error status still means it is up
                return
            last = e
            time.sleep(0.5)
    raise TimeoutError(f"{what} did not answer at {url} within {timeout:.0f}s ({last})")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "token")   # token auth, token in ~/.ray/auth_token (Ray's default)
    return env


def up(d: Path | None = None, num_cpus: int | None = None, log=print) -> LocalState:
    d = (d or default_dir()).resolve()
    existing = load_state(d)
    if existing and status(d)["ray"]:
        log(f"local stack already up in {d}")
        return existing
    d.mkdir(parents=True, exist_ok=True)
    (d / "artifacts").mkdir(exist_ok=True)
    env = _child_env()
    ports = {k: free_port() for k in ("ray", "dash", "mlflow", "s3", "agent", "agent_grpc", "metrics", "renv")}
    ncpu = num_cpus or os.cpu_count() or 2
    log(f"starting Ray head on 127.0.0.1:{ports['ray']} (dashboard {ports['dash']}, {ncpu} CPUs)")
    subprocess.run([_bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports['ray']}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dash']}", f"--num-cpus={ncpu}",
                    "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={ray_temp_dir(ports['ray'])}",
                    # Ray's fixed default agent ports clash with any other Ray on the machine; pick free ones
                    f"--dashboard-agent-listen-port={ports['agent']}",
                    f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                    f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['renv']}"],
                   check=True, env=env, stdout=open(d / "ray-start.log", "w"), stderr=subprocess.STDOUT)
    log(f"starting MLflow server on 127.0.0.1:{ports['mlflow']} (sqlite {d / 'mlflow.db'})")
    mlflow = subprocess.Popen(
        [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts"),
         "--workers", "1"],
        env=env, stdout=open(d / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    log(f"starting S3 endpoint on 127.0.0.1:{ports['s3']}")
    s3 = subprocess.Popen([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])],
                          env=env, stdout=open(d / "s3.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    state = LocalState(str(d), ports["ray"], ports["dash"], ports["mlflow"], ports["s3"], mlflow.pid, s3.pid, ncpu)
    _state_path(d).write_text(json.dumps(asdict(state), indent=2))
    _wait_http(state.s3_endpoint, "S3 endpoint")
    _wait_http(state.mlflow_uri + "/health", "MLflow server", timeout=120)
    _wait_http(state.ray_address + "/api/version", "Ray dashboard", timeout=120)
    import boto3
    boto3.client("s3", endpoint_url=state.s3_endpoint, region_name="us-east-1",
                 aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=LOCAL_BUCKET)
    log(f"local stack up; bucket s3://{LOCAL_BUCKET}; run `eval $(sodkd local env)` to point jobs at it")
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def status(d: Path | None = None) -> dict[str, bool]:
    state = load_state(d)
    if state is None:
        return {"ray": False, "mlflow": False, "s3": False}

    def answers(url: str) -> bool:
        try:
            _wait_http(url, url, timeout=1.5)
            return True
        except TimeoutError:
            return False
    return {"ray": answers(state.ray_address + "/api/version"),
            "mlflow": _alive(state.mlflow_pid) and answers(state.mlflow_uri + "/health"),
            "s3": _alive(state.s3_pid) and answers(state.s3_endpoint)}


def ray_temp_dir(port: int) -> str:
    """Ray's temp dir for the stack whose head listens on ``port``: short (Unix socket paths are limited)
    and unique, so ``down`` can find exactly this stack's processes."""
    return f"/tmp/sodkd-ray-{port}"


def _stop_ray_head(port: int) -> None:
    """Stop only this stack's Ray processes (and their children), not every Ray on the machine as
    ``ray stop`` would."""
    import psutil
    mark = ray_temp_dir(port)
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and mark in " ".join(p.info.get("cmdline") or []):
            procs[p.pid] = p
            try:
                procs.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
    procs = list(procs.values())
    # `ray start` records the head in ray_current_cluster so a bare ray.init() joins it; a stale record
    # would make every later ray.init() wait for a dead head.
    for record in (Path("/tmp/ray/ray_current_cluster"), Path(mark) / "ray_current_cluster"):
        try:
            if record.read_text().strip().endswith(f":{port}"):
                record.unlink()
        except OSError:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def down(d: Path | None = None, log=print) -> None:
    d = d or default_dir()
    state = load_state(d)
    if state is None:
        log(f"no local stack in {d}")
        return
    _stop_ray_head(state.ray_port)
    for pid in (state.mlflow_pid, state.s3_pid):
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in (state.mlflow_pid, state.s3_pid)):
        time.sleep(0.2)
    _state_path(Path(d)).unlink(missing_ok=True)
    log(f"local stack in {d} stopped")
