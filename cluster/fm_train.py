"""Training a student on foundation-model pseudo labels: shards -> samples -> the composite loss.

The foundation labeller (:mod:`cluster.foundation`) writes label shards whose rows carry the pseudo mask
(``label_png``) and its per-pixel confidence (``conf_png``). This module

1. reads those rows and joins them **by id** to their images (and, with ``teacher_labels`` set, to a SOD
   teacher's label shards, fused per pixel by :func:`kd.pseudo_labels.fuse_with_teacher`), giving aligned
   ``(image, target, confidence)`` samples at the label size;
2. trains a registered student (``dedecoder_m3`` by default) with
   ``sum_i w_i (BCE + partial BCE on c >= tau + IoU)(s_i) + w_edge * edge BCE``
   (:func:`kd.pseudo_labels.fm_model_loss`), the paper's recipe augmentations (:mod:`kd.augment`, the
   confidence map follows every geometric step) and multi-scale batches, SGD with the backbone at 0.1x lr;
3. records the run in MLflow (flattened config as params, ``train/loss`` and its parts per step) and
   writes the weights with :func:`models.save_weights`.

This is a small single-process loop for the pseudo-label student: it loads the (modest) pseudo-label set into
memory. It is separate from the Ray Train core because that core's batch loss is the KD-SCFNet dice/teacher
loss; the pieces here (:func:`load_samples`, :func:`train_step`) are plain functions it can call.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import Any, Sequence

import numpy as np

from cluster import storage
from cluster.storage import S3Config
from cluster.tracking import TrackingConfig
from kd import schema as S
from kd.augment import TRAIN_SIZES, AugmentConfig, Augmenter, multiscale_collate
from kd.config import ConfigError
from kd.pseudo_labels import FMLossConfig

log = logging.getLogger(__name__)

__all__ = ["FMTrainConfig", "Sample", "load_samples", "train_step", "train_fm", "FMTrainResult"]


@dataclasses.dataclass(frozen=True)
class FMTrainConfig:
    """``sodkd train-fm``: a student trained on foundation pseudo labels.

    Attributes:
        labels: output folder (or ``s3://``) of a ``sodkd label --teacher foundation`` run.
        images: the folder/bucket the labelled keys are relative to (the labelling job's ``input``).
        teacher_labels: optional output of a SOD-teacher labelling run over the same images; fused with the
            foundation labels (rule in :func:`kd.pseudo_labels.fuse_with_teacher`). Images without a teacher
            label keep the foundation label.
        model: registered student name.
        loss: weights and trust threshold of the objective.
        steps, batch_size, lr, momentum, weight_decay, backbone_lr_mult: SGD recipe (KD-SCFNet's values).
        sizes: multi-scale training sides.
        augment: paper augmentations on (image, target, confidence).
        limit: use at most this many labelled images (sorted by id).
        output: where to write the weights (``.pt``; local or ``s3://``); None = do not write.
        threads: torch intra-op threads (0 = torch's default).
    """

    labels: str
    images: str
    teacher_labels: str | None = None
    model: str = "dedecoder_m3"
    loss: FMLossConfig = dataclasses.field(default_factory=FMLossConfig)
    steps: int = 1000
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 0.1
    sizes: tuple[int, ...] = TRAIN_SIZES
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    limit: int | None = None
    seed: int = 0
    output: str | None = None
    threads: int = 0
    log_every: int = 1
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="sodkd-fm"))

    def __post_init__(self) -> None:
        if not self.labels or not self.images:
            raise ConfigError("labels and images: both are required")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not self.sizes or any(s < 32 for s in self.sizes):
            raise ConfigError(f"sizes: need one or more sides >= 32, got {list(self.sizes)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1 or null, got {self.limit}")


@dataclasses.dataclass
class Sample:
    """One training sample at the label size: uint8 image HxWx3, float32 target and confidence HxW."""

    id: str
    key: str
    image: np.ndarray
    target: np.ndarray
    conf: np.ndarray


def _decode_gray(data: bytes, what: str) -> np.ndarray:
    from cluster.labels import decode_label
    if data is None:
        raise ValueError(f"{what}: missing PNG")
    return decode_label(bytes(data))


def load_samples(cfg: FMTrainConfig) -> list[Sample]:
    """Foundation label rows joined by id to their images (and fused with teacher labels when asked).

    Raises:
        ValueError: the label output has no foundation columns (it was made by a SOD teacher), or holds no rows.
    """
    import torch

    from cluster.labels import read_labels
    from kd.imageio import decode_image, resize
    from kd.pseudo_labels import fuse_with_teacher

    table = read_labels(cfg.labels, cfg.s3)
    if S.CONF_PNG not in table.column_names:
        raise ValueError(f"{cfg.labels}: label shards have no {S.CONF_PNG!r} column; label with "
                         f"`sodkd label --teacher foundation` first")
    if table.num_rows == 0:
        raise ValueError(f"{cfg.labels}: no label rows")
    rows = sorted(table.select([S.ID, S.KEY, S.LABEL_PNG, S.CONF_PNG]).to_pylist(), key=lambda r: r[S.ID])
    if cfg.limit:
        rows = rows[: cfg.limit]
    teacher: dict[str, bytes] = {}
    if cfg.teacher_labels:
        t = read_labels(cfg.teacher_labels, cfg.s3, columns=[S.LABEL_PNG])
        teacher = dict(zip(t.column(S.ID).to_pylist(), t.column(S.LABEL_PNG).to_pylist()))
    fs, root = storage.get_filesystem(cfg.images, cfg.s3)
    samples, fused = [], 0
    for r in rows:
        target = _decode_gray(r[S.LABEL_PNG], f"label of {r[S.KEY]}")
        conf = _decode_gray(r[S.CONF_PNG], f"confidence of {r[S.KEY]}")
        h, w = target.shape
        try:
            image = decode_image(storage.read_bytes(fs, storage.join(root, r[S.KEY])), max_side=max(h, w))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{cfg.images}: image {r[S.KEY]!r} of label {r[S.ID]} not found") from e
        image = resize(image, (h, w))
        if r[S.ID] in teacher:
            t_map = _decode_gray(teacher[r[S.ID]], f"teacher label of {r[S.KEY]}")
            if t_map.shape != (h, w):
                t_map = resize((t_map * 255).round().astype(np.uint8), (h, w)).astype(np.float32) / 255.0
            y, c = fuse_with_teacher(torch.from_numpy(target), torch.from_numpy(conf), torch.from_numpy(t_map))
            target, conf = y.numpy(), c.numpy()
            fused += 1
        samples.append(Sample(r[S.ID], r[S.KEY], image, target.astype(np.float32), conf.astype(np.float32)))
    if cfg.teacher_labels:
        log.info("fused %d of %d foundation labels with teacher labels from %s", fused, len(samples),
                 cfg.teacher_labels)
    return samples


def train_step(model, optimizer, batch: Sequence[Any], loss_cfg: FMLossConfig) -> dict[str, float]:
    """One SGD step on ``(images, target, conf)`` tensors; returns ``{"loss": ..., parts ...}``."""
    from kd.pseudo_labels import fm_model_loss

    images, target, conf = batch
    optimizer.zero_grad(set_to_none=True)
    loss, parts = fm_model_loss(model, images, target, conf, loss_cfg)
    if not bool(loss.isfinite()):
        raise FloatingPointError(f"loss is {float(loss)}; parts {parts}")
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), **parts}


@dataclasses.dataclass
class FMTrainResult:
    losses: list[float]
    samples: int
    wall_s: float
    weights: str | None = None
    run_id: str | None = None
    model: Any = None


def _batches(samples: list[Sample], cfg: FMTrainConfig, model, rng: np.random.Generator):
    aug = Augmenter(cfg.augment)
    while True:
        order = rng.permutation(len(samples))
        for start in range(0, len(order), cfg.batch_size):
            chosen = [samples[i] for i in order[start:start + cfg.batch_size]]
            yield multiscale_collate([aug(rng, s.image, s.target, s.conf) for s in chosen], rng=rng,
                                     mean=model.mean, std=model.std, sizes=cfg.sizes)


def _train(cfg: FMTrainConfig, result: FMTrainResult, log_metrics) -> None:
    import torch

    from models import create_model, save_weights

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    samples = load_samples(cfg)
    result.samples = len(samples)
    model = create_model(cfg.model).train()
    optimizer = torch.optim.SGD(model.param_groups(cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay),
                                lr=cfg.lr, momentum=cfg.momentum)
    batches = _batches(samples, cfg, model, rng)
    for step in range(cfg.steps):
        out = train_step(model, optimizer, next(batches), cfg.loss)
        result.losses.append(out["loss"])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log_metrics({S.TRAIN_LOSS: out["loss"], **{f"train/{k}": v for k, v in out.items() if k != "loss"}},
                        step)
    model.eval()
    result.model = model
    if cfg.output:
        fs, path = storage.get_filesystem(cfg.output, cfg.s3)
        buf = io.BytesIO()
        save_weights(model, buf, extra_meta={"job": "train-fm", "labels": cfg.labels, "steps": cfg.steps})
        storage.write_bytes(fs, path, buf.getvalue())
        result.weights = cfg.output
    result.wall_s = time.perf_counter() - t0


def train_fm(cfg: FMTrainConfig) -> FMTrainResult:
    """Train ``cfg.model`` on the foundation pseudo labels; record an MLflow run when tracking is enabled."""
    result = FMTrainResult(losses=[], samples=0, wall_s=0.0)
    if not cfg.tracking.enabled:
        _train(cfg, result, lambda metrics, step: None)
        return result
    from cluster import tracking
    with tracking.start_run(cfg.tracking, run_name=cfg.tracking.run_name or f"fm-{cfg.model}",
                            tags={"sodkd.job": "train-fm", "student": cfg.model}) as run:
        result.run_id = run.info.run_id
        tracking.log_params(cfg)
        _train(cfg, result, tracking.log_metrics)
        tracking.log_metrics({"train/samples": result.samples, "train/wall_s": result.wall_s})
    return result
