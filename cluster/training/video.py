"""Spatiotemporal distillation of the video student: the video task of the training core.

``sodkd distill --task video``::

    label shards of video frames (``sodkd label`` on frame folders: rows carry sequence and frame)
      -> ClipSet (cluster.video_data): clips of T frames joined by key to their frames, augmented identically
         across each clip
      -> the training loop (:func:`cluster.training.loop.train_loop` with :class:`VideoTask`; Ray Train,
         ``scaling.num_workers: 0`` runs it in-process): the video student on (B, T, 3, S, S),
         kd.temporal.video_kd_loss = per-frame KD loss (config ``kd``) + change consistency + inter-frame relation
         [+ feature hint], SGD with the KD-SCFNet warm-up + cosine schedule, backbone at 0.1x
      -> every epoch: streaming evaluation on labelled sequences (rank 0; val/sm, val/maxf, val/mae,
         val/flicker), a checkpoint (latest + best by val/mae), MLflow metrics from rank 0
      -> the final weights (fp32 + fp16) and the MLflow model, as every job writes them.

What is the video task's own: the data (clips assembled on the worker from label shards instead of a Ray Data
row stream -- clips cross rows), the loss (needs the clip axis and the student's features, and trains a hint
adapter beside the student) and the validation (per sequence, streaming, with flicker). The shared config
sections keep their classes with video defaults; the loop, the checkpoints and their restore, the launch and
the export are the training core's.

Every choice the paper (Tang et al., arXiv 2010.10027) does not state is ours and sits in the config with its
reason: clips of 3 frames with stride 2, loss weights 1/1/1, relation targets from the teacher's soft labels (so
the teacher need not run online), training at 224.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from typing import Any, Literal, Mapping

import numpy as np

from cluster import storage, tracking
from cluster.storage import S3Config
from cluster.tracking import TrainTracking
from cluster.training.launch import config_from_init_weights, steps_per_epoch, train_and_export
from cluster.training.loop import Task
from cluster.training.sections import (DebugConfig, ModelConfig, OptimConfig, OutputConfig, RunSection,
                                       ScalingSection)
from kd import schema as S
from kd.augment import AugmentConfig
from kd.clips import ClipConfig
from kd.config import ConfigError, load_config, to_dict
from kd.step import KDLoss
from kd.temporal import HintAdapter, VideoKDConfig, video_kd_loss

log = logging.getLogger(__name__)

__all__ = ["VideoDataSection", "StillsConfig", "VideoValConfig", "VideoTrainConfig", "load_video_config",
           "count_clips", "build_student", "VideoTask", "run_video_distill", "VideoTrainOutcome", "VAL_FLICKER"]

VAL_FLICKER = "val/flicker"
VAL_FILE = "val.json"   # in a checkpoint: the last per-sequence validation (kd.video_eval results)


# --- configuration ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StillsConfig:
    """Still images mixed into every step (rehearsal): ``per_step`` clips of ``clip.length`` copies of one image.

    A video student fine-tuned on a few sequences fits them and loses saliency on scenes it has not seen; still
    images labelled by the teacher (an image ``sodkd label`` job's ``labels`` over ``images``) keep it learning
    single-image saliency while it learns the sequences. A still clip does not move, so the temporal terms
    ask for no change on it. ``per_step`` counts clips per worker, *added* to the step's video clips.
    """

    labels: str | None = None
    images: str | None = None
    per_step: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.per_step, int) and self.per_step >= 0):
            raise ConfigError(f"data.stills.per_step: must be an int >= 0, got {self.per_step!r}")
        if self.per_step and not (self.labels and self.images):
            raise ConfigError("data.stills.labels and data.stills.images: both are required when "
                              "data.stills.per_step > 0 (an image label job's output and input)")


@dataclasses.dataclass(frozen=True)
class VideoDataSection:
    """Where the clips come from and how they are prepared.

    Attributes:
        labels: output of ``sodkd label`` over video frame folders (its ``labels/`` shards; local or ``s3://``).
        images: the folder that labelling job read; label keys are paths relative to it.
        clip: how clips are cut (``kd.clips.ClipConfig``: 3 frames, stride 2, adjacent frames).
        size: training resolution, square (ours: 224, the smallest of KD-SCFNet's scales, for CPU runs).
        augment: KD-SCFNet's augmentation, replayed identically on every frame of a clip.
        cache: keep decoded frames in worker memory (right for a few thousand frames).
        sequences: train on these sequences only (hold the others out); None = every labelled sequence.
        stills: still images mixed into every step (:class:`StillsConfig`; off by default).
    """

    labels: str = ""
    images: str = ""
    sequences: tuple[str, ...] | None = None
    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    size: int = 224
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    cache: bool = True
    stills: StillsConfig = dataclasses.field(default_factory=StillsConfig)

    def __post_init__(self) -> None:
        if not self.labels or not self.images:
            raise ConfigError("data.labels and data.images: both are required (the label job's output and input)")
        if self.size < 32:
            raise ConfigError(f"data.size: must be >= 32, got {self.size}")


@dataclasses.dataclass(frozen=True)
class VideoValConfig:
    """Streaming evaluation on labelled sequences (``ROOT/<seq>/images`` + ``masks``) every ``every`` epochs.

    ``uri`` None = no validation (then the last weights are the final ones). ``sequences`` / ``max_frames``
    restrict the work; ``size`` is the inference resolution.
    """

    uri: str | None = None
    sequences: tuple[str, ...] | None = None
    max_frames: int | None = None
    size: int = 224
    every: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"val.every: must be >= 1, got {self.every}")


@dataclasses.dataclass(frozen=True)
class VideoTrainConfig:
    """Everything a video distillation job needs; one dict crosses into Ray and, flattened, into MLflow.

    Attributes:
        data: the label shards and frames (required).
        model: the student (``video_scfnet_m3``); ``model.init_weights`` may hold an *image* student's weights
            (copied into the shared encoder/decoder by ``VideoSCFNet.init_from_image``) or a video student's.
        teacher: the teacher's weights (``models.save_weights`` file), needed only for the feature terms
            (``loss.hint`` > 0 or ``loss.relation_target: teacher_features``); soft labels come from the shards.
        loss: the weights of the spatial, temporal and feature terms (:class:`kd.temporal.VideoKDConfig`).
        kd: what the spatial term is, per frame: the image trainer's section and class (:class:`kd.step.KDLoss`:
            structure, per-pixel term, confidence weights, sharpening). The class default is KD-SCFNet's soft
            dice alone; ``jobs/configs/distill-video.yaml`` sets dice + BCE, as the image job's file does.
        optim: as the image trainer's; ``batch_size`` counts clips (global, split over workers).
        debug: fault injection for tests, as the image trainer's (``sections.DebugConfig``).
    """

    data: VideoDataSection
    mode: Literal["distill-video"] = "distill-video"
    model: ModelConfig = dataclasses.field(default_factory=lambda: _SECTION_DEFAULTS["model"]())
    teacher: str | None = None
    loss: VideoKDConfig = dataclasses.field(default_factory=VideoKDConfig)
    kd: KDLoss = dataclasses.field(default_factory=KDLoss)
    val: VideoValConfig = dataclasses.field(default_factory=VideoValConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: _SECTION_DEFAULTS["optim"]())
    scaling: ScalingSection = dataclasses.field(default_factory=lambda: _SECTION_DEFAULTS["scaling"]())
    run: RunSection = dataclasses.field(default_factory=lambda: _SECTION_DEFAULTS["run"]())
    mlflow: TrainTracking = dataclasses.field(default_factory=lambda: _SECTION_DEFAULTS["mlflow"]())
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)

    def __post_init__(self) -> None:
        from models import create_model
        if not hasattr(create_model(self.model.name, **self.model.kwargs), "streamer"):
            raise ConfigError(f"model.name: {self.model.name!r} is not a video model (it has no streamer())")
        if self.loss.needs_teacher_features and not self.teacher:
            raise ConfigError("teacher: the loss uses teacher features (loss.hint > 0 or "
                              "loss.relation_target: teacher_features), so a teacher weights file is required")
        if self.scaling.strategy != "ddp":
            raise ConfigError("scaling.strategy: the video trainer supports ddp only")
        if self.output.calibrate:
            raise ConfigError("output.calibrate: the video trainer validates on sequences; calibrate its file on "
                              "image pairs with `sodkd calibrate --weights FILE --val ROOT`")
        self.debug.check(self.scaling.num_workers)
        self.scaling.per_worker(self.optim.batch_size)

    @property
    def per_worker_batch(self) -> int:
        """Clips per step on each worker."""
        return self.scaling.per_worker(self.optim.batch_size)


# The shared sections keep the image trainer's classes, with video defaults: a short CPU-sized run in-process,
# 4 clips per step at lr 0.01 (the paper's 0.064 at 128 images scaled to ~12 frames, rounded up), its own
# MLflow experiment, no ONNX export (it would hold the single-frame graph only).
_SECTION_DEFAULTS = {
    "model": lambda: ModelConfig(name="video_scfnet_m3"),
    "optim": lambda: OptimConfig(epochs=10, batch_size=4, lr=0.01, lr_start=1e-4, lr_final=1e-4, warmup_epochs=0.5),
    "scaling": lambda: ScalingSection(num_workers=0),
    "run": lambda: RunSection(name="kdvideo-video_scfnet_m3"),
    "mlflow": lambda: TrainTracking(experiment="sodkd-video", onnx=False),
}


def load_video_config(source: Any = None, overrides: Any = None) -> VideoTrainConfig:
    """YAML path or mapping + dotted overrides -> :class:`VideoTrainConfig` (strict, see :mod:`kd.config`).

    A section given in part (``optim: {epochs: 3}``) keeps the video defaults of its other keys, not the
    image trainer's class defaults (which would mean 69 epochs of batch 128).
    """
    from kd.config import _merge, load_yaml

    data = load_yaml(source) if isinstance(source, (str, os.PathLike)) else dict(source or {})
    defaults = {name: to_dict(make()) for name, make in _SECTION_DEFAULTS.items()}
    return load_config(VideoTrainConfig, _merge(defaults, data), overrides)


# --- pieces ----------------------------------------------------------------------------------------------

def count_clips(cfg: VideoTrainConfig) -> tuple[int, int]:
    """(clips, frames) the label shards give, read from the ``sequence``/``frame`` columns only."""
    from cluster.labels import read_labels
    from cluster.video_data import select_sequences
    from kd.clips import assemble_clips

    table = select_sequences(read_labels(cfg.data.labels, cfg.s3, columns=[S.SEQUENCE, S.FRAME]), cfg.data.sequences)
    clips = assemble_clips(table.column(S.SEQUENCE).to_pylist(), table.column(S.FRAME).to_pylist(), cfg.data.clip)
    return len(clips), table.num_rows


def _read(uri: str, s3: S3Config | None) -> bytes:
    fs, path = storage.get_filesystem(uri, s3)
    return storage.read_bytes(fs, path)


def build_student(cfg: VideoTrainConfig):
    """The student of ``cfg.model``, initialised from ``model.init_weights`` (an image or a video student).

    A calibrated image file (``sodkd calibrate``: its scale folded into the finest head) starts the video student
    from the image student *as trained*: the scale is undone first, as the image trainer does."""
    from models import create_model, load_weights, read_metadata
    from models.fuse import undo_output_scale

    model = create_model(cfg.model.name, **cfg.model.kwargs)
    if cfg.model.init_weights:
        data = _read(cfg.model.init_weights, cfg.s3)
        meta = read_metadata(io.BytesIO(data))
        source = load_weights(io.BytesIO(data))
        if undo_output_scale(source, meta) != 1.0:      # a calibrated image file: train on from it as trained
            log.info("model.init_weights %s: its output scale %g undone", cfg.model.init_weights,
                     meta["output_scale"])
        if meta["model"] == cfg.model.name:
            model.load_state_dict(source.state_dict())
        else:
            try:
                new = model.init_from_image(source.state_dict())
            except ValueError as e:
                raise ConfigError(f"model.init_weights: {cfg.model.init_weights} holds {meta['model']!r} weights, "
                                  f"which do not fit {cfg.model.name!r}: {e}") from e
            log.info("%s starts from %s (%s); %d new tensors", cfg.model.name, cfg.model.init_weights,
                     meta["model"], len(new))
    return model


def _batch_tensors(model, clips: list[tuple[np.ndarray, np.ndarray]], device):
    """Clips of (T, S, S, 3) uint8 frames and (T, S, S) labels -> normalised (B, T, 3, S, S), (B, T, 1, S, S)."""
    import torch
    frames = torch.from_numpy(np.stack([c[0] for c in clips]))
    b, t = frames.shape[:2]
    x = model.normalize(frames.flatten(0, 1).permute(0, 3, 1, 2)).unflatten(0, (b, t))
    y = torch.from_numpy(np.stack([c[1] for c in clips])).unsqueeze(2)
    return x.to(device), y.to(device)


def validate(cfg: VideoTrainConfig, model, sequences) -> tuple[dict[str, float], dict]:
    """Streaming evaluation of ``model`` on the loaded ``sequences``: (val/* metrics, full results)."""
    from kd.video_eval import VideoEvaluator, predict_frames
    was_training = model.training
    ev = VideoEvaluator()
    try:
        for name, (frames, masks) in sequences.items():
            ev.add_sequence(name, predict_frames(model, frames, cfg.val.size), masks)
    finally:
        model.train(was_training)
    res = ev.results()
    o = res["overall"]
    return {S.VAL_MAE: o["mae"], S.VAL_SM: o["sm"], S.VAL_MAXF: o["fm_max"], S.VAL_EM: o["em_mean"],
            VAL_FLICKER: o["flicker"]}, res


# --- the task (every worker) -------------------------------------------------------------------------------

class VideoTask(Task):
    """The video job's task for :func:`cluster.training.loop.train_loop`: a batch is ``per_worker_batch`` clips
    of this worker's slice of a seeded permutation, the loss :func:`kd.temporal.video_kd_loss` (with a hint
    adapter trained beside the student when ``loss.hint`` > 0), the validation :func:`validate`."""

    meta = {"history": []}

    def __init__(self, config: Mapping):
        self.cfg: VideoTrainConfig = load_video_config(config)
        self.val_data = self.val_results = None
        self.teacher = self.adapter = None

    def build(self, rank: int, device):
        from models import load_weights
        cfg = self.cfg
        model = build_student(cfg)
        if cfg.loss.needs_teacher_features:
            self.teacher = load_weights(io.BytesIO(_read(cfg.teacher, cfg.s3)), map_location=str(device)).eval()
            self.teacher.requires_grad_(False)
        if cfg.loss.hint > 0:
            self.adapter = HintAdapter(model.channels, self.teacher.channels)
        return model, ({"adapter": self.adapter} if self.adapter is not None else {})

    def open(self, rank: int, world: int, steps: int, tracker) -> None:
        from cluster.video_data import ClipSet, load_sequences
        cfg = self.cfg
        self.clips = ClipSet.from_labels(cfg.data.labels, cfg.data.images, cfg.s3, clip=cfg.data.clip,
                                         augment=cfg.data.augment, cache=cfg.data.cache,
                                         sequences=cfg.data.sequences)
        st = cfg.data.stills
        self.stills = ClipSet.from_labels(st.labels, st.images, cfg.s3, clip=cfg.data.clip, augment=cfg.data.augment,
                                          cache=cfg.data.cache, stills=True) if st.per_step else None
        batch = cfg.per_worker_batch
        if len(self.clips) < steps * batch * world:
            raise RuntimeError(f"{cfg.data.labels}: the worker sees {len(self.clips)} clips, the driver counted "
                               f"enough for {steps} steps of {batch * world}; did the label shards change?")
        self.steps = steps
        if rank == 0 and cfg.val.uri:
            self.val_data = load_sequences(cfg.val.uri, cfg.val.sequences, cfg.val.max_frames, cfg.s3)

    def batches(self, epoch: int, rank: int, world: int):
        cfg, batch = self.cfg, self.cfg.per_worker_batch
        order = np.random.default_rng([cfg.run.seed, epoch]).permutation(len(self.clips))
        n_still = cfg.data.stills.per_step if self.stills is not None else 0
        still_order = np.random.default_rng([cfg.run.seed, epoch, 1]).permutation(len(self.stills)) if n_still else []
        for it in range(self.steps):
            first = (it * world + rank) * batch
            rng = np.random.default_rng([cfg.run.seed, epoch, it, rank])
            clips = [self.clips.sample(int(i), rng, cfg.data.size) for i in order[first:first + batch]]
            start = (it * world + rank) * n_still       # the stills cycle when the epoch needs more than there are
            yield clips + [self.stills.sample(int(still_order[(start + j) % len(still_order)]), rng, cfg.data.size)
                           for j in range(n_still)]

    def loss(self, net, module, batch, device, dtype):
        import torch
        x, y = _batch_tensors(module, batch, device)
        outs, feats = net(x, return_features=True)
        teacher_feat = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_feat = self.teacher.encode(x.flatten(0, 1))[3].unflatten(0, tuple(x.shape[:2]))
        loss, parts = video_kd_loss(outs, y, self.cfg.loss, feats["f5t"], teacher_feat, self.adapter, self.cfg.kd)
        return loss, parts, len(batch)

    @property
    def validates(self) -> bool:
        return self.val_data is not None

    def validate(self, module, dtype, epoch: int) -> dict[str, float]:
        metrics, self.val_results = validate(self.cfg, module, self.val_data)
        return metrics

    def write_checkpoint(self, path: str) -> None:
        if self.val_results is not None:
            with open(os.path.join(path, VAL_FILE), "w") as f:
                json.dump(self.val_results, f, indent=1, default=float)


# --- the driver ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class VideoTrainOutcome:
    """What :func:`run_video_distill` returns."""

    run_name: str
    checkpoint: str | None          # URI of the latest checkpoint
    weights: list[str]              # final weight files (best by val/mae, else last)
    metrics: dict[str, float]       # the last epoch's reported metrics
    history: list[dict]             # per-epoch metrics (mean losses, val/*)
    validation: dict | None         # the last per-sequence validation (kd.video_eval results)
    best_mae: float | None
    mlflow_run_id: str | None
    clips: int
    frames: int
    steps_per_epoch: int
    wall_s: float
    resumed_from: list[int]


def run_video_distill(cfg: VideoTrainConfig) -> VideoTrainOutcome:
    """Count clips, then train and export (:func:`cluster.training.launch.train_and_export`): the loop runs
    :class:`VideoTask` under ``TorchTrainer`` (or in-process); the last validation's per-sequence figures go
    to MLflow."""
    t0 = time.perf_counter()
    cfg = config_from_init_weights(cfg)
    n_clips, n_frames = count_clips(cfg)
    spe = steps_per_epoch(n_clips, cfg.optim.batch_size, cfg.scaling.num_workers)
    log.info("%d clips of %d frames from %d labelled frames; %d steps per epoch", n_clips, cfg.data.clip.length,
             n_frames, spe)
    out = train_and_export(cfg, spe, data_metrics={"data/clips": n_clips, "data/frames": n_frames,
                                                   "data/steps_per_epoch": spe},
                           read=_read_validation, finish=lambda run_id, val: _log_sequences(cfg, run_id, val))
    return VideoTrainOutcome(cfg.run.name, out.checkpoint, out.weights, out.metrics, out.meta.get("history", []),
                             out.extra, out.meta.get("best_mae"), out.mlflow_run_id, n_clips, n_frames, spe,
                             time.perf_counter() - t0, list(out.meta.get("resumed_from", [])))


def _read_validation(checkpoint_dir: str) -> dict | None:
    path = os.path.join(checkpoint_dir, VAL_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _log_sequences(cfg: VideoTrainConfig, run_id: str, validation: Mapping[str, Any] | None) -> None:
    """Per-sequence figures of the last validation as ``val_seq/<seq>/<metric>`` and a JSON artifact."""
    if not validation:
        return
    from mlflow.entities import Metric
    client = tracking.mlflow_client(cfg.mlflow)
    now = int(time.time() * 1000)
    metrics = [Metric(f"val_seq/{seq}/{k}", float(figs[k]), now, 0)
               for seq, figs in validation["sequences"].items() for k in ("sm", "fm_max", "mae", "flicker")
               if figs.get(k) is not None and np.isfinite(figs[k])]
    for i in range(0, len(metrics), 200):
        client.log_batch(run_id, metrics=metrics[i:i + 200])
    client.log_dict(run_id, validation, "validation/sequences.json")

