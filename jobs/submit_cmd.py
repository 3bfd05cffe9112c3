"""``sodkd submit JOB [args]``: run any sodkd job on a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse

from cluster import submit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable by name (repeatable); the MLflow URI, AWS endpoint, "
                        "region and profile name are passed when set. Credentials (AWS keys, *SECRET*, *TOKEN*, "
                        "*PASSWORD*, API keys) are refused: jobs get them from the cluster (README, 'Credentials')")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="extra pip requirement for the job's runtime env (repeatable)")
    p.add_argument("--id", dest="submission_id", help="submission id (default: generated)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    p.add_argument("job", nargs=argparse.REMAINDER, help="the job and its arguments, e.g. label --input ...")


NOT_JOBS = ("submit", "jobs", "local")   # commands that talk to a cluster rather than run on one


def check_job(job_args: list[str]) -> None:
    """A submitted job must be a sodkd command that runs on the cluster (``label``, ``distill`` ...)."""
    from jobs.cli import COMMANDS
    if not job_args:
        raise ValueError("no job given: e.g. `sodkd submit label --input s3://bucket/images ...`")
    if job_args[0] not in COMMANDS or job_args[0] in NOT_JOBS:
        jobs = sorted(c for c in COMMANDS if c not in NOT_JOBS)
        raise ValueError(f"{job_args[0]}: not a sodkd job (one of {', '.join(jobs)})")


def run(args: argparse.Namespace) -> int:
    job_args = [a for a in args.job if a != "--"] if args.job[:1] == ["--"] else args.job
    check_job(job_args)
    runtime_env = submit.build_runtime_env(args.env, args.pip)
    print(f"submitting `sodkd {' '.join(job_args)}` to {submit.resolve_address(args.address)}")
    print(f"runtime env: {submit.describe_runtime_env(runtime_env)}")
    kept = submit.secrets_not_forwarded()
    if kept:
        print(f"not forwarded: {', '.join(kept)} (set here; {submit.CREDENTIALS_HELP})")
    job_id = submit.submit(job_args, args.address, args.env, args.pip, args.submission_id)
    print(f"submitted {job_id}")
    if args.no_wait:
        print(f"follow with: sodkd jobs logs {job_id} --follow")
        return 0
    status = submit.follow(job_id, args.address)
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1
