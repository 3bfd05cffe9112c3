"""The training core on Ray Train: teachers, the supervised-only (FS) student and the distilled (KD) student.

One loop serves the three jobs; the ``mode`` and the data sources decide what it learns from::

    teacher     a teacher (scfnet_r50 / r18) on image/mask pairs: soft dice + boundary dice (KD-SCFNet)
    supervised  the student (scfnet_m3) on the same pairs and loss: the paper's FS baseline
    distill     the student on unlabeled images with a teacher's soft labels: soft dice to sigmoid(teacher
                out2) on all four side outputs; labelled pairs may be mixed in (they keep the mask loss)
    foundation  a student (dedecoder_m3) on foundation-model pseudo masks and their per-pixel confidence:
                BCE + partial BCE (trusted pixels) + IoU per side output, + edge BCE (``fm`` weights,
                :mod:`cluster.fm_train`); labelled pairs may be mixed in (confidence 1 everywhere)

Data (driver side, :func:`build_train_dataset`): every source becomes Ray Data rows ``{id, image, target,
soft}`` (+ ``conf`` in mode foundation) -- the image decoded and resized once to ``data.load_size`` (square,
uint8), the target a uint8 map of the same size (a mask, or a teacher's probability x 255). Offline soft labels (the Parquet shards of
``sodkd label``) are read as their own dataset and joined to the images by ``id`` (broadcast join against the
image manifest: the labels stream, the manifest is small); online soft labels come from a teacher actor pool
(``map_batches`` with ``ActorPoolStrategy``) inside the same pipeline that feeds the trainer, so no label is
stored. The decoded images are materialised once (``data.cache``) so epochs re-run only the teacher.

Training (worker side, :func:`train_loop`, usable in-process with ``ScalingConfig(num_workers=0)`` and under
``TorchTrainer`` with DDP or DeepSpeed): augmentation and one random scale per batch on the worker
(``kd.augment``), SGD with the warm-up + per-iteration cosine schedule (``kd.schedule``), backbone at 0.1x.
Each epoch: validation on a labelled set (rank 0), a checkpoint (model, optimizer, epoch, step, the best
weights so far, the MLflow run id) reported to Ray Train, which keeps the latest and the best by ``val/mae``.
A resubmitted run (same ``run.name`` and ``run.storage``) resumes from its latest checkpoint, and
``FailureConfig(max_failures)`` restarts a run whose worker died from the same place.

Tracking: the driver finds (by the tag ``sodkd.run_name``) or creates the MLflow run and logs the flattened
config; rank 0 alone logs ``train/loss`` and ``train/lr`` per step, ``val/*`` and a picture panel per epoch;
the driver finally logs the best model as its BatchNorm-folded ONNX export in MLflow's ONNX flavour, with its
card (``registered_model_name``; nothing pickled: ``models:/NAME/VERSION`` loads as an exported file). One run
per job, found again on resume.

In-process mode (``scaling.num_workers: 0``): Ray's local mode does not persist checkpoints, so the loop
writes them itself to ``<storage>/<name>/checkpoint_epoch=NNNN`` and resumes from the newest on the next
submission; fault tolerance (``max_failures``) needs real workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np

from cluster import catalog, storage
from cluster.checkpoint import (BEST_FILE, DS_DIR, LOCAL_CKPT_PREFIX, META_FILE, persist_local_checkpoint,
                                restore_checkpoint, save_checkpoint_dir)
from cluster.labelling import PoolConfig
from cluster.raypool import torch_threads
from cluster.storage import S3Config
from cluster.tracking import (RUN_NAME_TAG, RankTracker, TrainTracking, log_student, mlflow_client, open_job_run,
                              pin_tracking_uri)
from kd import schema as S
from kd.augment import TEST_SIZE, TRAIN_SIZES, AugmentConfig
from kd.config import ConfigError, load_config, to_dict
from kd.pseudo_labels import FMLossConfig
from kd.step import KDLoss, MaskLoss

log = logging.getLogger(__name__)

__all__ = ["ModelConfig", "PairedSource", "UnlabeledSource", "OnlineTeacherConfig", "DataSection",
           "ValConfig", "OptimConfig", "ScalingSection", "RunSection", "TrainTracking", "OutputConfig",
           "DebugConfig", "TrainConfig", "load_train_config", "build_train_dataset", "train_loop",
           "run_training", "TrainOutcome", "RUN_NAME_TAG",
           # the run plumbing other trainers on this core share (cluster.video_train); checkpoints: cluster.checkpoint
           "RunConfig", "unwrap", "start_worker", "worker_device", "inject_failure", "ensure_ray", "launch",
           "checkpoint_uri", "export_final"]

Mode = Literal["teacher", "supervised", "distill", "foundation"]


# --- configuration ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which network: a registered name, constructor overrides, optional starting weights.

    ``backbone_weights``: a torchvision- or timm-format ImageNet state dict for the encoder (MobileNetV3 or
    ResNet; :func:`models.load_backbone_weights` maps the keys, checks shapes and prints what it loaded);
    ``init_weights`` (a whole sodkd model) is applied after it. Both are checked on the driver before any
    worker starts.
    """

    name: str = "scfnet_m3"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_weights: str | None = None      # a models.save_weights file to start from (local or s3://)
    backbone_weights: str | None = None  # ImageNet encoder weights (torchvision / timm state dict; local or s3://)

    def __post_init__(self) -> None:
        from models import list_models
        if self.name not in list_models():
            raise ConfigError(f"model.name: unknown model {self.name!r}; registered: {', '.join(list_models())}")


@dataclasses.dataclass(frozen=True)
class PairedSource:
    """``ROOT/images`` + ``ROOT/masks`` paired by stem (local or ``s3://``); ``limit`` keeps the first N."""

    uri: str
    limit: int | None = None
    images: str = "images"
    masks: str = "masks"


@dataclasses.dataclass(frozen=True)
class UnlabeledSource:
    """A tree of images; ``labels`` = the output of ``sodkd label`` on it (offline soft labels), or None for
    online labels from ``data.teacher``. Label keys are relative to the folder labelled, so ``uri`` must be
    the same folder (local copy or bucket) the labelling job read."""

    uri: str
    labels: str | None = None
    limit: int | None = None
    teacher_labels: str | None = None   # mode foundation: a SOD teacher's labels to fuse with (by id)


@dataclasses.dataclass(frozen=True)
class OnlineTeacherConfig:
    """A teacher run inside the training pipeline (online soft labels) and drawn in the MLflow panel.

    ``teachers``: specs of :mod:`cluster.teachers` (several = an ensemble); empty = none.
    """

    teachers: tuple[str, ...] = ()
    tta: Literal["none", "hflip"] = "none"
    teacher_size: int | None = None
    pool: PoolConfig = dataclasses.field(default_factory=lambda: PoolConfig(num_cpus=0.5, batch_size=16))


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training data and what the worker does with it.

    Attributes:
        paired: labelled sources (masks).
        unlabeled: unlabeled sources (soft labels, offline or online).
        teacher: the online teacher (needed by unlabeled sources without ``labels``).
        load_size: images and targets are decoded and resized once to this square size; each batch is then
            augmented and resized to one of ``sizes`` (KD-SCFNet: 224..352 from 352).
        sizes: the multi-scale training sizes.
        augment: the paper's augmentation (``kd.augment.AugmentConfig``).
        cache: materialise the decoded images in the object store once (epochs then skip decoding).
        shuffle_buffer: rows of the per-worker local shuffle buffer (0 = no shuffling).
        shuffle_blocks: with ``cache``, cut the cached rows into blocks of ``shuffle_block_rows`` and draw the
            blocks in a new random order every epoch (``randomize_block_order``, reseeded per execution), so
            the local buffer mixes rows from the whole dataset, not from a window of the sources' sorted order
            (folders one after another, synsets in name order). Off = the stored order, for debugging only.
        shuffle_block_rows: rows per block for ``shuffle_blocks``.
        decode_cpus: Ray CPUs per decode task (fractional keeps small machines from starving).
        decode_batch: images per decode task batch.
    """

    paired: tuple[PairedSource, ...] = ()
    unlabeled: tuple[UnlabeledSource, ...] = ()
    teacher: OnlineTeacherConfig = dataclasses.field(default_factory=OnlineTeacherConfig)
    load_size: int = 352
    sizes: tuple[int, ...] = TRAIN_SIZES
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    cache: bool = True
    shuffle_buffer: int = 1024
    shuffle_blocks: bool = True
    shuffle_block_rows: int = 32
    decode_cpus: float = 0.5
    decode_batch: int = 16

    def __post_init__(self) -> None:
        if self.load_size < 16:
            raise ConfigError(f"data.load_size: must be >= 16, got {self.load_size}")
        if not self.sizes or any(s < 16 for s in self.sizes):
            raise ConfigError(f"data.sizes: need one or more sizes >= 16, got {list(self.sizes)}")
        if self.decode_cpus <= 0 or self.decode_batch < 1 or self.shuffle_buffer < 0:
            raise ConfigError("data: decode_cpus > 0, decode_batch >= 1 and shuffle_buffer >= 0 are required")
        if self.shuffle_block_rows < 1:
            raise ConfigError(f"data.shuffle_block_rows: must be >= 1, got {self.shuffle_block_rows}")


@dataclasses.dataclass(frozen=True)
class ValConfig:
    """Validation each ``every`` epochs on a labelled set (rank 0): images at ``size``, scored at mask size.

    ``panel``: samples in the MLflow picture (image / teacher / prediction / mask); 0 = none.
    """

    uri: str | None = None
    limit: int | None = None
    size: int = TEST_SIZE
    every: int = 1
    batch_size: int = 8
    panel: int = 4


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """KD-SCFNet's recipe: SGD 0.9 / 5e-4, 5 warm-up epochs from 6.4e-4 to 0.064, per-iteration cosine to
    6.4e-4, the backbone at 0.1x, batch 128 (global: split evenly over the workers), 69 epochs."""

    epochs: int = 69
    batch_size: int = 128
    lr: float = 0.064
    lr_start: float = 6.4e-4
    lr_final: float = 6.4e-4
    warmup_epochs: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 0.1
    grad_clip: float | None = None
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.lr, self.lr_start, self.lr_final, self.momentum,
                                               self.weight_decay, self.backbone_lr_mult)):
            raise ConfigError("optim: lr, lr_start, lr_final, momentum, weight_decay and backbone_lr_mult "
                              "must be finite numbers")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optim.nesterov: needs momentum > 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"optim: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0 or self.lr_start < 0 or self.lr_final < 0:
            raise ConfigError("optim: lr must be > 0, lr_start and lr_final >= 0")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs: must be >= 0, got {self.warmup_epochs}")

    def schedule(self, steps_per_epoch: int):
        """The per-step learning rate over the whole run (``kd.schedule.WarmupCosine``)."""
        from kd.schedule import WarmupCosine
        total = steps_per_epoch * self.epochs
        return WarmupCosine(total, min(total, round(self.warmup_epochs * steps_per_epoch)), self.lr,
                            self.lr_start, self.lr_final)


@dataclasses.dataclass(frozen=True)
class ScalingSection:
    """Workers and strategy. ``num_workers: 0`` runs the loop in this process (Ray Train local mode).

    ``strategy``: ``ddp`` (DistributedDataParallel, gloo on CPU / nccl on GPU) or ``deepspeed`` (ZeRO
    ``zero_stage`` 0-2, bf16 optional; the torch SGD optimizer is handed to ``deepspeed.initialize``).
    ``torch_threads``: intra-op threads per worker; 0 = one per whole CPU of ``cpus_per_worker``.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 1
    bf16: bool = False
    torch_threads: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"scaling.num_workers: must be >= 0, got {self.num_workers}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"scaling.zero_stage: 0, 1 or 2 (stage 3 shards the weights, which the rank-0 "
                              f"validation cannot run), got {self.zero_stage}")
        if self.strategy == "deepspeed" and self.num_workers == 0:
            raise ConfigError("scaling.strategy: deepspeed needs num_workers >= 1")
        if self.bf16 and self.strategy != "deepspeed":
            raise ConfigError("scaling.bf16: only with strategy deepspeed")

    def threads(self) -> int:
        return torch_threads(self.torch_threads, self.cpus_per_worker)

    def per_worker(self, batch_size: int) -> int:
        """The global ``optim.batch_size`` split over the workers (in process: all of it); an error when it
        does not split evenly."""
        workers = max(1, self.num_workers)
        if batch_size % workers:
            raise ConfigError(f"optim.batch_size: {batch_size} does not split evenly over {workers} workers")
        return batch_size // workers


@dataclasses.dataclass(frozen=True)
class RunSection:
    """The run's identity and storage: ``<storage>/<name>`` holds its checkpoints (local path or s3://).

    Resubmitting the same name and storage resumes; ``max_failures`` worker-group restarts are allowed
    (-1 = unlimited); Ray keeps ``keep_checkpoints`` checkpoints (the best by val/mae) besides the latest.
    """

    name: str = "sodkd-train"
    storage: str = "runs"
    max_failures: int = 0
    keep_checkpoints: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name: a non-empty name without '/', got {self.name!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the job writes the final (best by val/mae, else last) weights: ``<dir>/<run name>.pt`` and,
    with ``fp16``, ``<run name>.fp16.pt``. None = ``<storage>/<name>/final``."""

    dir: str | None = None
    fp16: bool = True


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests: at global step ``fail_at_step`` worker ``fail_rank`` exits the process
    (``os._exit``) unless ``fail_marker`` exists; it creates the marker first, so it fails only once.

    ``fail_after_s``: seconds it waits before exiting. Ray Train registers a reported checkpoint when its
    controller next polls the workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), so a
    worker that dies within moments of a report can take that checkpoint with it; a test that expects the
    restart to resume from the last epoch waits a few polls, as a crash minutes later would."""

    fail_at_step: int | None = None
    fail_marker: str | None = None
    fail_rank: int = 0
    fail_after_s: float = 0.0

    def check(self, num_workers: int) -> None:
        """Errors for a fault that could not be injected safely (called by the job configs)."""
        if self.fail_at_step is None:
            return
        if num_workers == 0:
            raise ConfigError("debug.fail_at_step: needs num_workers >= 1 (it would kill this process)")
        if not self.fail_marker:
            raise ConfigError("debug.fail_marker: required with fail_at_step (so it fails only once)")


def inject_failure(debug: DebugConfig, step: int, rank: int, before_exit: Callable[[], None]) -> None:
    """Exit this worker's process at ``debug.fail_at_step`` on ``debug.fail_rank``, once (see DebugConfig)."""
    if (debug.fail_at_step is None or step != debug.fail_at_step or rank != debug.fail_rank
            or os.path.exists(debug.fail_marker)):
        return
    with open(debug.fail_marker, "w") as f:
        f.write(f"worker rank {rank} exited at step {step}\n")
    before_exit()
    time.sleep(max(0.0, debug.fail_after_s))
    os._exit(1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training job needs; one dict of it crosses into Ray and, flattened, into MLflow.

    ``fm``: the loss weights and trust threshold of mode foundation (ignored by the other modes); ``kd``: the
    distillation loss of soft-labelled rows (mode distill, :class:`kd.step.KDLoss`); ``mask_loss``: the loss
    of rows with masks (:class:`kd.step.MaskLoss`).
    """

    mode: Mode = "supervised"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    val: ValConfig = dataclasses.field(default_factory=ValConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    scaling: ScalingSection = dataclasses.field(default_factory=ScalingSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    mlflow: TrainTracking = dataclasses.field(default_factory=TrainTracking)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    fm: FMLossConfig = dataclasses.field(default_factory=FMLossConfig)
    kd: KDLoss = dataclasses.field(default_factory=KDLoss)
    mask_loss: MaskLoss = dataclasses.field(default_factory=MaskLoss)

    def __post_init__(self) -> None:
        d = self.data
        for i, u in enumerate(d.unlabeled):
            if u.teacher_labels is not None and self.mode != "foundation":
                raise ConfigError(f"data.unlabeled[{i}].teacher_labels: fusion is for mode foundation "
                                  f"(this is mode {self.mode})")
        if self.mode == "foundation":
            if not d.unlabeled:
                raise ConfigError("data.unlabeled: mode foundation needs a source with foundation pseudo labels")
            for i, u in enumerate(d.unlabeled):
                if u.labels is None:
                    raise ConfigError(f"data.unlabeled[{i}].labels: mode foundation trains on stored pseudo "
                                      "labels; make them with `sodkd label --teacher foundation`")
            if d.teacher.teachers:
                raise ConfigError("data.teacher.teachers: mode foundation has no online teacher "
                                  "(fuse a SOD teacher's stored labels with data.unlabeled[i].teacher_labels)")
        elif self.mode in ("teacher", "supervised"):
            if not d.paired:
                raise ConfigError(f"data.paired: mode {self.mode} trains on image/mask pairs; give at least one")
            if d.unlabeled:
                raise ConfigError(f"data.unlabeled: mode {self.mode} uses masks only; use mode distill to mix "
                                  "in unlabeled images")
        else:
            if not d.unlabeled:
                raise ConfigError("data.unlabeled: mode distill needs at least one unlabeled source")
            for i, u in enumerate(d.unlabeled):
                if u.labels is None and not d.teacher.teachers:
                    raise ConfigError(f"data.unlabeled[{i}].labels: no offline labels and no data.teacher for "
                                      "online labels")
        self.debug.check(self.scaling.num_workers)
        self.scaling.per_worker(self.optim.batch_size)

    @property
    def per_worker_batch(self) -> int:
        return self.scaling.per_worker(self.optim.batch_size)


class RunConfig(Protocol):
    """What the run plumbing (:func:`launch`, :func:`export_final`, :func:`cluster.tracking.open_job_run`) reads
    of a job's config: :class:`TrainConfig` and ``cluster.video_train.VideoTrainConfig`` both are one (a frozen dataclass,
    flattened into the MLflow params)."""

    @property
    def mode(self) -> str: ...
    @property
    def model(self) -> ModelConfig: ...
    @property
    def scaling(self) -> ScalingSection: ...
    @property
    def run(self) -> RunSection: ...
    @property
    def mlflow(self) -> TrainTracking: ...
    @property
    def output(self) -> OutputConfig: ...
    @property
    def s3(self) -> S3Config: ...


def load_train_config(source: Any = None, overrides: Any = None) -> TrainConfig:
    """YAML path or mapping + dotted overrides -> :class:`TrainConfig` (strict, see :mod:`kd.config`)."""
    return load_config(TrainConfig, source, overrides)


# --- data (driver side builds the pipeline, Ray tasks and actors run these) --------------------------------

_FS_CACHE: dict[tuple[str, Any], tuple[Any, str]] = {}


def _filesystem(uri: str, s3: S3Config | None):
    key = (uri, s3)
    if key not in _FS_CACHE:
        _FS_CACHE[key] = storage.get_filesystem(uri, s3)
    return _FS_CACHE[key]


def _decode_resized(data: bytes, size: int) -> np.ndarray:
    from kd.imageio import decode_image, resize
    return resize(decode_image(data, max_side=size), (size, size))


def _decode_target(data: bytes, size: int) -> np.ndarray:
    from kd.imageio import decode_mask, resize
    return resize(decode_mask(data), (size, size))


def _rows(ids: list, images: list, targets: list | None, soft: bool, size: int,
          confs: list | None = None) -> dict[str, np.ndarray]:
    n = len(ids)
    out = {
        S.ID: np.asarray(ids, dtype=object),
        S.IMAGE: np.stack(images) if n else np.zeros((0, size, size, 3), np.uint8),
        S.TARGET: (np.stack(targets) if n else np.zeros((0, size, size), np.uint8)) if targets is not None
        else np.zeros((n, size, size), np.uint8),
        S.SOFT: np.full(n, soft, dtype=bool),
    }
    if confs is not None:
        out[S.CONF] = np.stack(confs) if n else np.zeros((0, size, size), np.uint8)
    return out


def full_confidence(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mode foundation: labelled pairs join the pseudo-labelled rows with every pixel trusted."""
    out = dict(batch)
    out[S.CONF] = np.full(np.asarray(batch[S.TARGET]).shape, 255, np.uint8)
    return out


def load_pairs(batch: Mapping[str, np.ndarray], *, root_uri: str, s3: S3Config | None,
               size: int) -> dict[str, np.ndarray]:
    """Rows ``{id, path, mask_path}`` -> ``{id, image, target, soft=False}`` at ``size`` x ``size``.

    An undecodable image or mask is dropped with a warning (it would only fail the step later).
    """
    fs, _ = _filesystem(root_uri, s3)
    ids, images, masks = [], [], []
    for i, path, mpath in zip(batch[S.ID], batch["path"], batch["mask_path"]):
        try:
            images.append(_decode_resized(storage.read_bytes(fs, str(path)), size))
            masks.append(_decode_target(storage.read_bytes(fs, str(mpath)), size))
            ids.append(i)
        except (OSError, ValueError) as e:
            images, masks = images[:len(ids)], masks[:len(ids)]
            log.warning("dropping %s: %s", path, e)
    return _rows(ids, images, masks, False, size)


def load_images(batch: Mapping[str, np.ndarray], *, root_uri: str, s3: S3Config | None,
                size: int) -> dict[str, np.ndarray]:
    """Rows ``{id, path}`` -> ``{id, image, target (zeros until a teacher fills it), soft=True}``."""
    fs, _ = _filesystem(root_uri, s3)
    ids, images = [], []
    for i, path in zip(batch[S.ID], batch["path"]):
        try:
            images.append(_decode_resized(storage.read_bytes(fs, str(path)), size))
            ids.append(i)
        except (OSError, ValueError) as e:
            log.warning("dropping %s: %s", path, e)
    return _rows(ids, images, None, True, size)


def join_labels(batch: Mapping[str, np.ndarray], *, paths_by_id: Mapping[str, str], root_uri: str,
                s3: S3Config | None, size: int, foundation: bool = False,
                teacher_pngs: Mapping[str, bytes] | None = None) -> dict[str, np.ndarray]:
    """Label-shard rows ``{id, label_png}`` -> ``{id, image, target, soft=True}``: the join by id.

    ``paths_by_id`` is the image manifest (id -> path) broadcast to every task; a label whose id has no image
    (another folder's label, an image deleted since) is dropped, as is an image that no longer decodes.
    ``foundation``: rows also carry ``conf_png`` and the output a ``conf`` column; ``teacher_pngs`` (id ->
    a SOD teacher's label PNG) are fused in per pixel (:func:`cluster.fm_train.foundation_maps`).
    """
    from cluster.fm_train import foundation_maps
    from cluster.labels import decode_label
    from kd.imageio import resize

    def u8(m: np.ndarray) -> np.ndarray:
        return resize((m * 255.0 + 0.5).astype(np.uint8), (size, size))

    fs, _ = _filesystem(root_uri, s3)
    ids, images, targets, confs = [], [], [], []
    conf_pngs = batch[S.CONF_PNG] if foundation else [None] * len(batch[S.ID])
    for i, png, conf_png in zip(batch[S.ID], batch[S.LABEL_PNG], conf_pngs):
        path = paths_by_id.get(str(i))
        if path is None:
            continue
        try:
            image = _decode_resized(storage.read_bytes(fs, path), size)
            if foundation:
                target, conf = foundation_maps(png, conf_png, (teacher_pngs or {}).get(str(i)), what=path)
                confs.append(u8(conf))
            else:
                target = decode_label(bytes(png))
        except (OSError, ValueError) as e:
            log.warning("dropping %s: %s", path, e)
            continue
        ids.append(i)
        images.append(image)
        targets.append(u8(target))
    return _rows(ids, images, targets, True, size, confs if foundation else None)


class OnlineLabeler:
    """Ray Data callable class: fills ``target`` with a teacher's probabilities (x 255, uint8) per batch.

    The teacher (``cluster.teachers.build_teacher``) is loaded once per actor; it sees the decoded image at
    ``data.load_size`` and its map is returned at the same size, so the worker's augmentation moves image and
    label together. Also callable directly (tests).
    """

    def __init__(self, teachers: Sequence[str], *, s3: S3Config | None = None, tta: str = "none",
                 teacher_size: int | None = None, device: str = "cpu", precision: str = "auto", threads: int = 1):
        import torch

        from cluster.teachers import build_teacher
        if threads:
            torch.set_num_threads(int(threads))
        self.teacher = build_teacher(list(teachers), tta=tta, s3=s3, device=device, precision=precision,
                                     input_size=teacher_size, threads=threads or None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(batch[S.IMAGE])
        if len(images) == 0:
            return dict(batch)
        size = images.shape[1]
        p = self.teacher.predict(images)
        if p.shape[1:] != (size, size):
            import torch
            import torch.nn.functional as F
            p = F.interpolate(torch.from_numpy(p)[:, None], size=(size, size), mode="bilinear",
                              align_corners=False)[:, 0].clamp_(0, 1).numpy()
        out = dict(batch)
        out[S.TARGET] = (p * 255.0 + 0.5).astype(np.uint8)
        out[S.SOFT] = np.ones(len(images), dtype=bool)
        return out


def _manifest_dataset(items: Sequence[catalog.Item], block_rows: int):
    import pyarrow as pa
    import ray
    table = pa.table({
        S.ID: [it.id for it in items], S.KEY: [it.key for it in items], "path": [it.path for it in items],
        "mask_path": [it.mask_path or "" for it in items],
    })
    return ray.data.from_arrow([table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)])


@dataclasses.dataclass
class TrainData:
    """The training dataset and what the driver knows about it."""

    dataset: Any                 # ray.data.Dataset of {id, image, target, soft}
    rows: int                    # rows per epoch (exact when cached, from the manifests otherwise)
    counts: dict[str, int]       # rows per source kind: paired / offline / online


def _shuffled_blocks(ds, cfg: TrainConfig):
    """``ds`` (cached) with its blocks drawn in a new order every execution, i.e. every epoch (``data.shuffle_blocks``).

    Seeded by ``run.seed`` and the execution index, so a run is repeatable; a resumed run restarts the index.
    """
    if not (cfg.data.cache and cfg.data.shuffle_blocks):
        return ds
    from ray.data import RandomSeedConfig
    return ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.run.seed, reseed_after_execution=True))


def build_train_dataset(cfg: TrainConfig) -> TrainData:
    """The Ray Data pipeline for ``cfg.data`` (see the module docstring)."""
    import ray
    from cluster import labels as L

    d, size, s3 = cfg.data, cfg.data.load_size, cfg.s3
    parts, counts = [], {"paired": 0, "offline": 0, "online": 0}
    decode_kw = dict(batch_size=d.decode_batch, num_cpus=d.decode_cpus)

    def cache(ds):
        if not d.cache:
            return ds
        if d.shuffle_blocks:   # small blocks before caching: one copy, and the block order can mix them
            ds = ds.repartition(target_num_rows_per_block=d.shuffle_block_rows)
        return ds.materialize()

    foundation = cfg.mode == "foundation"
    for src in d.paired:
        cat = catalog.paired_folder(src.uri, s3, limit=src.limit, images=src.images, masks=src.masks)
        ds = _manifest_dataset(cat.items, d.decode_batch).map_batches(
            load_pairs, fn_kwargs={"root_uri": src.uri, "s3": s3, "size": size}, **decode_kw)
        if foundation:
            ds = ds.map_batches(full_confidence, **decode_kw)
        ds = cache(ds)
        parts.append(ds)
        counts["paired"] += ds.count() if d.cache else len(cat)

    online = []
    for src in d.unlabeled:
        cat = catalog.image_folder(src.uri, s3, limit=src.limit)
        if src.labels is None:
            ds = cache(_manifest_dataset(cat.items, d.decode_batch).map_batches(
                load_images, fn_kwargs={"root_uri": src.uri, "s3": s3, "size": size}, **decode_kw))
            online.append(ds)
            counts["online"] += ds.count() if d.cache else len(cat)
            continue
        paths_by_id = {it.id: it.path for it in cat.items}
        lfs, lroot = L.resolve_root(src.labels, s3)
        shards = L.shard_paths(lfs, lroot, S.LABELS_DIR)
        if foundation:
            from cluster.fm_train import check_foundation_shards
            check_foundation_shards(src.labels, lfs, shards)
        label_ids = set(L.read_labels(src.labels, s3, columns=[S.ID]).column(S.ID).to_pylist())
        matched = len(label_ids & paths_by_id.keys())
        if matched == 0:
            raise ValueError(f"data.unlabeled: no label in {src.labels} matches an image of {src.uri} by id "
                             "(label keys are relative to the folder that was labelled)")
        if matched < len(paths_by_id):
            log.warning("%s: %d of %d images have no offline label and are left out", src.uri,
                        len(paths_by_id) - matched, len(paths_by_id))
        join_kw: dict[str, Any] = {"paths_by_id": paths_by_id, "root_uri": src.uri, "s3": s3, "size": size}
        columns = [S.ID, S.LABEL_PNG]
        if foundation:
            columns.append(S.CONF_PNG)
            join_kw["foundation"] = True
            if src.teacher_labels:   # broadcast like the manifest: one teacher PNG per matched id
                t = L.read_labels(src.teacher_labels, s3, columns=[S.LABEL_PNG])
                keep = label_ids & paths_by_id.keys()
                join_kw["teacher_pngs"] = {i: p for i, p in zip(t.column(S.ID).to_pylist(),
                                                                t.column(S.LABEL_PNG).to_pylist()) if i in keep}
                log.info("%s: %d of %d pseudo labels fused with %s", src.uri, len(join_kw["teacher_pngs"]),
                         matched, src.teacher_labels)
        labels_ds = ray.data.read_parquet(shards, filesystem=lfs, columns=columns)
        ds = cache(labels_ds.map_batches(join_labels, fn_kwargs=join_kw, **decode_kw))
        parts.append(ds)
        counts["offline"] += ds.count() if d.cache else matched

    if online:
        t = d.teacher
        pool = t.pool
        device = pool.resolved_device()
        images = online[0] if len(online) == 1 else online[0].union(*online[1:])
        images = _shuffled_blocks(images, cfg)
        parts.append(images.map_batches(
            OnlineLabeler, batch_size=pool.batch_size, compute=pool.compute(), num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            fn_constructor_kwargs={"teachers": list(t.teachers), "s3": s3, "tta": t.tta,
                                   "teacher_size": t.teacher_size, "device": device,
                                   "precision": pool.precision, "threads": pool.threads()}))
    dataset = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    if not online:   # with an online teacher its input was shuffled above; the labels stream behind it
        dataset = _shuffled_blocks(dataset, cfg)
    rows = sum(counts.values())
    if rows == 0:
        raise ValueError("training data: every source is empty after decoding")
    return TrainData(dataset, rows, counts)


def steps_per_epoch(rows: int, batch_size: int, workers: int) -> int:
    """Optimizer steps per epoch: the rows split evenly over ``workers`` (remainder dropped), full
    per-worker batches only (``batch_size`` is global)."""
    workers = max(1, workers)
    per_worker = batch_size // workers
    steps = (rows // workers) // per_worker
    if steps < 1:
        raise ValueError(f"optim.batch_size {batch_size} is larger than the {rows} training rows "
                         f"({workers} workers): no full batch per epoch")
    return steps


# --- validation ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ValSet:
    images: np.ndarray          # uint8 (N, size, size, 3)
    masks: list[np.ndarray]     # uint8 at their own size
    keys: list[str]


def load_val_set(cfg: TrainConfig) -> ValSet | None:
    if not cfg.val.uri:
        return None
    from kd.imageio import decode_image, decode_mask, resize
    cat = catalog.paired_folder(cfg.val.uri, cfg.s3, limit=cfg.val.limit)
    size = cfg.val.size
    images, masks = [], []
    for it in cat.items:
        images.append(resize(decode_image(storage.read_bytes(cat.fs, it.path), max_side=size), (size, size)))
        masks.append(decode_mask(storage.read_bytes(cat.fs, it.mask_path)))
    return ValSet(np.stack(images), masks, [it.key for it in cat.items])


def predict_val(model, images: np.ndarray, batch_size: int, dtype=None) -> np.ndarray:
    """float32 probabilities (N, S, S) of ``model`` (a SODModel, not a DDP/DeepSpeed wrapper) on uint8 images.

    Switches to eval mode for the call and back to the mode it found.
    """
    import torch
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = model.normalize(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))
                                    .permute(0, 3, 1, 2)).to(device=device, dtype=dtype)
                out.append(torch.sigmoid(model(x)[0].float())[:, 0].cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


def score(probs: np.ndarray, masks: Sequence[np.ndarray]) -> dict[str, float]:
    """The validation metrics ``val/mae``, ``val/sm``, ``val/maxf``, ``val/em`` (mean E) at mask size."""
    from kd.imageio import resize
    from kd.metrics import SODEvaluator
    ev = SODEvaluator()
    for p, m in zip(probs, masks):
        ev.step(resize((np.clip(p, 0, 1) * 255.0 + 0.5).astype(np.uint8), m.shape[:2]), m)
    r = ev.results()
    return {S.VAL_MAE: r["mae"], S.VAL_SM: r["sm"], S.VAL_MAXF: r["fm_max"], S.VAL_EM: r["em_mean"]}


# --- the training loop (runs on every worker) --------------------------------------------------------------

def _collate(batch: Mapping[str, np.ndarray], augmenter, rng: np.random.Generator, mean, std,
             sizes: Sequence[int]):
    """Augment each sample (image and target together), then resize the batch to one random size."""
    import torch

    from kd.augment import multiscale_collate
    images, targets = batch[S.IMAGE], batch[S.TARGET]
    maps = [targets] + ([batch[S.CONF]] if S.CONF in batch else [])
    samples = [augmenter(rng, images[i], *(m[i] for m in maps)) for i in range(len(images))]
    x, y, *conf = multiscale_collate(samples, rng=rng, mean=mean, std=std, sizes=sizes)
    return x, y, torch.as_tensor(np.asarray(batch[S.SOFT], dtype=bool)), (conf[0] if conf else None)


class _Float32Outputs:
    """Calls a (wrapped) model and casts its outputs to float32 (bf16 DeepSpeed): losses run in fp32."""

    def __init__(self, net):
        self.net = net
        self.module = unwrap(net)

    def __call__(self, x, **kw):
        import torch

        def cast(o):
            if isinstance(o, torch.Tensor):
                return o.float()
            return type(o)(cast(v) for v in o)
        return cast(self.net(x, **kw))


def unwrap(model):
    """The bare module under a DDP / DeepSpeed wrapper (or the model itself)."""
    return getattr(model, "module", model)


def start_worker(scaling: ScalingSection, seed: int):
    """Set up this training worker: torch's threads and seed; returns (rank, world size, device)."""
    import ray.train
    import torch
    ctx = ray.train.get_context()
    torch.set_num_threads(scaling.threads())
    torch.manual_seed(seed)
    return ctx.get_world_rank(), ctx.get_world_size(), worker_device(scaling)


def worker_device(scaling: ScalingSection):
    """This worker's device: under Ray Train its own GPU (``ray.train.torch.get_device()``: CUDA_VISIBLE_DEVICES
    + local rank), ``cuda:0`` in process, the CPU without ``scaling.use_gpu`` or without CUDA."""
    import torch
    if not (scaling.use_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    if scaling.num_workers:
        import ray.train.torch
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


def _panel(cfg: TrainConfig, module, val: ValSet, probs: np.ndarray, teacher) -> np.ndarray:
    from kd.step import make_panel
    n = min(cfg.val.panel, len(val.keys))
    teacher_maps = teacher.predict(val.images[:n]) if teacher is not None else [None] * n
    rows = [[val.images[i], teacher_maps[i], probs[i], val.masks[i]] for i in range(n)]
    if teacher is None:
        rows = [[r[0], r[2], r[3]] for r in rows]
    return make_panel(rows)


def apply_start_weights(model, cfg: TrainConfig, verbose: bool = True) -> None:
    """``model.backbone_weights`` then ``model.init_weights`` into ``model`` (files local or on S3).

    Errors name the config key and the file: a wrong file is found here, on the driver (``run_training``
    calls this on a throwaway model first), not after the workers started."""
    import io

    from models import load_backbone_weights, load_state
    m = cfg.model
    if m.backbone_weights:
        fs, path = storage.get_filesystem(m.backbone_weights, cfg.s3)
        if not storage.exists(fs, path):
            raise ConfigError(f"model.backbone_weights: file not found: {m.backbone_weights}")
        with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
            tmp.write(storage.read_bytes(fs, path))
            tmp.flush()
            try:
                report = load_backbone_weights(model, tmp.name)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"model.backbone_weights: {m.backbone_weights}: {e}") from e
        if verbose:
            log.info("model.backbone_weights %s: %s", m.backbone_weights, report.summary())
    if m.init_weights:
        fs, path = storage.get_filesystem(m.init_weights, cfg.s3)
        if not storage.exists(fs, path):
            raise ConfigError(f"model.init_weights: file not found: {m.init_weights}")
        try:
            load_state(model, io.BytesIO(storage.read_bytes(fs, path)))
        except ValueError as e:
            raise ConfigError(f"model.init_weights: {m.init_weights}: {e}") from e


def train_loop(config: dict) -> dict:
    """The per-worker training function (``TorchTrainer(train_loop, train_loop_config=config)``).

    ``config`` is ``kd.config.to_dict(TrainConfig)`` plus a ``_runtime`` entry the driver computes
    (``steps_per_epoch``, ``rows``, ``mlflow_run_id``). Returns a summary dict (epochs run, last metrics).
    """
    import ray.train
    import torch

    from kd.augment import Augmenter
    from kd.losses import boundary_band
    from kd.schedule import set_lr, with_lr_mult
    from kd.pseudo_labels import fm_model_loss
    from kd.step import batch_loss
    from models import create_model

    runtime = dict(config.get("_runtime", {}))
    cfg = load_train_config({k: v for k, v in config.items() if k != "_runtime"})
    rank, world, device = start_worker(cfg.scaling, cfg.run.seed)
    in_process = cfg.scaling.num_workers == 0
    use_gpu = device.type == "cuda"

    steps = int(runtime["steps_per_epoch"])
    schedule = cfg.optim.schedule(steps)

    model = create_model(cfg.model.name, **cfg.model.kwargs)
    model.input_size = max(cfg.data.sizes)   # recorded in every weights file: the size to run it at
    apply_start_weights(model, cfg, verbose=rank == 0)
    groups = with_lr_mult(model.param_groups(cfg.optim.lr, cfg.optim.backbone_lr_mult), cfg.optim.lr)
    optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)

    # -- resume ---------------------------------------------------------------------------------------------
    meta: dict[str, Any] = {"epoch": 0, "step": 0, "best_mae": None, "best_epoch": None,
                            "mlflow_run_id": runtime.get("mlflow_run_id"), "resumed_from": []}
    restored = restore_checkpoint(meta, model, lambda: create_model(cfg.model.name, **cfg.model.kwargs),
                                  run=cfg.run, s3=cfg.s3, in_process=in_process, rank=rank)
    best_state = restored.best_state if restored else None

    # -- wrap for the strategy ------------------------------------------------------------------------------
    engine = None
    if cfg.scaling.strategy == "deepspeed":
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.per_worker_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": cfg.scaling.zero_stage},
            "bf16": {"enabled": cfg.scaling.bf16},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": cfg.optim.grad_clip or 0.0,
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        model.to(device)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if restored:
            engine.load_checkpoint(restored.path(DS_DIR), tag="state", load_module_strict=True,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        net, module = engine, engine.module
        dtype = torch.bfloat16 if cfg.scaling.bf16 else torch.float32
    else:
        if world > 1:
            net = ray.train.torch.prepare_model(model)
        else:
            net = model.to(device)
        module, dtype = unwrap(net), torch.float32
    if restored:
        if engine is None:   # after the move to the device: state follows the params
            optimizer.load_state_dict(restored.state(device)["optimizer"])
        restored.close()

    # -- data, validation, tracking --------------------------------------------------------------------------
    shard = ray.train.get_dataset_shard("train")
    val = load_val_set(cfg) if rank == 0 else None
    tracker = RankTracker(cfg.mlflow, meta["mlflow_run_id"], rank)
    panel_teacher = None
    if rank == 0 and val is not None and cfg.val.panel and cfg.data.teacher.teachers and tracker.active:
        from cluster.teachers import build_teacher
        t = cfg.data.teacher
        panel_teacher = build_teacher(list(t.teachers), tta=t.tta, s3=cfg.s3, device="cpu", precision="fp32",
                                      input_size=t.teacher_size)
    augmenter = Augmenter(cfg.data.augment)
    foundation = cfg.mode == "foundation"
    batch = cfg.per_worker_batch
    step = int(meta["step"])
    last: dict[str, float] = {}
    previous_local = None   # in-process mode: the checkpoint dir reported last epoch (Ray keeps only a path)
    t_start, images_seen = time.perf_counter(), 0
    epoch_wall, epoch_cpu, epoch_images = [], [], []   # training phase only (no validation / checkpoint)

    for epoch in range(int(meta["epoch"]), cfg.optim.epochs):
        band = boundary_band(epoch)
        rng = np.random.default_rng([cfg.run.seed, epoch, rank])
        net.train()
        loss_sum, n_steps, n_images = 0.0, 0, 0
        t_epoch, c_epoch = time.perf_counter(), time.process_time()
        it = shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True,
                                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                local_shuffle_seed=cfg.run.seed * 100003 + epoch * 101 + rank
                                if cfg.data.shuffle_buffer else None)
        for rows in it:
            if n_steps >= steps:
                continue  # a cache-less pipeline may yield more rows than counted: keep the schedule
            x, y, soft, conf = _collate(rows, augmenter, rng, module.mean, module.std, cfg.data.sizes)
            x, y = x.to(device=device, dtype=dtype), y.to(device)
            lr = schedule(step)
            set_lr(optimizer, lr)
            parts: dict[str, float] = {}
            if foundation:
                loss, parts = fm_model_loss(_Float32Outputs(net), x, y, conf.to(device), cfg.fm)
            else:
                logits = [o.float() for o in net(x)]
                loss = batch_loss(logits, y, soft, band, cfg.kd, cfg.mask_loss)
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
                optimizer.step()
            step += 1
            n_steps += 1
            n_images += len(rows[S.ID])
            loss_value = float(loss.detach())
            loss_sum += loss_value
            if step % tracker.every == 0:
                tracker.metrics({S.TRAIN_LOSS: loss_value, S.TRAIN_LR: lr,
                                 **{f"train/{k}": v for k, v in parts.items()}}, step)
            inject_failure(cfg.debug, step, rank, tracker.flush)

        epoch_wall.append(time.perf_counter() - t_epoch)
        epoch_cpu.append(time.process_time() - c_epoch)   # every thread of this process (data prefetch too)
        epoch_images.append(n_images)
        images_seen += n_images

        # -- end of epoch: validate, checkpoint, report ---------------------------------------------------
        metrics: dict[str, float] = {"epoch": epoch + 1, "step": step,
                                     S.TRAIN_LOSS: loss_sum / max(1, n_steps)}
        probs = None
        if val is not None and ((epoch + 1) % cfg.val.every == 0 or epoch + 1 == cfg.optim.epochs):
            probs = predict_val(module, val.images, cfg.val.batch_size, dtype)
            metrics.update(score(probs, val.masks))
            if meta["best_mae"] is None or metrics[S.VAL_MAE] < meta["best_mae"]:
                meta["best_mae"], meta["best_epoch"] = metrics[S.VAL_MAE], epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        meta["epoch"], meta["step"] = epoch + 1, step
        if rank == 0:
            tracker.metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step, flush=True)
            tracker.metrics({"epoch": epoch + 1, "train/epoch_loss": metrics[S.TRAIN_LOSS]}, step, flush=True)
            if probs is not None and cfg.val.panel and tracker.active:
                tracker.image(_panel(cfg, module, val, probs, panel_teacher), f"panels/epoch_{epoch + 1:03d}.png")
        if meta["best_mae"] is not None:
            metrics["best_mae"] = meta["best_mae"]
        if cfg.val.uri and S.VAL_MAE not in metrics:
            metrics[S.VAL_MAE] = float("inf")  # not validated this epoch: never the best checkpoint
        tmp = tempfile.mkdtemp(prefix="sodkd-ckpt-")
        save_checkpoint_dir(tmp, meta=dict(meta), module=module, best_state=best_state,
                             optimizer=optimizer if engine is None else None, engine=engine,
                             write_model=rank == 0)
        if in_process:
            persist_local_checkpoint(cfg.run, cfg.s3, tmp, epoch + 1)
        report_ckpt = ray.train.Checkpoint.from_directory(tmp) if (rank == 0 or engine is not None) else None
        ray.train.report(metrics, checkpoint=report_ckpt)
        if in_process:   # the newest stays for the driver (result.checkpoint); the one before can go
            if previous_local:
                shutil.rmtree(previous_local, ignore_errors=True)
            previous_local = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        last = metrics

    tracker.flush()
    wall = time.perf_counter() - t_start
    return {"epochs": int(meta["epoch"]), "step": step, "metrics": last, "images": images_seen,
            "wall_s": wall, "epoch_wall_s": epoch_wall, "epoch_cpu_s": epoch_cpu, "epoch_images": epoch_images,
            "resumed_from": meta["resumed_from"], "rank": rank, "world_size": world}


# --- the driver ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainOutcome:
    """What :func:`run_training` returns: where things went and the final figures."""

    run_name: str
    checkpoint: str | None          # URI of the latest checkpoint
    weights: list[str]              # final weight files written
    metrics: dict[str, float]       # the last epoch's reported metrics
    best_mae: float | None
    mlflow_run_id: str | None
    rows: int
    steps_per_epoch: int
    wall_s: float
    resumed_from: list[int]
    model_version: str | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)   # rank 0's train_loop return value


def ensure_ray() -> None:
    """Connect to (or start) Ray when this process is not connected yet (``RAY_ADDRESS`` is honoured)."""
    import ray
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, logging_level=logging.WARNING)


def launch(train_fn: Callable[[dict], dict], loop_config: dict, cfg: RunConfig, run_id: str | None, *,
           scored: bool, **trainer_kw: Any):
    """Run ``train_fn`` under ``TorchTrainer`` (in process with ``scaling.num_workers: 0``); the ``Result``.

    Checkpoints go to ``<run.storage>/<run.name>``; Ray keeps ``run.keep_checkpoints`` of them, the best by
    ``val/mae`` when ``scored``, and restarts the worker group up to ``run.max_failures`` times. A run that
    fails is marked FAILED in MLflow; ``trainer_kw`` (``datasets``, ``dataset_config``) go to the trainer."""
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, root = storage.get_filesystem(cfg.run.storage, cfg.s3)
    fs.create_dir(root, recursive=True)
    sc = cfg.scaling
    scaling = ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                      resources_per_worker={"CPU": sc.cpus_per_worker} if sc.num_workers else None)
    run_config = ray.train.RunConfig(
        name=cfg.run.name, storage_path=root, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute=S.VAL_MAE if scored else None,
            checkpoint_score_order="min"))
    trainer = TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, **trainer_kw)
    try:
        result = trainer.fit()
    except BaseException:
        if run_id:
            mlflow_client(cfg.mlflow).set_terminated(run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name}: training reported no checkpoint")
    return result


def checkpoint_uri(cfg: RunConfig, result, epoch: int) -> str:
    """Where the run's latest checkpoint lives: Ray's, or the in-process copy under ``run.storage``."""
    if cfg.scaling.num_workers:
        return storage.to_uri(result.checkpoint.filesystem, result.checkpoint.path)
    return storage.join(cfg.run.storage.rstrip("/"), cfg.run.name, f"{LOCAL_CKPT_PREFIX}{epoch:04d}")


def export_final(cfg: RunConfig, best_path: str, run_id: str | None, metrics: Mapping[str, Any], *,
                 input_size: int) -> tuple[list[str], str | None]:
    """Write the final weights (fp32 + fp16) and log/register the model and its ONNX export in MLflow
    (exported at ``input_size``)."""
    from models import load_weights, save_weights
    model = load_weights(best_path)
    meta = {k: v for k, v in json.load(open(os.path.join(os.path.dirname(best_path), META_FILE))).items()
            if k in ("epoch", "step", "best_mae", "best_epoch")}
    extra = {"run_name": cfg.run.name, "mode": cfg.mode, **meta, "mlflow_run_id": run_id}
    out_uri = cfg.output.dir or storage.join(cfg.run.storage.rstrip("/"), cfg.run.name, "final")
    fs, out_root = storage.get_filesystem(out_uri, cfg.s3)
    written = []
    with tempfile.TemporaryDirectory(prefix="sodkd-final-") as tmp:
        files = [(f"{cfg.run.name}.pt", False)] + ([(f"{cfg.run.name}.fp16.pt", True)] if cfg.output.fp16 else [])
        for name, half in files:
            local = os.path.join(tmp, name)
            save_weights(model, local, extra_meta=extra, half=half)
            with open(local, "rb") as f:
                storage.write_bytes(fs, storage.join(out_root, name), f.read())
            written.append(storage.to_uri(fs, storage.join(out_root, name)))
        version = None
        if run_id is not None:
            version = log_student(cfg.mlflow, cfg.run.name, model, run_id, tmp, metrics, input_size)
    return written, version


def run_training(cfg: TrainConfig) -> TrainOutcome:
    """Build the data, run ``train_loop`` under ``TorchTrainer`` (or in-process), then export and register."""
    import ray.train

    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, mlflow=pin_tracking_uri(cfg.mlflow))
    if cfg.model.init_weights or cfg.model.backbone_weights:   # a wrong file fails here, in seconds
        from models import create_model
        apply_start_weights(create_model(cfg.model.name, **cfg.model.kwargs), cfg)
    ensure_ray()
    data = build_train_dataset(cfg)
    spe = steps_per_epoch(data.rows, cfg.optim.batch_size, cfg.scaling.num_workers)
    log.info("training rows %d (%s), %d steps per epoch", data.rows, data.counts, spe)
    run_id = open_job_run(cfg.mlflow, cfg.run.name, {"sodkd.mode": cfg.mode, "sodkd.model": cfg.model.name}, cfg)
    loop_config = to_dict(cfg)
    loop_config["_runtime"] = {"steps_per_epoch": spe, "rows": data.rows, "mlflow_run_id": run_id}
    result = launch(train_loop, loop_config, cfg, run_id, scored=bool(cfg.val.uri), datasets={"train": data.dataset},
                    dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
        run_id = meta.get("mlflow_run_id") or run_id
        metrics = dict(result.metrics or {})
        weights, version = export_final(cfg, os.path.join(d, BEST_FILE), run_id, metrics, input_size=cfg.val.size)
    if run_id:
        mlflow_client(cfg.mlflow).set_terminated(run_id, status="FINISHED")
    if not cfg.scaling.num_workers and result.checkpoint.path.startswith(tempfile.gettempdir()):
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)   # persisted copy lives in the run storage
    return TrainOutcome(cfg.run.name, checkpoint_uri(cfg, result, meta["epoch"]), weights, metrics,
                        meta.get("best_mae"), run_id, data.rows, spe, time.perf_counter() - t0,
                        list(meta.get("resumed_from", [])), version, dict(getattr(result, "return_value", None) or {}))
