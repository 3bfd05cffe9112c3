"""``sodkd distill --task video``: distil the video student from a teacher's soft labels on video frames.

    sodkd label --input ../shared/data/davis2016-dev --output runs/davis-labels --teacher scfnet_r50:r50.pt \\
                layout=video
    sodkd distill --task video --unlabeled ../shared/data/davis2016-dev --labels runs/davis-labels \\
                  --val ../shared/data/davis2016-dev --name kdvideo-m3 [model.init_weights=m3.pt optim.epochs=3 ...]

The flags are those of ``sodkd distill`` (``jobs/train_cmd.py``), read the video way: ``--unlabeled`` is the
folder of frame folders the labelling job read, ``--labels`` its output (one of each), ``--val`` a folder of
labelled sequences (``<seq>/images`` + ``<seq>/masks``) scored in streaming mode. Settings come from the YAML
(default ``jobs/configs/distill-video.yaml``), then the flags, then ``dotted.key=value`` overrides, validated into
``cluster.training.video.VideoTrainConfig``. Resubmitting the same ``--name`` and storage resumes.

``sodkd distill`` parses the flags (:func:`jobs.train_cmd.add_arguments`) and hands ``--task video`` to
:func:`run` (:func:`jobs.train_cmd.run` is where every training subcommand dispatches).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "distill-video.yaml"


def build_config(args: argparse.Namespace):
    """YAML, then the flags, then the dotted overrides -> a validated VideoTrainConfig."""
    from cluster.training.video import load_video_config
    from kd.config import ConfigError, load_yaml

    data = load_yaml(getattr(args, "config", None) or DEFAULT_CONFIG)
    unlabeled, labels = list(getattr(args, "unlabeled", []) or []), list(getattr(args, "labels", []) or [])
    if len(unlabeled) > 1 or len(labels) > 1:
        raise ConfigError("--unlabeled/--labels: the video task takes one frame folder and its labels")
    if getattr(args, "supervised", False):
        raise ConfigError("--supervised: not a video distillation option")
    section = data.setdefault("data", {})
    if unlabeled:
        section["images"] = unlabeled[0]
    if labels:
        section["labels"] = labels[0]
    teachers = list(getattr(args, "teacher", []) or [])
    if teachers:
        if len(teachers) > 1:
            raise ConfigError("--teacher: the video task takes one teacher weights file")
        spec = teachers[0]
        data["teacher"] = spec.split(":", 1)[1] if ":" in spec and not spec.startswith(("s3:", "file:")) else spec
    if getattr(args, "name", None):
        data.setdefault("run", {})["name"] = args.name
    if getattr(args, "storage", None):
        data.setdefault("run", {})["storage"] = args.storage
    if getattr(args, "val", None):
        data.setdefault("val", {})["uri"] = args.val
    return load_video_config(data, getattr(args, "overrides", None))


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def run(args: argparse.Namespace) -> int:
    from kd.config import to_dict

    cfg = build_config(args)
    if getattr(args, "print_config", False):
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    from cluster.training.video import run_video_distill

    out = run_video_distill(cfg)
    print(f"sodkd distill --task video: run {out.run_name}: {out.clips} clips from {out.frames} frames, "
          f"{out.steps_per_epoch} steps/epoch, {len(out.history)} epochs, {out.wall_s:.1f} s")
    for h in out.history:
        vals = " ".join(f"{k}={_fmt(v)}" for k, v in h.items() if k.startswith(("train/", "val/")))
        print(f"  epoch {h['epoch']}: {vals}")
    if out.resumed_from:
        print(f"resumed after epoch(s) {out.resumed_from}")
    if out.validation:
        o = out.validation["overall"]
        print(f"validation (streaming, {o['frames']} frames): S {_fmt(o['sm'])}  max F {_fmt(o['fm_max'])}  "
              f"MAE {_fmt(o['mae'])}  flicker {_fmt(o['flicker'])}")
    print(f"checkpoint {out.checkpoint}")
    for w in out.weights:
        print(f"weights {w}")
    if out.mlflow_run_id:
        print(f"mlflow run {out.mlflow_run_id}")
    return 0
