"""``sodkd local up|down|status|env``: a Ray head, an MLflow server and an S3 endpoint on 127.0.0.1.

``env`` prints what a shell needs (``eval $(sodkd local env)``): addresses and the path of the stack's private
credentials file, never a key; ``down`` stops the stack and removes its logs, credentials and Ray temp dir."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from cluster import local


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", type=Path, default=None, help="where state, logs and data live "
                                                          "(default $SODKD_LOCAL_DIR or ~/.sodkd/local)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--keep-data", action="store_true",
                   help="down: keep the MLflow store (mlflow.db, artifacts); logs, credentials and Ray's temp "
                        "dir are removed anyway")


def run(args: argparse.Namespace) -> int:
    if args.action == "up":
        state = local.up(args.dir, args.num_cpus)
        print(f"Ray jobs:  {state.ray_address}\nMLflow:    {state.mlflow_uri}\nS3:        {state.s3_endpoint} "
              f"(bucket s3://{local.LOCAL_BUCKET})\nThen:      eval $(sodkd local env{_dir_flag(args)})")
    elif args.action == "down":
        local.down(args.dir, keep_data=args.keep_data)
    elif args.action == "status":
        st = local.status(args.dir)
        for k, ok in st.items():
            print(f"{k:7s} {'up' if ok else 'down'}")
        return 0 if all(st.values()) else 1
    elif args.action == "env":
        state = local.load_state(args.dir)
        if state is None:
            raise ValueError("no local stack: run `sodkd local up` first")
        # the shell signs S3 requests with the stack's credentials file (a path: no key is printed)
        print(f"unset {' '.join(local.UNSET_NAMES)}")
        for k, v in state.env().items():
            print(f"export {k}={shlex.quote(v)}")
    return 0


def _dir_flag(args: argparse.Namespace) -> str:
    return f" --dir {args.dir}" if args.dir else ""
