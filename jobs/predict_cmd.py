"""``sodkd predict --model SPEC --input X --output Y``: masks, cutouts, overlays or mattes for an image, a folder
or a video file.

``SPEC`` is what ``sodkd label --teacher`` takes: ``MODEL:WEIGHTS`` (a ``save_weights`` file), an ONNX file
(``.onnx``) or torch.export program (``.pt2``) written by ``sodkd export``, a model file with a teacher card, or a
legacy TorchScript file (``.ts``), or ``models:/NAME/VERSION`` / ``models:/NAME/latest`` (the MLflow registry,
:mod:`cluster.registry`); ``--weights W`` is short for a weights file whose header names the model. It
runs through :class:`cluster.predictor.Predictor`: ``--backend eager`` (PyTorch; ``--precision fp16|bf16`` and
``--channels-last`` on a GPU), ``onnx`` (ONNX Runtime, ``--threads`` intra-op threads, 1 by default: the faster
setting for this small network) or ``pt2`` (torch.export); weights are exported for the two latter on the fly,
an exported file runs in its own backend (``auto``, the default: the file's own; for weights ONNX Runtime on a CPU
through a cached export, eager on a GPU or for a video model).

- **image file** -> ``Y`` is an image file (or a folder, which gets ``<stem>.<format>``);
- **folder** -> ``Y/<relative path>.<format>`` for every image below it, ``--batch N`` images per forward pass,
  with a progress bar and images/s at the end. With a video model (one that has a ``streamer()``, e.g.
  ``video_scfnet_m3``) the images of each sub-folder are taken as the consecutive frames of a sequence (sorted
  by name) and run in streaming mode;
- **video file** (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``, decoded with PyAV) -> ``Y`` is a video
  (H.264 at the source frame rate; ``--codec ffv1`` with ``.mkv`` for lossless) of one map (or overlay) per
  frame, streamed through a video model or run per frame through an image model.

``--mode``: ``mask`` (the map as 8-bit grayscale, ``round(255 p)``; binary with ``--threshold T``: 255 where
``p >= T``), ``cutout`` (RGBA: the image with alpha = that mask, so the background is transparent; PNG or WebP),
``overlay`` (the mask tinted red at 50% over the image) or ``alpha`` (the soft matte ``round(255 p)``, whatever
``--threshold`` says). ``--format png|jpg|webp`` (default: the output file's suffix, else PNG; WebP is written
lossless). Each image is resized to ``--size`` (default: the size the weights or the export record),
normalised with the model's statistics, and the map is resized back to the image's size. Inputs that cannot
be read are listed on stderr and skipped; the exit code is then 1 (0 when all were written).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.render import FORMATS, MODES, TINT, TINT_OPACITY, Render  # noqa: F401 - shared with sodkd serve
from kd.schema import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

log = logging.getLogger(__name__)

_FORMAT_OF_SUFFIX = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cluster.predictor import BACKENDS, PRECISIONS

    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="MODEL:WEIGHTS, an exported .onnx / .pt2 (or legacy .ts) file, or "
                                       "models:/NAME/VERSION|latest (MLflow registry)")
    which.add_argument("--weights", type=Path, help="weights file written by save_weights")
    parser.add_argument("--input", required=True, type=Path, help="an image, a folder of images, or a video file")
    parser.add_argument("--output", required=True, type=Path,
                        help="image file or folder (image), folder (folder input), video file (video input)")
    parser.add_argument("--mode", choices=MODES, default="mask",
                        help="mask (default), cutout (RGBA), overlay (tinted image) or alpha (soft matte)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="binarise the mask at this probability (mask, cutout, overlay)")
    parser.add_argument("--format", choices=sorted(FORMATS), default=None,
                        help="output image format (default: the output file's suffix, else png)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass for a folder (default 8)")
    parser.add_argument("--size", type=int, default=None, help="inference resolution (default: the model's)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="eager, onnx, pt2 (auto: an exported file's own; weights: onnx on a CPU, eager on a GPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16 / bf16: eager on a GPU only")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads (default 1); torch threads for eager / pt2")
    parser.add_argument("--channels-last", action="store_true", help="eager: channels_last memory format")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--codec", default="libx264", choices=["libx264", "ffv1"],
                        help="codec of the output video (ffv1 = lossless, use .mkv)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop a video after this many frames")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Outcome:
    """What a run wrote and what it skipped (``(path, reason)``)."""

    written: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _read_rgb(path: Path) -> np.ndarray:
    from kd.imageio import decode_image

    return decode_image(path.read_bytes())


def make_predictor(model: str | None, weights: Path | None, size: int | None, device: str, backend: str = "auto",
                   precision: str = "fp32", threads: int | None = None, channels_last: bool = False):
    """``--model`` / ``--weights`` -> a :class:`cluster.predictor.Predictor`; a MODEL:WEIGHTS spec must name the
    model its file holds."""
    from cluster.predictor import Predictor
    from cluster.teachers import parse_teacher_spec

    if weights is not None:
        if not weights.is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file")
        spec = str(weights)
    else:
        parsed = parse_teacher_spec(model)
        if parsed.kind == "registered" and "://" not in parsed.path and not Path(parsed.path).is_file():
            raise FileNotFoundError(f"--model {model}: no such weights file {parsed.path}")
        spec = model
    return Predictor.load(spec, backend=backend, size=size, device=device, precision=precision,
                          threads=threads or 1, channels_last=channels_last)


def _progress(total: int, disable: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", disable=True if disable else None, file=sys.stderr)


def predict_video(pred, src: Path, dst: Path, codec: str = "libx264", max_frames: int | None = None,
                  render: Render | None = None) -> int:
    """Decode ``src`` with PyAV, predict every frame (streaming for video models), write the video ``dst``."""
    from kd.videoio import MaskVideoWriter, iter_frames, video_info

    render = render or Render()
    if render.mode == "cutout":
        raise ValueError("--mode cutout: a video file has no alpha channel; use mask, alpha or overlay")
    fps = video_info(src).fps or 25.0
    dst.parent.mkdir(parents=True, exist_ok=True)
    pred.reset()
    with MaskVideoWriter(dst, fps=fps, codec=codec) as writer:
        for _, frame in iter_frames(src, max_frames=max_frames):
            writer.write(render(frame, pred.predict_frame(frame)))
    return writer.frames


def list_images(src: Path) -> list[Path]:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def predict_folder(pred, src: Path, dst: Path, render: Render | None = None, batch: int = 8,
                   progress: bool = False) -> Outcome:
    """Outputs for every image below ``src`` into ``dst`` (same relative paths, the format's suffix).

    An image model runs ``batch`` images per forward pass; a video model streams each sub-folder as one
    sequence. Unreadable files are skipped and recorded in the outcome."""
    render = render or Render()
    files = list_images(src)
    out = Outcome()
    with _progress(len(files), not progress) as bar:
        if pred.is_video:
            folder = None
            for path in files:
                if path.parent != folder:       # a new sequence: a video model forgets the previous one
                    folder = path.parent
                    pred.reset()
                _run_batch(pred, [path], src, dst, render, out, streaming=True)
                bar.update(1)
        else:
            for i in range(0, len(files), max(1, int(batch))):
                chunk = files[i:i + max(1, int(batch))]
                _run_batch(pred, chunk, src, dst, render, out)
                bar.update(len(chunk))
    return out


def _run_batch(pred, paths: list[Path], src: Path, dst: Path, render: Render, out: Outcome,
               streaming: bool = False) -> None:
    images, kept = [], []
    for path in paths:
        try:
            images.append(_read_rgb(path))
            kept.append(path)
        except (OSError, ValueError) as e:    # ImageDecodeError is a ValueError; unreadable files an OSError
            out.skipped.append((path, str(e) or type(e).__name__))
    if not kept:
        return
    if streaming:
        probs = [pred.predict_frame(images[0])]
    else:
        probs = pred.predict(images)
    for path, rgb, prob in zip(kept, images, probs):
        target = dst / path.relative_to(src) if src.is_dir() else dst
        render.write(target.with_suffix(render.suffix) if src.is_dir() else target, render(rgb, prob))
        out.written += 1


def _render_for(args: argparse.Namespace, single_output: Path | None) -> Render:
    fmt = args.format
    if fmt is None and single_output is not None:
        fmt = _FORMAT_OF_SUFFIX.get(single_output.suffix.lower())
        if single_output.suffix and fmt is None:
            raise ValueError(f"--output {single_output}: expected .png, .jpg or .webp (or --format)")
    return Render(args.mode, args.threshold, fmt or "png")


def _report_skipped(out: Outcome) -> None:
    if out.skipped:
        print(f"{len(out.skipped)} input(s) could not be read and were skipped:", file=sys.stderr)
        for path, reason in out.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    src: Path = args.input
    if not src.exists():
        raise FileNotFoundError(f"--input {src}: no such file or folder")
    if args.batch < 1:
        raise ValueError(f"--batch: at least 1, got {args.batch}")
    is_video = src.is_file() and src.suffix.lower() in VIDEO_EXTENSIONS
    if is_video and args.output.suffix.lower() not in VIDEO_EXTENSIONS:
        raise ValueError(f"--output {args.output}: a video input needs a video output ({', '.join(VIDEO_EXTENSIONS)})")
    if src.is_file() and not is_video and src.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"--input {src}: not an image ({', '.join(IMAGE_EXTENSIONS)}), a video "
                         f"({', '.join(VIDEO_EXTENSIONS)}) or a folder")
    single = src.is_file() and not is_video and bool(args.output.suffix) and not args.output.is_dir()
    render = _render_for(args, args.output if single else None)
    pred = make_predictor(args.model, args.weights, args.size, args.device, args.backend, args.precision,
                          args.threads, args.channels_last)
    if args.threads and pred.backend in ("eager", "pt2"):
        import torch
        torch.set_num_threads(args.threads)
    mode = "streaming" if pred.is_video else "per frame"
    t0 = time.perf_counter()
    if src.is_dir():
        out = predict_folder(pred, src, args.output, render, args.batch, progress=not args.no_progress)
        n, what = out.written, f"{out.written} images -> {args.output}/"
    elif is_video:
        n = predict_video(pred, src, args.output, args.codec, args.max_frames, render)
        out, what = Outcome(written=n), f"{n} frames ({mode}) -> {args.output}"
    else:
        target = args.output if single else args.output / f"{src.stem}{render.suffix}"
        out = Outcome()
        _run_batch(pred, [src], src, target, render, out, streaming=pred.is_video)
        n, what = out.written, f"{out.written} image -> {target}"
    dt = time.perf_counter() - t0
    unit = "frames" if is_video else "images"
    print(f"{pred.name} ({pred.backend}) at {pred.size}: {what} in {dt:.1f} s ({n / dt:.1f} {unit}/s)")
    _report_skipped(out)
    return 1 if out.skipped else 0
