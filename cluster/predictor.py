"""The inference engine: one :class:`Predictor` in front of every way sodkd runs a saliency model.

``Predictor.load(spec, backend=...)`` takes what ``--model`` / ``--teacher`` take (``MODEL:WEIGHTS``, a weights
file, an exported ``.onnx`` / ``.pt2`` file, a legacy ``.ts``, a file with a teacher card) and one of the
backends:

- ``eager``: PyTorch eager mode, BatchNorm folded into the convolutions (:func:`models.fuse.fold_batchnorm`);
  ``channels_last`` memory format on request; ``fp16`` / ``bf16`` on a GPU only (CPU half-precision
  convolutions are slow or missing);
- ``onnx``: ONNX Runtime (CPU; the CUDA provider where it is installed and a CUDA device is asked for) with
  ``threads`` intra-op threads, 1 by default: for a network this small one thread is faster than two
  (issue 12: 96 vs 72 img/s for scfnet_m3 at 352 px), so throughput comes from one thread per process;
  an INT8 file from ``sodkd export --int8`` (:mod:`cluster.quantize`) runs here like the fp32 one;
- ``pt2``: a torch.export program (``torch.export.load``).

``models:/NAME/VERSION`` (MLflow registry) is downloaded and run as the exported file it holds.

A weights file runs through ``onnx`` or ``pt2`` by being exported first (:func:`cluster.export.export_teacher`);
an exported file runs in its own backend. ``auto`` picks the file's own backend; for weights it picks the
fastest backend measured for the device (``benchmarks/RESULTS.md``, section ``inference``): ``onnx`` on a CPU
(ONNX Runtime ran scfnet_m3 at 352 px 2.3x more images per CPU-second than eager PyTorch, and faster in every
size, batch and thread count measured), ``eager`` on a GPU, and ``eager`` for a video model (it streams its own
state). The exports a predictor makes from weights are kept in an export cache (:func:`export_cache_dir`:
``$SODKD_CACHE/exports``, else ``$XDG_CACHE_HOME/sodkd/exports``, ``~/.cache/sodkd/exports``), one file per
weights hash, size, format and exporter, so only the first run of a weights file pays for the export; where
no cache folder is writable, a temporary folder per predictor is used. The engine is the teacher machinery of :mod:`cluster.teachers`
(same loaders, same preprocessing, same cards), with images of any size in and maps at each image's size out:
each image is resized to the working size ``S`` (PIL bilinear, as :func:`kd.augment.preprocess`), normalised
with the model's statistics, run as one batch, and each map resized back bilinearly.

This module never imports Ray: ``sodkd predict`` and ``sodkd eval`` run without a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cluster.export import export_teacher
from cluster.teachers import (EagerTeacher, Teacher, TeacherSpecError, is_registry_spec, load_teacher,
                              parse_teacher_spec, resolve_registry_spec)

__all__ = ["Predictor", "BACKENDS", "PRECISIONS", "to_uint8", "export_cache_dir", "runtime_teacher"]

BACKENDS = ("auto", "eager", "onnx", "pt2")
PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FILE_BACKENDS = {"onnx": "onnx", "export": "pt2", "torchscript": "torchscript"}


class _EagerBackend(EagerTeacher):
    """:class:`EagerTeacher` with BatchNorm folded, an optional dtype (GPU) and memory format."""

    def __init__(self, teacher: EagerTeacher, dtype: torch.dtype, channels_last: bool, fold_bn: bool):
        from models.fuse import fold_batchnorm
        model = fold_batchnorm(teacher.model) if fold_bn else teacher.model
        super().__init__(model, teacher.id, teacher.weights_hash, teacher.device, False, teacher.input_size)
        self.dtype, self.channels_last = dtype, channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(dtype=dtype, memory_format=self.memory_format)

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        return self.model.predict(xn.to(self.dtype).contiguous(memory_format=self.memory_format))


class Predictor:
    """uint8 RGB images of any size -> saliency probabilities at each image's size, through one backend.

    Attributes:
        backend: ``eager``, ``onnx``, ``pt2`` (or ``torchscript`` for a legacy file).
        name: the model's name (``scfnet_m3``) or the exported file's id.
        size: the working size S every image is resized to.
        teacher: the :class:`cluster.teachers.Teacher` that runs the network (N, S, S, 3 -> N, S, S).
        model: the eager ``SODModel`` when there is one (``None`` for exported files).
        is_video: the model streams (``streamer()``): :meth:`predict_frame` runs one frame of a sequence.
    """

    def __init__(self, teacher: Teacher, backend: str, name: str, model: torch.nn.Module | None = None):
        self.teacher, self.backend, self.name, self.model = teacher, backend, name, model
        self.source: str | None = None        # the registry URI it came from (models:/...), if any
        self.size = int(teacher.input_size)
        self.stream = model.streamer() if model is not None and hasattr(model, "streamer") else None

    @classmethod
    def wrap(cls, teacher: Teacher) -> "Predictor":
        """A predictor over an already loaded teacher (an ensemble, a TTA wrapper or one network): the same
        pre- and post-processing as :meth:`load`, the teacher's own runtime."""
        if isinstance(teacher, EagerTeacher):
            return cls(teacher, "eager", getattr(teacher.model, "name", teacher.id), teacher.model)
        kinds = {"OnnxTeacher": "onnx", "ExportTeacher": "pt2", "TorchScriptTeacher": "torchscript",
                 "CardTeacher": "onnx"}
        return cls(teacher, kinds.get(type(teacher).__name__, type(teacher).__name__.lower()), teacher.id)

    @property
    def is_video(self) -> bool:
        return self.stream is not None

    @classmethod
    def load(cls, spec: str | Path, backend: str = "auto", size: int | None = None, device: str = "cpu",
             precision: str = "fp32", threads: int | None = 1, channels_last: bool = False, fold_bn: bool = True,
             onnx_exporter: str = "torchscript") -> "Predictor":
        """A predictor for ``spec`` (``MODEL:WEIGHTS``, a weights file, or an exported / carded model file).

        Args:
            backend: one of :data:`BACKENDS`; ``onnx`` / ``pt2`` on weights export them first (cached);
                ``auto``: an exported file's own, for weights ``onnx`` on a CPU and ``eager`` on a GPU or for a
                video model (the module docstring says why).
            size: working size (default: the one the weights or the export record).
            device: ``cpu``, ``cuda[:i]`` or ``auto``.
            precision: ``fp32``; ``fp16`` / ``bf16`` for the eager backend on a GPU.
            threads: ONNX Runtime intra-op threads (torch's are per process: the caller sets them).
            channels_last, fold_bn: eager backend options.
            onnx_exporter: how weights become ONNX for the ``onnx`` backend: the tracer-based ``torchscript``
                exporter (default: seconds; it writes ONNX, not TorchScript) or ``dynamo`` (``torch.export``,
                what ``sodkd export`` uses; a minute or more on 2 cores). Both give the same maps.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if is_registry_spec(str(spec)):       # models:/NAME/VERSION: the exported file it holds, run as such
            with tempfile.TemporaryDirectory(prefix="sodkd-registry-") as tmp:   # files are read into memory
                pred = cls.load(resolve_registry_spec(str(spec), tmp), backend, size, device, precision, threads,
                                channels_last, fold_bn, onnx_exporter)
            pred.source = str(spec)
            return pred
        text = _as_spec(spec)
        parsed = parse_teacher_spec(text)
        gpu = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if precision != "fp32" and not (gpu and backend in ("auto", "eager") and parsed.kind == "registered"):
            raise ValueError(f"precision {precision}: only the eager backend on a CUDA device runs in half "
                             "precision (CPU half-precision convolutions are slow or missing; exported files "
                             "run in the precision they were exported in)")
        if parsed.kind != "registered":
            own = _FILE_BACKENDS[parsed.kind]
            if backend not in ("auto", own):
                raise ValueError(f"backend {backend}: {text} is an exported file; it runs in its own backend "
                                 f"({own}); give the weights file to run it through {backend}")
            teacher = load_teacher(parsed, device=device, precision="fp32", input_size=size, threads=threads)
            return cls(teacher, own, teacher.id)
        eager = load_teacher(parsed, device=device, precision="fp32", input_size=size)
        assert isinstance(eager, EagerTeacher)
        model = eager.model
        video = hasattr(model, "streamer")
        if backend == "auto":
            backend = "eager" if gpu or video or precision != "fp32" else "onnx"
        if backend == "eager":
            if video:                          # a video model streams its own state: keep it as trained
                fold_bn = False
            runner = _EagerBackend(eager, _DTYPES[precision], channels_last, fold_bn)
            return cls(runner, "eager", model.name, runner.model)
        if video:
            raise ValueError(f"backend {backend}: {model.name} is a video model (it streams); run it eager")
        return cls(_exported(eager, backend, device, threads, onnx_exporter), backend, model.name, None)

    def describe(self) -> dict[str, Any]:
        d = {"backend": self.backend, "name": self.name, "size": self.size, **self.teacher.describe()}
        meta = getattr(self.teacher, "meta", None) or {}
        d["precision"] = meta.get("precision", "fp32")
        if self.source:
            d["source"] = self.source
        return d

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 (H_i, W_i, 3) RGB images -> float32 (H_i, W_i) probabilities in [0, 1], one batch."""
        from kd.imageio import resize
        if not len(images):
            return []
        s = self.size
        batch = np.stack([resize(_check_rgb(im), (s, s)) for im in images])
        probs = self.teacher.predict_tensor(batch)           # (N, S, S) on the teacher's device
        with torch.inference_mode():
            out = []
            for im, p in zip(images, probs):
                p = p.float()[None, None]
                if im.shape[:2] != (s, s):
                    p = F.interpolate(p, size=im.shape[:2], mode="bilinear", align_corners=False)
                out.append(p[0, 0].clamp(0, 1).cpu().numpy())
        return out

    def predict_uint8(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`predict` stored as 0..255 (``round(255 p)``): the maps SOD metrics and PNG files hold."""
        return [to_uint8(p) for p in self.predict(images)]

    def reset(self) -> None:
        """Start a new sequence (a video model forgets the frames before)."""
        if self.stream is not None:
            self.stream.reset()

    def predict_frame(self, rgb: np.ndarray) -> np.ndarray:
        """One frame of a sequence -> its float32 (H, W) map: streaming for a video model (the state carries over
        to the next call until :meth:`reset`), else :meth:`predict` of that one image."""
        if self.stream is None:
            return self.predict([rgb])[0]
        from kd.augment import preprocess
        m = self.model
        x = preprocess(_check_rgb(rgb), self.size, mean=m.mean, std=m.std)[None].to(self.teacher.device)
        with torch.inference_mode():
            p = self.stream.predict(x).float()
            if p.shape[-2:] != rgb.shape[:2]:
                p = F.interpolate(p, size=rgb.shape[:2], mode="bilinear", align_corners=False)
            return p[0, 0].clamp(0, 1).cpu().numpy()


def runtime_teacher(teacher: Teacher, backend: str = "auto", threads: int | None = 1,
                    onnx_exporter: str = "torchscript") -> Teacher:
    """A loaded teacher moved onto the predictor's backend: how labelling and online distillation run a weights
    file (:class:`cluster.teacher_actor.TeacherActor`) through the same engine as ``predict``.

    Only a registered model loaded from weights (an :class:`EagerTeacher`) changes: ``auto`` picks ``onnx`` on a
    CPU and keeps ``eager`` on a GPU or for a video model, as :meth:`Predictor.load` does; ``onnx`` / ``pt2``
    export it once into the export cache. Exported and carded files already run in their own backend and come
    back as they are. The id and weights hash stay those of the weights, so label rows name the same teacher
    whichever backend ran it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(teacher, EagerTeacher):
        return teacher
    video = hasattr(teacher.model, "streamer")
    gpu = teacher.device.type == "cuda"
    if backend == "auto":
        backend = "eager" if gpu or video else "onnx"
    if backend == "eager":
        return teacher
    if video:
        raise ValueError(f"backend {backend}: {teacher.model.name} is a video model (it streams); run it eager")
    if teacher.half:
        raise ValueError(f"backend {backend}: {teacher.id} was loaded in half precision; exported files run in "
                         "fp32 (use precision fp32, or the eager backend)")
    out = _exported(teacher, backend, str(teacher.device), threads, onnx_exporter)
    out.id = teacher.id
    return out


def _exported(eager: EagerTeacher, backend: str, device: str, threads: int | None, exporter: str) -> Teacher:
    """``eager``'s model exported as ``backend`` (through the export cache) and loaded as a teacher."""
    with _export_of(eager.model, eager.weights_hash, int(eager.input_size), backend, exporter) as path:
        teacher = load_teacher(str(path), device=device, precision="fp32", threads=threads)
    teacher.weights_hash = eager.weights_hash        # the weights it runs, not the export
    return teacher


def export_cache_dir() -> Path:
    """Where predictors keep the exports they make from weights: ``$SODKD_CACHE/exports``, else
    ``$XDG_CACHE_HOME/sodkd/exports`` (``~/.cache/sodkd/exports``)."""
    base = os.environ.get("SODKD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sodkd")
    return Path(base) / "exports"


@contextlib.contextmanager
def _export_of(model: torch.nn.Module, weights_hash: str, size: int, fmt: str, exporter: str):
    """The path of ``model`` exported as ``fmt``: from the export cache (written there on first use), or a
    temporary file where the cache folder cannot be written. The cache key is everything the file depends on:
    the weights hash, model config, size, format, exporter, export format version and torch version."""
    from cluster.teachers import EXPORT_FORMAT_VERSION
    key = repr((weights_hash, getattr(model, "config", {}), size, fmt, exporter if fmt == "onnx" else "",
                EXPORT_FORMAT_VERSION, str(torch.__version__)))
    name = f"{model.name}-{size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.{fmt}"
    path: Path | None = export_cache_dir() / name
    try:
        if not path.is_file():   # export_teacher writes atomically: a concurrent reader sees all or nothing
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            export_teacher(model, path, fmt, input_size=size, onnx_exporter=exporter)
    except OSError:              # no writable cache: export for this predictor only
        path = None
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sodkd-predictor-") as tmp:
        path = Path(tmp) / name
        export_teacher(model, path, fmt, input_size=size, onnx_exporter=exporter)
        yield path


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(255 p)``."""
    return (np.clip(prob, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _as_spec(spec: str | Path) -> str:
    """A bare weights file (``save_weights``) becomes ``MODEL:PATH`` from its header; anything else is a spec."""
    text = str(spec)
    path = Path(text)
    if path.suffix.lower() in (".pt", ".pth") and ":" not in text.split("/")[0]:
        from models import WeightsFormatError, read_metadata
        if not path.is_file():
            raise FileNotFoundError(f"{text}: no such weights file")
        try:
            return f"{read_metadata(path)['model']}:{text}"
        except WeightsFormatError as e:
            raise TeacherSpecError(f"{text}: {e} (give MODEL:{text} for a bare state dict)") from e
    return text


def _check_rgb(im: np.ndarray) -> np.ndarray:
    if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got "
                         f"{getattr(im, 'dtype', type(im).__name__)} {getattr(im, 'shape', '')}")
    return im

