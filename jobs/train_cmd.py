"""``sodkd train-teacher``, ``train --supervised``, ``distill`` (image or video) and ``train-fm``: one training core.

    sodkd train-teacher --paired s3://bucket/duts-tr --val s3://bucket/ecssd --name r50-duts \\
                        [model.name=scfnet_r50 optim.epochs=69 scaling.num_workers=8 scaling.use_gpu=true]
    sodkd train --supervised --paired data/duts-tr --val data/ecssd --name fs-m3
    sodkd distill --unlabeled data/imagenet-1k --labels out/labels-r50 --val data/ecssd --name kd-m3
    sodkd distill --unlabeled data/imagenet-1k --teacher scfnet_r50:r50.pt ...      # online soft labels
    sodkd distill --task video --unlabeled davis --labels out/davis-labels ...  # jobs/distill_video_cmd.py
    sodkd train-fm --images data/unlabeled --labels out/fm-labels [--teacher-labels out/r50-labels] ...

Every training subcommand dispatches here (:func:`run`): ``train-teacher``, ``train``, ``distill`` and
``train-fm`` are the image task in the mode the subcommand forces (``train-fm``: mode ``foundation``, the
student trains on foundation-model pseudo labels with ``BCE + partial BCE (pixels with confidence >=
fm.conf_threshold) + IoU`` per side output, plus the edge loss for a model with an edge branch; every weight is
an ``fm.*`` key), and ``distill --task video`` is the video task, whose flags are read the video way by
:mod:`jobs.distill_video_cmd`. Settings come from the YAML (default
``jobs/configs/{teacher,supervised,distill,train_fm}.yaml``), then the flags, then ``dotted.key=value``
overrides, validated into ``cluster.training.sections.TrainConfig``. Before Ray starts, the driver
checks that the run storage is writable, S3 credentials work and every weights file named loads
(``cluster.preflight``). Resubmitting the same ``--name`` with the same storage resumes from the run's latest
checkpoint. On success the final weights (best by val/mae) are written with ``models.save_weights`` (fp32 and
fp16) and their paths printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# subcommand -> (default YAML, mode it forces or None when the flags decide)
DEFAULTS = {"train-teacher": ("teacher.yaml", "teacher"), "distill": ("distill.yaml", "distill"),
            "train-fm": ("train_fm.yaml", "foundation"), "train": (None, None)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the subcommand's file in jobs/configs/)")
    p.add_argument("--supervised", action="store_true",
                   help="(sodkd train) the student on labels only: the paper's FS baseline")
    p.add_argument("--name", help="run name (= run.name); the same name resumes")
    p.add_argument("--storage", help="where runs live, local or s3:// (= run.storage)")
    p.add_argument("--paired", action="append", default=[], metavar="URI",
                   help="ROOT with images/ and masks/ (repeat for several)")
    p.add_argument("--unlabeled", "--images", dest="unlabeled", action="append", default=[], metavar="URI",
                   help="a folder or bucket prefix of images (repeat for several)")
    p.add_argument("--labels", action="append", default=[], metavar="URI",
                   help="`sodkd label` output for the unlabeled source in the same position")
    p.add_argument("--teacher-labels", action="append", default=[], metavar="URI",
                   help="(sodkd train-fm) a SOD teacher's label output to fuse with the foundation labels of "
                        "the source in the same position (joined by id)")
    p.add_argument("--teacher", action="append", default=[], metavar="SPEC",
                   help="online teacher (MODEL:WEIGHTS, FILE.ts, FILE.onnx) for sources without --labels")
    p.add_argument("--val", metavar="URI", help="labelled validation set (images/ + masks/)")
    p.add_argument("--task", choices=["image", "video"], default="image",
                   help="(sodkd distill) video: the video student on clips, see jobs/distill_video_cmd.py")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. optim.epochs=10 scaling.num_workers=2")


def _default_config(command: str, supervised: bool) -> tuple[Path | None, str | None]:
    yaml_name, mode = DEFAULTS.get(command, (None, None))
    if command == "train":
        if supervised:
            return CONFIG_DIR / "supervised.yaml", "supervised"
        return None, None
    return (CONFIG_DIR / yaml_name if yaml_name else None), mode


def build_config(args: argparse.Namespace):
    """YAML, then the flags, then the dotted overrides -> a validated TrainConfig."""
    from cluster.training.sections import load_train_config
    from kd.config import ConfigError, load_yaml, parse_overrides

    command = getattr(args, "command", "train")
    default_yaml, forced_mode = _default_config(command, args.supervised)
    if args.supervised and command != "train":
        raise ConfigError(f"--supervised: only for `sodkd train` (not `sodkd {command}`)")
    path = args.config or default_yaml
    if path is None:
        raise ConfigError("sodkd train: pass --supervised (the FS baseline) or --config FILE "
                          "(use `sodkd distill` and `sodkd train-teacher` for the other jobs)")
    data = load_yaml(path)
    if forced_mode:
        data["mode"] = forced_mode
    if args.name:
        data.setdefault("run", {})["name"] = args.name
    if args.storage:
        data.setdefault("run", {})["storage"] = args.storage
    section = data.setdefault("data", {})
    if args.paired:
        section["paired"] = [{"uri": u} for u in args.paired]
    if args.labels and len(args.labels) != len(args.unlabeled):
        raise ConfigError(f"--labels: give one per --unlabeled ({len(args.unlabeled)}), got {len(args.labels)}")
    teacher_labels = getattr(args, "teacher_labels", [])
    if teacher_labels and len(teacher_labels) != len(args.unlabeled):
        raise ConfigError(f"--teacher-labels: give one per --images/--unlabeled ({len(args.unlabeled)}), "
                          f"got {len(teacher_labels)}")
    if args.unlabeled:
        section["unlabeled"] = [{"uri": u, **({"labels": args.labels[i]} if args.labels else {}),
                                 **({"teacher_labels": teacher_labels[i]} if teacher_labels else {})}
                                for i, u in enumerate(args.unlabeled)]
    if args.teacher:
        section.setdefault("teacher", {})["teachers"] = list(args.teacher)
    if args.val:
        data.setdefault("val", {})["uri"] = args.val
    overrides = parse_overrides(args.overrides)
    if forced_mode and overrides.get("mode", forced_mode) != forced_mode:
        raise ConfigError(f"mode: `sodkd {command}` trains mode {forced_mode}, the overrides ask for "
                          f"{overrides['mode']}")
    return load_train_config(data, overrides)


def run(args: argparse.Namespace) -> int:
    """The one dispatch of the training subcommands (``cli.COMMANDS`` maps each of them here)."""
    from kd.config import ConfigError, to_dict

    if getattr(args, "task", "image") == "video":
        if args.command != "distill":
            raise ConfigError(f"--task video: only for `sodkd distill` (not `sodkd {args.command}`)")
        from jobs import distill_video_cmd
        return distill_video_cmd.run(args)
    cfg = build_config(args)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    from cluster.preflight import check_train
    from cluster.training.launch import run_training
    from jobs.errors import naming

    d = cfg.data
    inputs = [p.uri for p in d.paired] + [v for u in d.unlabeled for v in (u.uri, u.labels, u.teacher_labels) if v]
    with naming(input=inputs + ([cfg.val.uri] if cfg.val.uri else []), output=cfg.run.storage):
        check_train(cfg)   # storage writable, S3 credentials, weights files loadable: before Ray starts
        out = run_training(cfg)
    figures = ", ".join(f"{k} {v:.4f}" for k, v in out.metrics.items() if k.startswith("val/"))
    print(f"sodkd {args.command}: run {out.run_name}: {out.rows} rows, {out.steps_per_epoch} steps/epoch, "
          f"{out.wall_s:.1f} s{'; ' + figures if figures else ''}")
    if out.resumed_from:
        print(f"resumed after epoch(s) {out.resumed_from}")
    print(f"checkpoint {out.checkpoint}")
    for w in out.weights:
        print(f"weights {w}")
    if out.mlflow_run_id:
        print(f"mlflow run {out.mlflow_run_id}" + (f", model version {out.model_version}" if out.model_version else ""))
    return 0
