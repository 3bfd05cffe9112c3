"""A local stack that a job cannot tell from a cluster: Ray head, MLflow server and S3 endpoint on 127.0.0.1.

``sodkd local up`` starts, under one directory (default ``~/.sodkd/local``, or ``$SODKD_LOCAL_DIR``):
- a Ray head (``ray start --head``) with its dashboard, so jobs go through the Ray Jobs API as on AWS;
- an MLflow tracking server (sqlite backend store, local artifact root served by the server);
- an S3 endpoint (moto's server) with a bucket ``sodkd`` created.
Ports, pids and addresses go to ``state.json`` there; ``down`` stops what ``up`` started and removes what it
wrote there. The environment a client needs (``RAY_ADDRESS``, ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``,
the stack's credentials *file*) is printed by ``sodkd local env``.

Secrets stay with the stack's user. The S3 endpoint accepts any key; each ``up`` makes a random pair and
writes it to ``aws/credentials`` (an AWS shared-credentials file, mode 0600 in a 0700 folder). The Ray head,
and so every job and worker, is started with ``AWS_SHARED_CREDENTIALS_FILE`` pointing there and with every
other ``AWS_*`` variable of the caller's environment removed: jobs find the stack's credentials through the
standard AWS chain, as they find an instance profile on a cluster, and nothing secret goes in a job's
runtime env (see :mod:`cluster.submit`). The caller's real AWS keys never reach the stack. Other secrets a job
may need (``HF_TOKEN`` ...) are inherited from the environment of ``sodkd local up``, like on a cluster node.
The stack's folder is 0700 and its processes run with umask 077, Ray's temp dir (``--temp-dir``: session logs,
``runtime_env_agent.log``, uploaded packages) is ``ray/`` inside it, so logs are private too.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cluster.submit import AWS_SECRET_NAMES

LOCAL_BUCKET = "sodkd"
LOCAL_REGION = "us-east-1"
# `eval $(sodkd local env)` unsets these: the shell then signs S3 requests with the stack's file, not with
# whatever real keys or profile it had.
UNSET_NAMES = (*AWS_SECRET_NAMES, "AWS_PROFILE")
# Unix socket paths are limited to 107 bytes; Ray puts them at TEMP/session_<26 + pid>/sockets/plasma_store.N
RAY_TEMP_MAX = 41
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
RAY_START_ATTEMPTS = 3


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
    ray_temp: str = ""     # Ray's --temp-dir for this stack ("" in state files written before it was recorded)

    @property
    def ray_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def credentials_file(self) -> Path:
        return _credentials_path(Path(self.dir))

    @property
    def ray_temp_dir(self) -> str:
        return self.ray_temp or f"/tmp/sodkd-ray-{self.ray_port}"

    def env(self) -> dict[str, str]:
        """What a client needs to talk to this stack: addresses and the *path* of the stack's credentials
        file (its values are never printed). Names in :data:`UNSET_NAMES` must be unset alongside."""
        aws = _credentials_path(Path(self.dir)).parent
        return {"RAY_ADDRESS": self.ray_address, "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_REGION": LOCAL_REGION, "RAY_AUTH_MODE": "token",
                "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"), "AWS_CONFIG_FILE": str(aws / "config")}

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) pointed at the stack, as after ``eval $(sodkd local env)``."""
        out = {k: v for k, v in (os.environ if base is None else base).items() if k not in UNSET_NAMES}
        out.update(self.env())
        return out

    def s3_client(self):
        """A boto3 S3 client for the stack's endpoint, signed with the stack's own credentials."""
        import boto3
        creds = read_credentials(Path(self.dir))
        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=LOCAL_REGION,
                            aws_access_key_id=creds["aws_access_key_id"],
                            aws_secret_access_key=creds["aws_secret_access_key"])


def _state_path(d: Path) -> Path:
    return d / "state.json"


def _credentials_path(d: Path) -> Path:
    return d / "aws" / "credentials"


def load_state(d: Path | None = None) -> LocalState | None:
    p = _state_path(d or default_dir())
    if not p.is_file():
        return None
    known = {f.name for f in fields(LocalState)}
    return LocalState(**{k: v for k, v in json.loads(p.read_text()).items() if k in known})


def _private_dir(p: Path) -> Path:
    p.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(p, PRIVATE_DIR)   # mkdir's mode is masked by the umask and ignored for an existing folder
    return p


def _private_open(p: Path, mode: str = "w"):
    """A file only this user can read, whatever the umask; an existing one is made so too."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(p, flags, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return os.fdopen(fd, mode)


def write_credentials(d: Path) -> Path:
    """A fresh random key pair for this stack's S3 endpoint in ``d/aws/credentials`` (0600 in a 0700
    folder), with a ``config`` beside it naming the region (so the user's ~/.aws is not read either)."""
    aws = _private_dir(d / "aws")
    creds = configparser.ConfigParser()
    creds["default"] = {"aws_access_key_id": "SODKDLOCAL" + secrets.token_hex(5).upper(),
                        "aws_secret_access_key": secrets.token_urlsafe(30)}
    with _private_open(aws / "credentials") as f:
        creds.write(f)
    with _private_open(aws / "config") as f:
        f.write(f"[default]\nregion = {LOCAL_REGION}\n")
    return aws / "credentials"


def read_credentials(d: Path) -> dict[str, str]:
    creds = configparser.ConfigParser()
    creds.read(_credentials_path(d))
    return dict(creds["default"])


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


def _child_env(d: Path, s3_endpoint: str) -> dict[str, str]:
    """The stack's processes' environment: the caller's without any AWS_* variable (its keys, profile,
    role or endpoint), plus the stack's credentials file, endpoint and region."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "token")   # token auth, token in ~/.ray/auth_token (Ray's default)
    # Ray's start-up waits (60 s for the dashboard, 30 s for its agents) are short for a loaded laptop
    for k, v in {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300", "RAY_agent_register_timeout_ms": "240000",
                 "RAY_raylet_start_wait_time_s": "240", "RAY_worker_register_timeout_seconds": "180"}.items():
        env.setdefault(k, v)
    aws = _credentials_path(d).parent
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"), "AWS_CONFIG_FILE": str(aws / "config"),
                "AWS_ENDPOINT_URL": s3_endpoint, "AWS_REGION": LOCAL_REGION,
                "AWS_EC2_METADATA_DISABLED": "true"})   # no instance here: don't wait on its metadata service
    return env


def _ray_temp_for(d: Path) -> Path:
    """``d/ray``, or where its Unix sockets would not fit, a new private folder in the temp dir."""
    t = d / "ray"
    if len(str(t)) <= RAY_TEMP_MAX:
        return _private_dir(t)
    return Path(tempfile.mkdtemp(prefix="sodkd-ray-"))   # mode 0700


def up(d: Path | None = None, num_cpus: int | None = None, log=print) -> LocalState:
    d = (d or default_dir()).resolve()
    existing = load_state(d)
    if existing and status(d)["ray"]:
        log(f"local stack already up in {d}")
        return existing
    _private_dir(d)
    _private_dir(d / "artifacts")
    write_credentials(d)
    ray_temp = _ray_temp_for(d)
    ports = {k: free_port() for k in ("ray", "dash", "mlflow", "s3", "agent", "agent_grpc", "metrics", "renv")}
    env = _child_env(d, f"http://127.0.0.1:{ports['s3']}")
    ncpu = num_cpus or os.cpu_count() or 2
    private = {"env": env, "umask": 0o077, "stderr": subprocess.STDOUT}
    state = LocalState(str(d), ports["ray"], ports["dash"], ports["mlflow"], ports["s3"], 0, 0, ncpu,
                       str(ray_temp))
    try:
        # the state first: a failure below leaves enough of it for down() to stop and remove what did start
        _write_state(d, state)
        # MLflow and moto first: MLflow creates its tables for a minute or more on a busy machine,
        # and that overlaps `ray start`
        log(f"starting MLflow server on 127.0.0.1:{ports['mlflow']} (sqlite {d / 'mlflow.db'})")
        mlflow = subprocess.Popen(
            [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts"),
             "--workers", "1"],
            stdout=_private_open(d / "mlflow.log"), start_new_session=True, **private)
        state.mlflow_pid = mlflow.pid
        _write_state(d, state)
        log(f"starting S3 endpoint on 127.0.0.1:{ports['s3']}")
        s3 = subprocess.Popen([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])],
                              stdout=_private_open(d / "s3.log"), start_new_session=True, **private)
        state.s3_pid = s3.pid
        _write_state(d, state)
        log(f"starting Ray head on 127.0.0.1:{ports['ray']} (dashboard {ports['dash']}, {ncpu} CPUs)")
        start = [_bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports['ray']}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dash']}", f"--num-cpus={ncpu}",
                 "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={ray_temp}",
                 # Ray's fixed default agent ports clash with any other Ray on the machine; pick free ones
                 f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                 f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['renv']}"]
        _private_open(d / "ray-start.log").close()
        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            # `ray start` gives the raylet a fixed 30 s to register; on a busy machine the first start (cold
            # imports) can miss it. What it left running is stopped before the next try.
            with _private_open(d / "ray-start.log", "a") as out:
                done = subprocess.run(start, stdout=out, **private)
            if done.returncode == 0:
                break
            _stop_ray_head(str(ray_temp), ports["ray"])
            if attempt == RAY_START_ATTEMPTS:
                raise subprocess.CalledProcessError(done.returncode, start)
            log(f"`ray start` failed (attempt {attempt} of {RAY_START_ATTEMPTS}); trying again")
        _wait_http(state.s3_endpoint, "S3 endpoint")
        _wait_http(state.mlflow_uri + "/health", "MLflow server", timeout=300)
        _wait_http(state.ray_address + "/api/version", "Ray dashboard", timeout=120)
        state.s3_client().create_bucket(Bucket=LOCAL_BUCKET)
    except BaseException as e:
        _stop(state)   # what did start; its logs stay for a look, `sodkd local down` removes them
        if isinstance(e, subprocess.CalledProcessError):
            tail = "".join((d / "ray-start.log").read_text(errors="replace").splitlines(True)[-12:])
            raise RuntimeError(f"`ray start` failed (logs kept under {d}; `sodkd local down --dir {d}` removes "
                               f"them):\n{tail}") from e
        raise
    log(f"local stack up; bucket s3://{LOCAL_BUCKET}; run `eval $(sodkd local env)` to point jobs at it")
    return state


def _write_state(d: Path, state: LocalState) -> None:
    with _private_open(_state_path(d)) as f:
        f.write(json.dumps(asdict(state), indent=2))


def _alive(pid: int) -> bool:
    try:   # a child of this very process (tests run up and down in one) is reaped, not left a zombie
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
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


def _stop_ray_head(mark: str, port: int) -> None:
    """Stop only this stack's Ray processes (and their children): those whose command line names its temp
    dir ``mark`` -- not every Ray on the machine as ``ray stop`` would."""
    import psutil
    own = re.compile(re.escape(mark) + r"(?=$|[/\s'\",;:=])")   # /x/ray, not /x/ray2
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and own.search(" ".join(p.info.get("cmdline") or [])):
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
    psutil.wait_procs(alive, timeout=5)


# What `up` writes in the stack's folder; `down` removes these (DATA too unless asked to keep them).
STACK_FILES = ("state.json", "ray-start.log", "mlflow.log", "s3.log", "aws", "ray")
DATA_FILES = ("mlflow.db", "artifacts")


def down(d: Path | None = None, log=print, keep_data: bool = False) -> None:
    """Stop the stack's processes, then remove what it wrote: logs, credentials, Ray's temp dir and, unless
    ``keep_data``, the MLflow store (the S3 endpoint keeps its objects in memory: they go with it). The
    folder itself goes when nothing else is left in it."""
    d = (d or default_dir()).resolve()
    state = load_state(d)
    if state is None:
        log(f"no local stack in {d}")
        return
    _stop(state)
    _remove(d, state, keep_data)
    log(f"local stack in {d} stopped" + ("; its MLflow store kept" if keep_data else "; its files removed"))


def _stop(state: LocalState) -> None:
    _stop_ray_head(state.ray_temp_dir, state.ray_port)
    pids = [p for p in (state.mlflow_pid, state.s3_pid) if p]
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in [p for p in pids if _alive(p)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _remove(d: Path, state: LocalState, keep_data: bool) -> None:
    removed = [*STACK_FILES, *(() if keep_data else DATA_FILES)]
    for name in removed:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if state.ray_temp and Path(state.ray_temp) != d / "ray":   # the fallback for a long --dir
        shutil.rmtree(state.ray_temp, ignore_errors=True)
    try:
        d.rmdir()
    except OSError:
        pass   # not empty: kept data, or files that are not the stack's
