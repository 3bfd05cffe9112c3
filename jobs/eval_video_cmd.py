"""``sodkd eval-video --weights A [B ...] --data DIR``: score models on video sequences, per sequence and overall.

``DIR`` holds ``<sequence>/images/*.jpg`` and ``<sequence>/masks/*.png`` (``../shared/data/davis2016-dev``). Each
model runs through :class:`cluster.predictor.Predictor` over every sequence in frame order -- a video model
(``streamer()``) in streaming mode (eager), an image model frame by frame (ONNX Runtime on a CPU) -- at ``--size`` (default: the model's ``input_size``), and :class:`kd.video_eval.VideoEvaluator`
gives S-measure, max F, MAE (and the other PySODMetrics figures) per sequence, pooled over all frames
(``overall``) and averaged over sequences (``sequence_mean``), plus the temporal-stability figure ``flicker``:
mean |p_t - p_{t-1}| over consecutive frames whose mask changes on < 1% of the pixels (lower is steadier).

Prints one table per model and, with several models, a per-sequence comparison; ``--json`` writes everything.
Other jobs (the video trainer's final evaluation) call :func:`evaluate_models`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from kd.video_eval import SUMMARY_KEYS, VideoEvaluator, predict_frames

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, type=Path, nargs="+", help="weights file(s) to compare")
    parser.add_argument("--data", required=True, help="folder of <sequence>/images + <sequence>/masks")
    parser.add_argument("--sequences", nargs="*", default=None, help="only these sequences")
    parser.add_argument("--max-frames", type=int, default=None, help="first N frames of each sequence")
    parser.add_argument("--size", type=int, default=None, help="inference resolution (default: each model's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def _predictor_frames(pred, images: list[np.ndarray]) -> list[np.ndarray]:
    """One sequence through a :class:`cluster.predictor.Predictor`: streaming for a video model (its state reset
    first), frame by frame otherwise; uint8 maps at each frame's size."""
    from cluster.predictor import to_uint8
    pred.reset()
    return [to_uint8(pred.predict_frame(im)) for im in images]


def evaluate_model(model, data: dict[str, tuple[list[np.ndarray], list[np.ndarray]]],
                   size: int | None = None) -> dict:
    """Run ``model`` over every sequence and score it (see :class:`kd.video_eval.VideoEvaluator`).

    ``model``: a :class:`cluster.predictor.Predictor` (what ``sodkd eval-video`` builds: ``auto`` backend, so
    ONNX Runtime for an image model on a CPU and eager streaming for a video model; ``size`` is then the
    predictor's) or an eager ``SODModel`` (the video trainer's final evaluation)."""
    from cluster.predictor import Predictor
    ev = VideoEvaluator()
    t0, frames = time.perf_counter(), 0
    engine = isinstance(model, Predictor)
    for seq, (images, masks) in data.items():
        maps = _predictor_frames(model, images) if engine else predict_frames(model, images, size)
        ev.add_sequence(seq, maps, masks)
        frames += len(images)
    res = ev.results()
    res["model"] = getattr(model, "name", type(model).__name__)
    res["size"] = int(model.size if engine else (size or model.input_size))
    res["seconds_per_frame"] = (time.perf_counter() - t0) / max(frames, 1)
    return res


def evaluate_models(weights: Sequence[Path], data: str, sequences: Sequence[str] | None = None,
                    max_frames: int | None = None, size: int | None = None) -> dict[str, dict]:
    """``{weights path: results}`` for each weights file, all on the same frames."""
    from cluster.predictor import Predictor
    from cluster.video_data import load_sequences

    seqs = load_sequences(data, sequences, max_frames)
    return {str(w): evaluate_model(Predictor.load(w, size=size), seqs) for w in weights}


def _fmt(v: float) -> str:
    return "  n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def format_table(results: dict[str, dict]) -> str:
    """Per-sequence rows of S, max F, MAE and flicker, one column group per model."""
    names = list(results)
    first = results[names[0]]
    head = "sequence".ljust(16) + "".join(
        f"| {Path(n).stem[:24]:<24} " + " ".join(f"{k:>7}" for k in SUMMARY_KEYS) + " " for n in names)
    lines = [head, "-" * len(head)]
    rows = list(first["sequences"]) + ["overall", "sequence_mean"]
    for row in rows:
        cells = []
        for n in names:
            figs = results[n]["sequences"][row] if row in results[n]["sequences"] else results[n][row]
            cells.append(f"| {'':<24} " + " ".join(f"{_fmt(figs[k]):>7}" for k in SUMMARY_KEYS) + " ")
        lines.append(row[:16].ljust(16) + "".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for w in args.weights:
        if not w.is_file():
            raise FileNotFoundError(f"--weights {w}: no such file")
    results = evaluate_models(args.weights, args.data, args.sequences, args.max_frames, args.size)
    print(format_table(results))
    for n, r in results.items():
        print(f"{n}: {r['model']} at {r['size']}, {r['seconds_per_frame'] * 1e3:.1f} ms/frame "
              f"(incl. decode-free pre/post-processing)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0
