"""Submitting sodkd jobs to a Ray cluster through the Ray Jobs API, the same way locally and on AWS/K8s.

The job's entrypoint is ``python -m jobs.cli JOB ARGS`` run in the uploaded working directory (this repo,
without its virtualenv, git data and run outputs). Environment variables travel by *name*: the submitter says
which ones (``--env MLFLOW_TRACKING_URI``) and their values are read from its own environment and put in the
runtime env, never printed or logged. AWS credentials travel this way, or better, come from the cluster
nodes' instance role and are not passed at all.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
# Names passed along by default when set in the submitter's environment.
DEFAULT_ENV_NAMES = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                     "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                     "AWS_PROFILE", "SODKD_SHARED_DATA")
SECRET_HINTS = ("SECRET", "TOKEN", "PASSWORD", "KEY_ID", "CREDENTIAL")
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


def redact(name: str, value: str) -> str:
    """How an env var may be shown: names that look secret show only that they are set."""
    return "<set>" if any(h in name.upper() for h in SECRET_HINTS) else value


def build_runtime_env(env_names: list[str] | None = None, pip: list[str] | None = None,
                      working_dir: Path | None = REPO_ROOT, extra_env: dict[str, str] | None = None) -> dict:
    names = list(dict.fromkeys([*DEFAULT_ENV_NAMES, *(env_names or [])]))
    missing = [n for n in (env_names or []) if n not in os.environ]
    if missing:
        raise ValueError(f"--env {missing[0]}: not set in this environment")
    env_vars = {n: os.environ[n] for n in names if n in os.environ}
    env_vars.update(extra_env or {})
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
