"""``sodkd serve``: a saliency model as an HTTP service on Ray Serve (see :mod:`cluster.serve`).

    sodkd serve --local --weights weights/kd-scfnet_m3-from-csnet-L-x2.fp16.pt          # one machine
    sodkd serve --address HOST:6379 --model m3.onnx --replicas 2 batching.max_batch_size=16
    curl --data-binary @photo.jpg 'http://127.0.0.1:8000/predict?output=cutout' -o cut.png

``--local`` starts a private Ray on this machine (stopped on exit); otherwise the application runs on the
cluster at ``--address`` or ``$RAY_ADDRESS`` and is deleted on Ctrl-C (``--detach``: left running). Settings
come from the YAML (default ``jobs/configs/serve.yaml``), then the flags, then ``dotted.key=value`` overrides,
validated like the YAML (:class:`cluster.serve_api.ServeConfig`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "serve.yaml"

# flag -> config key
_FLAGS = {"model": "model", "backend": "backend", "size": "size", "device": "device", "precision": "precision",
          "threads": "threads", "threshold": "threshold", "host": "host", "port": "port",
          "route_prefix": "route_prefix", "name": "app_name", "replicas": "num_replicas", "num_cpus": "num_cpus",
          "num_gpus": "num_gpus"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="MODEL:WEIGHTS, an exported .onnx / .pt2 file, or anything "
                                       "`sodkd predict --model` takes")
    which.add_argument("--weights", type=Path, help="weights file written by save_weights")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", help="Ray cluster to serve on (default $RAY_ADDRESS)")
    where.add_argument("--local", action="store_true", help="start a private Ray on this machine for the service")
    p.add_argument("--local-cpus", type=float, default=None, help="--local: CPUs of the private Ray (default: all)")
    p.add_argument("--detach", action="store_true", help="deploy to the cluster and return, leaving it running")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default {DEFAULT_CONFIG.name})")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--route-prefix", help="URL prefix of the application (default /)")
    p.add_argument("--name", help="application name (default sodkd)")
    p.add_argument("--replicas", type=int, help="fixed number of replicas (or autoscaling.* overrides)")
    p.add_argument("--num-cpus", type=float, help="Ray CPUs per replica, fractions allowed (default 0.5)")
    p.add_argument("--num-gpus", type=float, help="Ray GPUs per replica (default 0)")
    p.add_argument("--max-batch-size", type=int, help="requests per forward pass at most (default 8)")
    p.add_argument("--batch-wait-s", type=float, help="how long a replica waits for a batch to fill (default 0.01)")
    p.add_argument("--no-batching", action="store_true", help="one request per forward pass")
    p.add_argument("--backend", help="auto | eager | onnx | pt2")
    p.add_argument("--size", type=int, help="inference resolution (default: the model's)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--precision", help="fp32 | fp16 | bf16 (eager on a GPU)")
    p.add_argument("--threads", type=int, help="intra-op threads per replica (default 1)")
    p.add_argument("--threshold", type=float, help="binarise mask/cutout/overlay replies at this probability")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. num_cpus=0.25 limits.max_pixels=20000000 "
                        "autoscaling.max_replicas=4")


def build_config(args: argparse.Namespace):
    """YAML, then the flags, then the dotted overrides -> a validated ServeConfig."""
    from cluster.serve_api import load_serve_config
    from kd.config import load_yaml

    data = load_yaml(args.config) if args.config else {}
    if args.weights is not None:
        if not args.weights.is_file():
            raise FileNotFoundError(f"--weights {args.weights}: no such file")
        data["model"] = str(args.weights)
    for flag, key in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[key] = value
    batching = dict(data.get("batching") or {})
    if args.max_batch_size is not None:
        batching["max_batch_size"] = args.max_batch_size
    if args.batch_wait_s is not None:
        batching["batch_wait_timeout_s"] = args.batch_wait_s
    if args.no_batching:
        batching["enabled"] = False
    if batching:
        data["batching"] = batching
    cfg = load_serve_config(data, args.overrides)
    check_model_file(cfg.model)
    return cfg


def check_model_file(spec: str) -> None:
    """Fail fast on a spec that cannot load: unparseable, or naming a local file that is not there (remote
    specs -- ``s3://``, registry URIs -- are the replicas' business)."""
    from cluster.teachers import parse_teacher_spec

    if spec.startswith("models:/") or spec.split(":", 1)[0].lower() in ("s3", "gs", "http", "https", "runs"):
        return
    if Path(spec).suffix.lower() in (".pt", ".pth"):        # a bare weights file: its header names the model
        if not Path(spec).is_file():
            raise FileNotFoundError(f"model {spec}: no such weights file")
        return
    parsed = parse_teacher_spec(spec)
    for path in (parsed.path, parsed.card):
        if path and "://" not in path and not Path(path).is_file():
            raise FileNotFoundError(f"model {spec}: no such file {path}")


def run(args: argparse.Namespace) -> int:
    from cluster.serve import serve_forever

    cfg = build_config(args)
    return serve_forever(cfg, address=args.address, local=args.local, detach=args.detach, local_cpus=args.local_cpus)
