"""``sodkd jobs list|status|logs|stop``: look after jobs submitted with ``sodkd submit``."""

from __future__ import annotations

import argparse

from cluster import submit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")


def run(args: argparse.Namespace) -> int:
    c = submit.client(args.address)
    if args.action == "list":
        for job in c.list_jobs():
            print(f"{job.submission_id}\t{str(job.status).split('.')[-1]}\t{job.entrypoint}")
        return 0
    if not args.job_id:
        raise ValueError(f"jobs {args.action}: a job id is required")
    if args.action == "status":
        print(str(c.get_job_status(args.job_id)).split(".")[-1])
    elif args.action == "logs":
        if args.follow:
            status = submit.follow(args.job_id, args.address)
            print(f"job {args.job_id} {status}")
        else:
            print(c.get_job_logs(args.job_id), end="")
    elif args.action == "stop":
        stopped = c.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'was not running'}")
    return 0
