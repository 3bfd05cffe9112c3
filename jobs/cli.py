"""The ``sodkd`` command line: one entry point, a subcommand per job.

Each subcommand lives in its own module under ``jobs/`` exposing ``add_arguments(parser)`` and
``run(args) -> int``; COMMANDS maps the subcommand to that module. Modules are imported only when their
subcommand runs, so ``sodkd models`` does not pay for importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("jobs.models_cmd", "list registered models with params and MACs"),
    "eval": ("jobs.eval_cmd", "score a folder of predicted maps against masks"),
    "export": ("jobs.export_cmd", "export a model to ONNX or torch.export (.pt2) with a parity check and a card"),
    "demo": ("jobs.demo", "the main job end to end on embedded defaults (what `make demo` runs)"),
    "submit": ("jobs.submit_cmd", "submit a sodkd job to a Ray cluster (Ray Jobs API)"),
    "jobs": ("jobs.jobs_cmd", "list, follow or stop submitted jobs"),
    "local": ("jobs.local_cmd", "start or stop a local Ray + MLflow + S3 stack on 127.0.0.1"),
    "label": ("jobs.label_cmd", "soft-label images with a teacher into Parquet shards (Ray Data)"),
    "views": ("jobs.views_cmd", "grow an unlabeled pool with synthetic views of it (zoomed crops, pasted objects)"),
    "train-teacher": ("jobs.train_cmd", "train a teacher on image/mask pairs (Ray Train)"),
    "train": ("jobs.train_cmd", "train a student on labels: `sodkd train --supervised` (the FS baseline)"),
    "distill": ("jobs.train_cmd", "distil a student from a teacher's soft labels on unlabeled images"),
    "train-fm": ("jobs.train_cmd", "train a student (DEDecoder) on foundation-model pseudo labels"),
    "predict": ("jobs.predict_cmd", "saliency maps for an image, a folder of images or a video file"),
    "calibrate": ("jobs.calibrate_cmd", "choose a student's output scale on validation pairs (lower MAE) and fold it in"),
    "average": ("jobs.average_cmd", "the element-wise mean of checkpoints of one model (checkpoint averaging)"),
    "eval-video": ("jobs.eval_video_cmd", "score models on video sequences: per sequence, overall, flicker"),
    "serve": ("jobs.serve_cmd", "serve a model over HTTP on Ray Serve (POST /predict, GET /healthz)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sodkd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    parser.add_argument("--debug", action="store_true", help="a failure prints its traceback, not one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Global flags come before the subcommand; the subcommand's own parser sees everything after it.
    split = next((i for i, a in enumerate(argv) if a in COMMANDS), len(argv))
    top = parser.parse_args(argv[: split + 1])
    if top.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if top.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):  # exporter chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module_name, help_text = COMMANDS[top.command]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"sodkd {top.command}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[split + 1:])
    if not hasattr(args, "command"):  # one module may serve several subcommands (train, train-teacher, ...)
        args.command = top.command
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for a known failure, traceback in a log (jobs/errors.py); -v/--debug: raise
        from jobs.errors import report
        code = report(e, top.command, debug=top.verbose or top.debug)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
