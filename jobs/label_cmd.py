"""``sodkd label``: soft-label a folder or bucket of images with a teacher, into Parquet shards.

    sodkd label --input s3://bucket/unlabeled --output s3://bucket/labels-r50 \\
                --teacher scfnet_r50:s3://bucket/teachers/r50.pt [--teacher t2.onnx] \\
                [--config jobs/configs/label.yaml] [pool.size=4 pool.num_gpus=1 tta=hflip ...]

Settings come from the YAML (default ``jobs/configs/label.yaml``), then ``--input/--output/--teacher``,
then ``dotted.key=value`` overrides (validated like the YAML; see ``cluster.label.config.LabelConfig``).
Before Ray starts, the driver checks that the output is writable, S3 credentials work and every teacher loads
(``cluster.preflight``). Rerunning the same command labels only what is not done yet. S3 credentials come
from the AWS environment; the endpoint from ``s3.endpoint_url=...`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "label.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="folder or s3://bucket/prefix of images (or video frame folders)")
    p.add_argument("--output", help="folder or s3://bucket/prefix for labels/ and rejects/")
    p.add_argument("--teacher", action="append", default=[], metavar="SPEC",
                   help="MODEL:WEIGHTS, FILE.onnx, FILE.pt2 or FILE.ts; repeat for an ensemble. A file sodkd did "
                        "not write needs a teacher card: FILE.card.yaml beside it, FILE?card=CARD, or --card")
    p.add_argument("--card", action="append", default=[], metavar="CARD",
                   help="teacher card (YAML) of the model files among --teacher, in their order; one card for "
                        "several files applies to all of them")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default {DEFAULT_CONFIG.name})")
    p.add_argument("--samples", type=int, default=6, help="sample images in the MLflow picture (0: none)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. pool.size=2 pool.num_cpus=0.5 label_size=256")


def build_config(args: argparse.Namespace):
    """YAML, then the flags, then the dotted overrides -> a validated LabelConfig."""
    from cluster.label import load_label_config
    from kd.config import load_yaml

    data = load_yaml(args.config) if args.config else {}
    if args.input:
        data["input"] = args.input
    if args.output:
        data["output"] = args.output
    if args.teacher:
        data["teachers"] = with_cards(list(args.teacher), list(args.card))
    elif args.card:
        raise SystemExit("sodkd label: --card describes a --teacher model file; give --teacher too")
    return load_label_config(data, args.overrides)


def with_cards(teachers: list[str], cards: list[str]) -> list[str]:
    """Attach ``--card`` files to the model-file specs among ``teachers`` (``FILE?card=CARD``)."""
    from cluster.teachers import CARD_QUERY, parse_teacher_spec
    if not cards:
        return teachers
    files = [i for i, t in enumerate(teachers) if parse_teacher_spec(t).kind != "registered"]
    if len(cards) not in (1, len(files)):
        raise SystemExit(f"sodkd label: {len(cards)} --card for {len(files)} model file(s) among --teacher: give "
                         "one card for all of them or one per file")
    out = list(teachers)
    for n, i in enumerate(files):
        if CARD_QUERY not in out[i]:
            out[i] = f"{out[i]}{CARD_QUERY}{cards[0] if len(cards) == 1 else cards[n]}"
    return out


def run(args: argparse.Namespace) -> int:
    from cluster.label import run_labelling
    from cluster.preflight import check_label
    from jobs.errors import naming

    cfg = build_config(args)
    with naming(input=cfg.input, output=cfg.output):
        check_label(cfg)   # output writable, S3 credentials, teachers loadable: before Ray starts
        summary = run_labelling(cfg, samples=args.samples)
    if summary.run_id:
        print(f"mlflow run {summary.run_id}")
    return 0
