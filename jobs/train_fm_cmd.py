"""``sodkd train-fm``: train a student (DEDecoder by default) on foundation-model pseudo labels.

    sodkd train-fm --labels out/fm-labels --images data/unlabeled [--teacher-labels out/r50-labels] \\
                   [--config jobs/configs/train_fm.yaml] [steps=2000 loss.conf_threshold=0.6 ...]

Settings come from the YAML (default ``jobs/configs/train_fm.yaml``), then the flags, then ``dotted.key=value``
overrides (validated like the YAML; see ``cluster.fm_train.FMTrainConfig``). The loss is
``BCE + partial BCE (pixels with confidence >= loss.conf_threshold) + IoU`` per side output, plus the edge
loss for a model with an edge branch; every weight is a ``loss.*`` key. The run is recorded in MLflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "train_fm.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", help="output of `sodkd label --teacher foundation` (folder or s3://)")
    p.add_argument("--images", help="the images the labels were made from (the labelling job's --input)")
    p.add_argument("--teacher-labels", help="optional SOD-teacher label output to fuse with (joined by id)")
    p.add_argument("--output", help="where to write the trained weights (.pt, local or s3://)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default {DEFAULT_CONFIG.name})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. steps=500 loss.w_edge=0.5 model=scfnet_m3")


def build_config(args: argparse.Namespace):
    """YAML, then the flags, then the dotted overrides -> a validated FMTrainConfig."""
    from cluster.fm_train import FMTrainConfig
    from kd.config import load_config, load_yaml

    data = load_yaml(args.config) if args.config else {}
    for flag, key in (("labels", "labels"), ("images", "images"), ("teacher_labels", "teacher_labels"),
                      ("output", "output")):
        value = getattr(args, flag)
        if value:
            data[key] = value
    return load_config(FMTrainConfig, data, args.overrides)


def run(args: argparse.Namespace) -> int:
    from cluster.fm_train import train_fm

    cfg = build_config(args)
    result = train_fm(cfg)
    first, last = result.losses[0], result.losses[-1]
    print(f"sodkd train-fm: {cfg.model} on {result.samples} pseudo-labelled images, {len(result.losses)} steps, "
          f"loss {first:.4f} -> {last:.4f}, {result.wall_s:.1f} s"
          f"{f'; weights {result.weights}' if result.weights else ''}"
          f"{f'; mlflow run {result.run_id}' if result.run_id else ''}")
    return 0
