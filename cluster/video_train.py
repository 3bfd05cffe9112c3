"""Spatiotemporal distillation of the video student, on the training core of :mod:`cluster.train`.

``sodkd distill --task video``::

    label shards of video frames (``sodkd label`` on frame folders: rows carry sequence and frame)
      -> ClipSet (cluster.video_data): clips of T frames joined by key to their frames, augmented identically
         across each clip
      -> video_train_loop (Ray Train; ``scaling.num_workers: 0`` runs it in-process): the video student on
         (B, T, 3, S, S), kd.temporal.video_kd_loss = per-frame soft dice + change consistency + inter-frame
         relation [+ feature hint], SGD with the KD-SCFNet warm-up + cosine schedule, backbone at 0.1x
      -> every epoch: streaming evaluation on labelled sequences (rank 0; val/sm, val/maxf, val/mae,
         val/flicker), a checkpoint (latest + best by val/mae), MLflow metrics from rank 0
      -> the final weights (fp32 + fp16) and the MLflow model, as the image trainer writes them.

What is shared with the image trainer (:mod:`cluster.train`), not re-implemented here: the config sections
(``ModelConfig``, ``OptimConfig``, ``ScalingSection``, ``RunSection``, ``TrainTracking``, ``OutputConfig``,
``DebugConfig``), the worker's device, the MLflow run found or created by its ``sodkd.run_name`` tag (its URI
pinned for the workers), the checkpoints and their restore (:mod:`cluster.checkpoint`), rank 0's metric
batching, the launch under ``TorchTrainer`` and the final export. What differs and lives here: the data (clips
assembled on the worker from label shards instead of a Ray Data row stream -- clips cross rows), the loss
(needs the clip axis and the student's features) and the validation (per sequence, streaming, with flicker).

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
import shutil
import tempfile
import time
from typing import Any, Literal, Mapping

import numpy as np

from cluster import storage, tracking
from cluster.training import launch as L
from cluster.training.checkpoint import (BEST_FILE, META_FILE, STATE_FILE, persist_local_checkpoint,
                                         restore_checkpoint, save_checkpoint_dir)
from cluster.storage import S3Config
from cluster.tracking import TrainTracking
from cluster.training.loop import inject_failure, start_worker, unwrap
from cluster.training.sections import (DebugConfig, ModelConfig, OptimConfig, OutputConfig, RunSection,
                                      ScalingSection)
from kd import schema as S
from kd.augment import AugmentConfig
from kd.clips import ClipConfig
from kd.config import ConfigError, load_config, to_dict
from kd.temporal import HintAdapter, VideoKDConfig, video_kd_loss

log = logging.getLogger(__name__)

__all__ = ["VideoDataSection", "VideoValConfig", "VideoTrainConfig", "load_video_config", "count_clips",
           "build_student", "video_train_loop", "run_video_distill", "VideoTrainOutcome", "VAL_FLICKER"]

VAL_FLICKER = "val/flicker"
TMP_PREFIX = "sodkd-vckpt-"


# --- configuration ---------------------------------------------------------------------------------------

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
    """

    labels: str = ""
    images: str = ""
    sequences: tuple[str, ...] | None = None
    clip: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    size: int = 224
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    cache: bool = True

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
        optim: as the image trainer's; ``batch_size`` counts clips (global, split over workers).
        debug: fault injection for tests, as the image trainer's (``cluster.train.DebugConfig``).
    """

    data: VideoDataSection
    mode: Literal["distill-video"] = "distill-video"
    model: ModelConfig = dataclasses.field(default_factory=lambda: _SECTION_DEFAULTS["model"]())
    teacher: str | None = None
    loss: VideoKDConfig = dataclasses.field(default_factory=VideoKDConfig)
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
    """The student of ``cfg.model``, initialised from ``model.init_weights`` (an image or a video student)."""
    from models import create_model, load_weights, read_metadata

    model = create_model(cfg.model.name, **cfg.model.kwargs)
    if cfg.model.init_weights:
        data = _read(cfg.model.init_weights, cfg.s3)
        meta = read_metadata(io.BytesIO(data))
        source = load_weights(io.BytesIO(data))
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


# --- the training loop (every worker) ----------------------------------------------------------------------

def video_train_loop(config: dict) -> dict:
    """Ray Train worker function: ``config`` is ``to_dict(VideoTrainConfig)`` plus ``_runtime`` from the driver
    (``steps_per_epoch``, ``mlflow_run_id``). Returns a summary (epochs, step, last metrics, per-epoch losses)."""
    import ray.train
    import ray.train.torch
    import torch

    from cluster.video_data import ClipSet, load_sequences
    from kd.schedule import set_lr, with_lr_mult
    from models import create_model, load_weights

    runtime = dict(config.get("_runtime", {}))
    cfg = load_video_config({k: v for k, v in config.items() if k != "_runtime"})
    rank, world, device = start_worker(cfg.scaling, cfg.run.seed)
    in_process = cfg.scaling.num_workers == 0

    clips = ClipSet.from_labels(cfg.data.labels, cfg.data.images, cfg.s3, clip=cfg.data.clip,
                                augment=cfg.data.augment, cache=cfg.data.cache, sequences=cfg.data.sequences)
    batch = cfg.per_worker_batch
    steps = int(runtime["steps_per_epoch"])
    if len(clips) < steps * batch * world:
        raise RuntimeError(f"{cfg.data.labels}: the worker sees {len(clips)} clips, the driver counted enough "
                           f"for {steps} steps of {batch * world}; did the label shards change?")
    schedule = cfg.optim.schedule(steps)

    model = build_student(cfg)
    teacher = adapter = None
    if cfg.loss.needs_teacher_features:
        teacher = load_weights(io.BytesIO(_read(cfg.teacher, cfg.s3)), map_location=str(device)).eval()
        teacher.requires_grad_(False)
    if cfg.loss.hint > 0:
        adapter = HintAdapter(model.channels, teacher.channels)
    groups = with_lr_mult(model.param_groups(cfg.optim.lr, cfg.optim.backbone_lr_mult), cfg.optim.lr)
    if adapter is not None:
        groups.append({"name": "adapter", "params": list(adapter.parameters()), "lr": cfg.optim.lr, "lr_mult": 1.0})
    optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)

    # -- resume (the image trainer's checkpoint layout; in-process runs persist it themselves) ---------------
    meta: dict[str, Any] = {"epoch": 0, "step": 0, "best_mae": None, "best_epoch": None, "history": [],
                            "mlflow_run_id": runtime.get("mlflow_run_id"), "resumed_from": []}
    restored = restore_checkpoint(meta, model, lambda: create_model(cfg.model.name, **cfg.model.kwargs),
                                  run=cfg.run, s3=cfg.s3, in_process=in_process, rank=rank)
    best_state = restored.best_state if restored else None
    net = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    module = unwrap(net)
    if adapter is not None:
        adapter.to(device)
    if restored:   # after the move to the device: state follows the params
        state = restored.state(device)
        optimizer.load_state_dict(state["optimizer"])
        if adapter is not None and "adapter" in state:
            adapter.load_state_dict(state["adapter"])
        restored.close()

    val_data = (load_sequences(cfg.val.uri, cfg.val.sequences, cfg.val.max_frames, cfg.s3)
                if rank == 0 and cfg.val.uri else None)
    tracker = tracking.RankTracker(cfg.mlflow, meta["mlflow_run_id"], rank)
    step = int(meta["step"])
    last: dict[str, float] = {}
    val_results = None
    prev_tmp = None
    t_start = time.perf_counter()

    for epoch in range(int(meta["epoch"]), cfg.optim.epochs):
        net.train()
        order = np.random.default_rng([cfg.run.seed, epoch]).permutation(len(clips))
        sums: dict[str, float] = {}
        for it in range(steps):
            first = (it * world + rank) * batch
            rng = np.random.default_rng([cfg.run.seed, epoch, it, rank])
            x, y = _batch_tensors(module, [clips.sample(int(i), rng, cfg.data.size)
                                           for i in order[first:first + batch]], device)
            lr = schedule(step)
            set_lr(optimizer, lr)
            outs, feats = net(x, return_features=True)
            teacher_feat = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_feat = teacher.encode(x.flatten(0, 1))[3].unflatten(0, tuple(x.shape[:2]))
            loss, parts = video_kd_loss(outs, y, cfg.loss, feats["f5t"], teacher_feat, adapter)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.run.name}: loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            values = {S.TRAIN_LOSS: float(loss.detach()), **{f"train/{k}": float(v) for k, v in parts.items()}}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if step % tracker.every == 0:
                tracker.metrics({**values, S.TRAIN_LR: lr}, step)
            inject_failure(cfg.debug, step, rank, tracker.flush)

        # -- end of epoch: validate, checkpoint, report ---------------------------------------------------
        metrics: dict[str, float] = {"epoch": epoch + 1, "step": step,
                                     **{k: v / steps for k, v in sums.items()}}
        if val_data is not None and ((epoch + 1) % cfg.val.every == 0 or epoch + 1 == cfg.optim.epochs):
            val_metrics, val_results = validate(cfg, module, val_data)
            metrics.update(val_metrics)
            if meta["best_mae"] is None or metrics[S.VAL_MAE] < meta["best_mae"]:
                meta["best_mae"], meta["best_epoch"] = metrics[S.VAL_MAE], epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        meta["epoch"], meta["step"] = epoch + 1, step
        meta["history"] = list(meta["history"]) + [{k: v for k, v in metrics.items() if np.isfinite(v)}]
        log.info("epoch %d: %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                   if k.startswith(("train/", "val/"))))
        if rank == 0:
            tracker.metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step, flush=True)
            tracker.metrics({"epoch": epoch + 1, "train/epoch_loss": metrics[S.TRAIN_LOSS]}, step, flush=True)
        if meta["best_mae"] is not None:
            metrics["best_mae"] = meta["best_mae"]
        if cfg.val.uri and S.VAL_MAE not in metrics:
            metrics[S.VAL_MAE] = float("inf")   # not validated this epoch: never the best checkpoint
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX)
        save_checkpoint_dir(tmp, meta=dict(meta), module=module, best_state=best_state, optimizer=optimizer,
                            write_model=rank == 0)
        if rank == 0 and adapter is not None:
            state = torch.load(os.path.join(tmp, STATE_FILE), weights_only=True)
            torch.save({**state, "adapter": adapter.state_dict()}, os.path.join(tmp, STATE_FILE))
        if rank == 0 and val_results is not None:
            with open(os.path.join(tmp, "val.json"), "w") as f:
                json.dump(val_results, f, indent=1, default=float)
        if in_process:
            persist_local_checkpoint(cfg.run, cfg.s3, tmp, epoch + 1)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        if not in_process:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # local mode hands the driver this directory itself: keep the newest, drop the one before
            if prev_tmp:
                shutil.rmtree(prev_tmp, ignore_errors=True)
            prev_tmp = tmp
        last = metrics

    tracker.flush()
    return {"epochs": int(meta["epoch"]), "step": step, "metrics": last, "history": meta["history"],
            "wall_s": time.perf_counter() - t_start, "resumed_from": meta["resumed_from"], "rank": rank}


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
    """Count clips, open the MLflow run, run ``video_train_loop`` under ``TorchTrainer`` (or in-process), then
    write the final weights and log the model exactly as the image trainer does."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, mlflow=tracking.pin_tracking_uri(cfg.mlflow))
    L.ensure_ray()
    n_clips, n_frames = count_clips(cfg)
    spe = L.steps_per_epoch(n_clips, cfg.optim.batch_size, cfg.scaling.num_workers)
    log.info("%d clips of %d frames from %d labelled frames; %d steps per epoch", n_clips, cfg.data.clip.length,
             n_frames, spe)
    run_id = tracking.open_job_run(cfg.mlflow, cfg.run.name, {"sodkd.mode": cfg.mode, "sodkd.model": cfg.model.name}, cfg)
    if run_id:
        tracking.mlflow_client(cfg.mlflow).log_batch(run_id, metrics=_data_metrics(n_clips, n_frames, spe))
    loop_config = to_dict(cfg)
    loop_config["_runtime"] = {"steps_per_epoch": spe, "mlflow_run_id": run_id}
    result = L.launch(video_train_loop, loop_config, cfg, run_id, scored=bool(cfg.val.uri))
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
        validation = None
        if os.path.exists(os.path.join(d, "val.json")):
            with open(os.path.join(d, "val.json")) as f:
                validation = json.load(f)
        run_id = meta.get("mlflow_run_id") or run_id
        metrics = dict(result.metrics or {})
        if run_id:  # the export reopens the run with MLflow's fluent API: point it at this run's experiment
            import mlflow
            if cfg.mlflow.uri:
                mlflow.set_tracking_uri(cfg.mlflow.uri)
            mlflow.set_experiment(cfg.mlflow.experiment)
        weights, _ = L.export_final(cfg, os.path.join(d, BEST_FILE), run_id, metrics, input_size=cfg.val.size)
    if not cfg.scaling.num_workers and os.path.basename(result.checkpoint.path).startswith(TMP_PREFIX):
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)   # in-process: persisted under run.storage
    if run_id:
        _log_sequences(cfg, run_id, validation)
        tracking.mlflow_client(cfg.mlflow).set_terminated(run_id, status="FINISHED")
    return VideoTrainOutcome(cfg.run.name, L.checkpoint_uri(cfg, result, meta["epoch"]), weights, metrics,
                             meta.get("history", []), validation, meta.get("best_mae"), run_id, n_clips, n_frames,
                             spe, time.perf_counter() - t0, list(meta.get("resumed_from", [])))


def _data_metrics(clips: int, frames: int, spe: int) -> list:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in
            (("data/clips", clips), ("data/frames", frames), ("data/steps_per_epoch", spe))]


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
