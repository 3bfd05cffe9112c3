"""Submitting sodkd jobs to a Ray cluster through the Ray Jobs API, the same way locally and on AWS/K8s.

The job's entrypoint is ``python -m jobs.cli JOB ARGS`` run in the uploaded working directory (this repo,
without its virtualenv, git data and run outputs). Environment variables travel by *name*: the submitter says
which ones (``--env NAME``) and their values are read from its own environment and put in the job's runtime
env. A runtime env is metadata, not a secret store: Ray shows it in ``ray job list``, in the Jobs API's job
info and in ``runtime_env_agent.log``. So only non-secret names travel: :data:`DEFAULT_ENV_NAMES` (endpoint,
region, profile *name*, MLflow URI, shared data folder) and what ``--env`` names, and a name that looks like a
credential (:func:`is_secret_name`) or a URL carrying a password is refused. Credentials reach jobs the way
they reach any process on the nodes -- the AWS default chain: an instance profile (``ray-cluster.yaml``),
IRSA or a Kubernetes Secret in the pod spec (``cluster/k8s``), ``~/.aws`` files on the nodes; the local stack
starts its Ray head with its own private credentials file (:mod:`cluster.local`).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
# Names passed along by default when set in the submitter's environment: none of them is a secret.
DEFAULT_ENV_NAMES = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                     "AWS_DEFAULT_REGION", "AWS_PROFILE", "SODKD_SHARED_DATA")
# Credentials the AWS chain reads from the environment: never forwarded, whatever --env says.
AWS_SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_SECRET_PARTS = ("SECRET", "PASSWORD", "PASSWD", "PRIVATE_KEY", "PRIVATEKEY")
_KEY_WORDS = {"KEY", "KEYS", "APIKEY", "ACCESSKEY", "SECRETKEY"}
CREDENTIALS_HELP = ("jobs get credentials from the cluster, not from `sodkd submit`: an instance profile, IRSA or a "
                    "Kubernetes Secret in the pod spec, ~/.aws files on the nodes; the local stack has its own "
                    "(see README, 'Credentials')")
WORKING_DIR_EXCLUDES = [".venv", ".git", "**/__pycache__", "*.egg-info", "mlruns", "mlflow.db", "demo-out",
                        "runs", ".helpers", ".carry", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise ValueError("no Ray address: pass --address or set RAY_ADDRESS (e.g. from `sodkd local env`)")
    if "://" not in addr:
        addr = f"http://{addr}"
    return addr


def _use_token_if_available() -> None:
    """Ray clusters started by ``ray start`` use token auth by default; a client only sends the token when
    ``RAY_AUTH_MODE=token``. Turn that on when a token is at hand (env, ``RAY_AUTH_TOKEN_PATH``, ~/.ray)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient
    _use_token_if_available()
    return JobSubmissionClient(resolve_address(address))


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential: the AWS keys and session token,
    anything with SECRET / PASSWORD / PRIVATE_KEY in it, a word ending in TOKEN (``HF_TOKEN``,
    ``MLFLOW_TRACKING_TOKEN``, not ``TOKENIZERS_PARALLELISM``), and KEY as the last word or before ID
    (``OPENAI_API_KEY``, ``AWS_ACCESS_KEY_ID``, not ``SODKD_KEY_FRAMES``)."""
    u = name.upper()
    if u in AWS_SECRET_NAMES or any(part in u for part in _SECRET_PARTS):
        return True
    words = [w for w in re.split(r"[^A-Z0-9]+", u) if w]
    if any(w.endswith(("TOKEN", "TOKENS")) for w in words):
        return True
    return any(w in _KEY_WORDS and (i == len(words) - 1 or words[i + 1] in ("ID", "IDS", "VALUE", "DATA"))
               for i, w in enumerate(words))


_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@")


def url_password(value: str) -> bool:
    """Whether ``value`` holds a URL with a password in it (``https://user:pw@host``)."""
    return bool(_URL_PASSWORD.search(value))


def redact(name: str, value: str) -> str:
    """How an env var may be shown: a secret-looking name shows only that it is set, a URL hides its password."""
    if is_secret_name(name):
        return "<set>"
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)


def check_forwardable(name: str, value: str | None = None) -> None:
    """Refuse, in one line, to put a credential in a runtime env (which Ray shows to anyone who lists jobs)."""
    if is_secret_name(name):
        raise ValueError(f"--env {name}: looks like a credential and is not forwarded (a job's runtime env shows "
                         f"in `ray job list`, the Jobs API and Ray's logs); {CREDENTIALS_HELP}")
    if value is not None and url_password(value):
        raise ValueError(f"{name}: its URL carries a password, which would show in the job's runtime env; "
                         f"drop it from the URL and give the job the password through the cluster ({CREDENTIALS_HELP})")


def secrets_not_forwarded() -> list[str]:
    """AWS credential names set in this environment: the job will not see them (worth telling the user)."""
    return [n for n in AWS_SECRET_NAMES if os.environ.get(n)]


def build_runtime_env(env_names: list[str] | None = None, pip: list[str] | None = None,
                      working_dir: Path | None = REPO_ROOT, extra_env: dict[str, str] | None = None) -> dict:
    for n in env_names or []:
        check_forwardable(n)
    missing = [n for n in (env_names or []) if n not in os.environ]
    if missing:
        raise ValueError(f"--env {missing[0]}: not set in this environment")
    names = list(dict.fromkeys([*DEFAULT_ENV_NAMES, *(env_names or [])]))
    env_vars = {n: os.environ[n] for n in names if n in os.environ}
    env_vars.update(extra_env or {})
    for n, v in env_vars.items():
        check_forwardable(n, v)
    runtime_env: dict = {"env_vars": env_vars}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = WORKING_DIR_EXCLUDES
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def describe_runtime_env(runtime_env: dict) -> str:
    env = runtime_env.get("env_vars", {})
    shown = ", ".join(f"{k}={redact(k, v)}" for k, v in sorted(env.items()))
    return f"working_dir={runtime_env.get('working_dir')} pip={runtime_env.get('pip', [])} env: {shown}"


def submit(job_args: list[str], address: str | None = None, env_names: list[str] | None = None,
           pip: list[str] | None = None, submission_id: str | None = None, entrypoint_num_cpus: float = 0,
           working_dir: Path | None = REPO_ROOT) -> str:
    if not job_args:
        raise ValueError("no job given: e.g. `sodkd submit label --input s3://bucket/images ...`")
    entrypoint = "python -m jobs.cli " + " ".join(shlex.quote(a) for a in job_args)
    runtime_env = build_runtime_env(env_names, pip, working_dir)
    c = client(address)
    deadline = time.time() + 300   # a head on a loaded machine can take minutes to start its job agent
    while True:
        try:
            return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                entrypoint_num_cpus=entrypoint_num_cpus, metadata={"sodkd_job": job_args[0]})
        except RuntimeError as e:
            # A freshly started head answers before its job agent has registered; that is worth waiting for.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def follow(job_id: str, address: str | None = None, out: Callable[[str], None] = print,
           poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Print the job's logs as they grow until it ends; return its final status."""
    c = client(address)
    shown = 0
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        status = str(c.get_job_status(job_id)).split(".")[-1]
        logs = c.get_job_logs(job_id)
        if len(logs) > shown:
            out(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        if deadline and time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s}s")
        time.sleep(poll_s)
