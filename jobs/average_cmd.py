"""``sodkd average --weights A B [C ...] --output FILE``: the element-wise mean of checkpoints of one model.

Use it on checkpoints of one training trajectory (the ends of successive cycles, the last epochs of a run): their
mean usually scores better than each of them, at no training or run-time cost (:mod:`models.soup` says why and
when not). The files must hold one model, config and input size; calibrated files have their output scale undone
first, so the result is the mean model as trained (``sodkd calibrate`` it again if wanted). The output's header
lists its sources (file name, sha256 prefix, run name, step) under ``averaged_from``; it is stored in float16 when
every input was.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, nargs="+", type=Path,
                        help="two or more weights files written by save_weights (one model)")
    parser.add_argument("--output", required=True, type=Path, help="where to write the averaged weights")


def run(args: argparse.Namespace) -> int:
    from models import save_weights
    from models.soup import average_weights

    out = args.output.resolve()
    if any(p.resolve() == out for p in args.weights):
        raise ValueError(f"--output {args.output}: one of the --weights files; write the mean elsewhere")
    model, sources = average_weights(args.weights)
    half = all(s.get("dtype") == "float16" for s in sources)
    save_weights(model, args.output, extra_meta={"averaged_from": sources}, half=half)
    for s in sources:
        print(f"  {s['file']} (sha256 {s['sha256']}" + (f", {s['run_name']}" if "run_name" in s else "")
              + (f", step {s['step']}" if "step" in s else "") + ")")
    print(f"wrote {args.output}: the mean of {len(sources)} files of {model.name} at {model.input_size} px"
          + (" (float16)" if half else ""))
    return 0
