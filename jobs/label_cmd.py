"""``sodkd label``: soft-label a folder or bucket of images with a teacher, into Parquet shards.

    sodkd label --input s3://bucket/unlabeled --output s3://bucket/labels-r50 \\
                --teacher scfnet_r50:s3://bucket/teachers/r50.pt [--teacher t2.onnx] \\
                [--config jobs/configs/label.yaml] [pool.size=4 pool.num_gpus=1 tta=hflip ...]

Settings come from the YAML (default ``jobs/configs/label.yaml``), then ``--input/--output/--teacher``,
then ``dotted.key=value`` overrides (validated like the YAML; see ``cluster.labelling.LabelConfig``).
Rerunning the same command labels only what is not done yet. S3 credentials come from the AWS
environment; the endpoint from ``s3.endpoint_url=...`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "label.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="folder or s3://bucket/prefix of images (or video frame folders)")
    p.add_argument("--output", help="folder or s3://bucket/prefix for labels/ and rejects/")
    p.add_argument("--teacher", action="append", default=[], metavar="SPEC",
                   help="MODEL:WEIGHTS, FILE.ts or FILE.onnx; repeat for an ensemble")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default {DEFAULT_CONFIG.name})")
    p.add_argument("--samples", type=int, default=6, help="sample images in the MLflow picture (0: none)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. pool.size=2 pool.num_cpus=0.5 label_size=256")


def build_config(args: argparse.Namespace):
    """YAML, then the flags, then the dotted overrides -> a validated LabelConfig."""
    from cluster.labelling import load_label_config
    from kd.config import load_yaml

    data = load_yaml(args.config) if args.config else {}
    if args.input:
        data["input"] = args.input
    if args.output:
        data["output"] = args.output
    if args.teacher:
        data["teachers"] = list(args.teacher)
    return load_label_config(data, args.overrides)


def run(args: argparse.Namespace) -> int:
    from cluster.labelling import run_labelling

    cfg = build_config(args)
    summary = run_labelling(cfg, samples=args.samples)
    if summary.run_id:
        print(f"mlflow run {summary.run_id}")
    return 0
