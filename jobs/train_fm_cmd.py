"""``sodkd train-fm``: train a student (DEDecoder by default) on foundation-model pseudo labels.

    sodkd train-fm --images data/unlabeled --labels out/fm-labels [--teacher-labels out/r50-labels] \\
                   --val data/ecssd --name fm-dedecoder [fm.conf_threshold=0.6 optim.epochs=20 ...]

The same Ray Train core, flags and resume-by-name as ``sodkd distill`` (:mod:`jobs.train_cmd`), in mode
``foundation``: settings come from ``jobs/configs/train_fm.yaml``, then the flags, then ``dotted.key=value``
overrides. The loss is ``BCE + partial BCE (pixels with confidence >= fm.conf_threshold) + IoU`` per side
output, plus the edge loss for a model with an edge branch; every weight is an ``fm.*`` key.
"""

from __future__ import annotations

import argparse

from jobs import train_cmd


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_cmd.add_arguments(p)


def build_config(args: argparse.Namespace):
    args.command = "train-fm"
    return train_cmd.build_config(args)


def run(args: argparse.Namespace) -> int:
    args.command = "train-fm"
    return train_cmd.run(args)
