"""``sodkd predict --model SPEC --input X --output Y``: saliency maps for an image, a folder or a video file.

``SPEC`` is what ``sodkd label --teacher`` takes: ``MODEL:WEIGHTS`` (a ``save_weights`` file), a TorchScript
file (``.ts``) or an ONNX file (``.onnx``) written by ``sodkd export``; ``--weights W`` is short for a weights
file whose header names the model.

- **image file** -> ``Y`` is a PNG file (or a folder, which gets ``<stem>.png``);
- **folder** -> ``Y/<relative path>.png`` for every image below it. With a video model (one that has a
  ``streamer()``, e.g. ``video_scfnet_m3``) the images of each sub-folder are taken as the consecutive frames of a
  sequence (sorted by name) and run in streaming mode; an image model runs them one by one;
- **video file** (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``, decoded with PyAV) -> ``Y`` is a mask video
  (H.264 at the source frame rate; ``--codec ffv1`` with ``.mkv`` for lossless) with one grayscale map per frame,
  streamed through a video model or run per frame through an image model.

Each frame is resized to ``--size`` (default: the model's ``input_size``), normalised with the model's statistics,
and the map ``sigmoid(finest output)`` is resized back to the frame's size and stored as 0..255.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from kd.schema import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="MODEL:WEIGHTS, or an exported .ts / .onnx file")
    which.add_argument("--weights", type=Path, help="weights file written by save_weights")
    parser.add_argument("--input", required=True, type=Path, help="an image, a folder of images, or a video file")
    parser.add_argument("--output", required=True, type=Path,
                        help="PNG file or folder (image), folder (folder input), video file (video input)")
    parser.add_argument("--size", type=int, default=None, help="inference resolution (default: the model's)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--codec", default="libx264", choices=["libx264", "ffv1"],
                        help="codec of the mask video (ffv1 = lossless, use .mkv)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop a video after this many frames")


def _read_rgb(path: Path) -> np.ndarray:
    from kd.imageio import decode_image

    return decode_image(path.read_bytes())


def _write_png(path: Path, gray: np.ndarray) -> None:
    from kd.imageio import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(gray))


class _Predictor:
    """One model, fed frame by frame; ``reset()`` starts a new sequence for a video model."""

    def __init__(self, weights: Path, size: int | None, device: str):
        import torch

        from models import load_weights

        self.torch = torch
        self.model = load_weights(weights, map_location=device).eval()
        self.size = int(size or self.model.input_size)
        self.device = device
        self.is_video = hasattr(self.model, "streamer")
        self.stream = self.model.streamer() if self.is_video else None

    def reset(self) -> None:
        if self.stream is not None:
            self.stream.reset()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from kd.augment import postprocess, preprocess

        x = preprocess(rgb, self.size, mean=self.model.mean, std=self.model.std)[None].to(self.device)
        with self.torch.inference_mode():
            prob = self.stream.predict(x) if self.stream is not None else self.model.predict(x)
        return postprocess(prob, rgb.shape[:2])


class _ExportedPredictor(_Predictor):
    """An exported TorchScript / ONNX model (fixed input size), run frame by frame."""

    def __init__(self, spec: str, device: str):
        from cluster.teachers import build_teacher

        self.teacher = build_teacher(spec, device=device)
        self.size, self.device, self.is_video, self.stream = self.teacher.input_size, device, False, None
        self.model = type("Exported", (), {"name": self.teacher.id})()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from kd.imageio import resize

        prob = self.teacher.predict(resize(rgb, (self.size, self.size))[None])[0]
        return resize((np.clip(prob, 0, 1) * 255 + 0.5).astype(np.uint8), rgb.shape[:2])


def make_predictor(model: str | None, weights: Path | None, size: int | None, device: str) -> _Predictor:
    """``--model`` / ``--weights`` -> a predictor; a MODEL:WEIGHTS spec must name the model its file holds."""
    if weights is not None:
        if not weights.is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file")
        return _Predictor(weights, size, device)
    from cluster.teachers import parse_teacher_spec

    spec = parse_teacher_spec(model)
    if spec.kind != "registered":
        if size is not None:
            raise ValueError(f"--size: {model} is exported at a fixed size; leave --size out")
        return _ExportedPredictor(model, device)
    if not Path(spec.path).is_file():
        raise FileNotFoundError(f"--model {model}: no such weights file {spec.path}")
    pred = _Predictor(Path(spec.path), size, device)
    if pred.model.name != spec.model:
        raise ValueError(f"--model {model}: the weights file holds {pred.model.name}, not {spec.model}")
    return pred


def predict_video(pred: _Predictor, src: Path, dst: Path, codec: str = "libx264",
                  max_frames: int | None = None) -> int:
    """Decode ``src`` with PyAV, predict every frame (streaming for video models), write the mask video ``dst``."""
    from kd.videoio import MaskVideoWriter, iter_frames, video_info

    fps = video_info(src).fps or 25.0
    dst.parent.mkdir(parents=True, exist_ok=True)
    pred.reset()
    with MaskVideoWriter(dst, fps=fps, codec=codec) as writer:
        for _, frame in iter_frames(src, max_frames=max_frames):
            writer.write(pred(frame))
    return writer.frames


def predict_folder(pred: _Predictor, src: Path, dst: Path) -> int:
    """Maps for every image below ``src`` into ``dst`` (same relative paths, ``.png``); sub-folders are sequences."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    folder = None
    for path in files:
        if path.parent != folder:       # a new sequence: a video model forgets the previous one
            folder = path.parent
            pred.reset()
        _write_png((dst / path.relative_to(src)).with_suffix(".png"), pred(_read_rgb(path)))
    return len(files)


def run(args: argparse.Namespace) -> int:
    src: Path = args.input
    if not src.exists():
        raise FileNotFoundError(f"--input {src}: no such file or folder")
    pred = make_predictor(args.model, args.weights, args.size, args.device)
    mode = "streaming" if pred.is_video else "per frame"
    t0 = time.perf_counter()
    if src.is_dir():
        n = predict_folder(pred, src, args.output)
        what = f"{n} images -> {args.output}/"
    elif src.suffix.lower() in VIDEO_EXTENSIONS:
        if args.output.suffix.lower() not in VIDEO_EXTENSIONS:
            raise ValueError(f"--output {args.output}: a video input needs a video output "
                             f"({', '.join(VIDEO_EXTENSIONS)})")
        n = predict_video(pred, src, args.output, args.codec, args.max_frames)
        what = f"{n} frames ({mode}) -> {args.output}"
    elif src.suffix.lower() in IMAGE_EXTENSIONS:
        out = args.output / f"{src.stem}.png" if args.output.is_dir() or not args.output.suffix else args.output
        _write_png(out, pred(_read_rgb(src)))
        n, what = 1, f"1 image -> {out}"
    else:
        raise ValueError(f"--input {src}: not an image ({', '.join(IMAGE_EXTENSIONS)}), a video "
                         f"({', '.join(VIDEO_EXTENSIONS)}) or a folder")
    dt = time.perf_counter() - t0
    print(f"{pred.model.name} at {pred.size}: {what} in {dt:.1f} s ({n / dt:.1f} frames/s)")
    return 0
