"""The image task (modes teacher, supervised, distill, foundation): what a batch becomes on the worker, its
loss, the validation on a labelled set, the picture panel, and the starting weights.

A batch (rows of :mod:`cluster.training.data`) is augmented per sample, image and target together, then
resized to one random training size (:func:`collate`). Validation runs on rank 0 on a labelled folder at
``val.size`` and is scored at each mask's own size (``val/mae``, ``val/sm``, ``val/maxf``, ``val/em``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from typing import Mapping, Sequence

import numpy as np

from cluster import catalog, storage
from cluster.training.loop import Task, unwrap
from cluster.training.sections import TrainConfig, load_train_config
from kd import schema as S
from kd.config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ImageTask", "ValSet", "load_val_set", "predict_val", "score", "collate", "panel", "apply_start_weights"]


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


def collate(batch: Mapping[str, np.ndarray], augmenter, rng: np.random.Generator, mean, std,
            sizes: Sequence[int]):
    """Augment each sample (image and target together), then resize the batch to one random size."""
    import torch

    from kd.augment import multiscale_collate
    images, targets = batch[S.IMAGE], batch[S.TARGET]
    maps = [targets] + ([batch[S.CONF]] if S.CONF in batch else [])
    samples = [augmenter(rng, images[i], *(m[i] for m in maps)) for i in range(len(images))]
    x, y, *conf = multiscale_collate(samples, rng=rng, mean=mean, std=std, sizes=sizes)
    return x, y, torch.as_tensor(np.asarray(batch[S.SOFT], dtype=bool)), (conf[0] if conf else None)


def panel(cfg: TrainConfig, module, val: ValSet, probs: np.ndarray, teacher) -> np.ndarray:
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
    from models.fuse import undo_output_scale
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
        data = storage.read_bytes(fs, path)
        try:
            load_state(model, io.BytesIO(data))
        except ValueError as e:
            raise ConfigError(f"model.init_weights: {m.init_weights}: {e}") from e
        scale = undo_output_scale(model, _header(data))   # a calibrated file: train on from the model as trained
        if scale != 1.0 and verbose:
            log.info("model.init_weights %s: its output scale %g undone (training goes on from the model as "
                     "trained; output.calibrate chooses a new one)", m.init_weights, scale)


def _header(data: bytes) -> dict:
    """A weights file's header (empty for a bare state dict without one)."""
    import io

    from models import WeightsFormatError, read_metadata
    try:
        return read_metadata(io.BytesIO(data))
    except WeightsFormatError:
        return {}


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


class ImageTask(Task):
    """The image job's task (modes teacher, supervised, distill, foundation) for the training loop.

    A batch is a block of Ray Data rows from the worker's shard of the ``train`` dataset
    (:mod:`cluster.training.data`), augmented and resized by :func:`collate`; the loss is
    :func:`kd.step.batch_loss` (masks and soft labels, mixed) or, in mode foundation,
    :func:`kd.pseudo_labels.fm_model_loss`; validation is :func:`score` on the labelled ``val`` folder, with a
    picture panel (image / teacher / prediction / mask) in MLflow.
    """

    def __init__(self, config: Mapping):
        from kd.augment import Augmenter
        self.cfg: TrainConfig = load_train_config(config)
        self.augmenter = Augmenter(self.cfg.data.augment)
        self.val: ValSet | None = None
        self.probs: np.ndarray | None = None
        self.panel_teacher = None
        self.channels_last = self.cfg.scaling.channels_last and self.cfg.scaling.strategy == "ddp"

    def build(self, rank: int, device):
        from models import create_model
        cfg = self.cfg
        model = create_model(cfg.model.name, **cfg.model.kwargs)
        model.input_size = max(cfg.data.sizes)   # recorded in every weights file: the size to run it at
        apply_start_weights(model, cfg, verbose=rank == 0)
        return model, {}

    def open(self, rank: int, world: int, steps: int, tracker) -> None:
        import ray.train
        cfg = self.cfg
        self.shard = ray.train.get_dataset_shard("train")
        self.val = load_val_set(cfg) if rank == 0 else None
        if self.val is not None and cfg.val.panel and cfg.data.teacher.teachers and tracker.active:
            from cluster.teachers import build_teacher
            t = cfg.data.teacher
            self.panel_teacher = build_teacher(list(t.teachers), tta=t.tta, s3=cfg.s3, device="cpu",
                                               precision="fp32", input_size=t.teacher_size, ensemble=t.ensemble)

    def batches(self, epoch: int, rank: int, world: int):
        from kd.losses import boundary_band
        cfg = self.cfg
        self.band = boundary_band(epoch)
        self.rng = np.random.default_rng([cfg.run.seed, epoch, rank])
        return self.shard.iter_batches(batch_size=cfg.per_worker_batch, batch_format="numpy", drop_last=True,
                                       local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                       local_shuffle_seed=cfg.run.seed * 100003 + epoch * 101 + rank
                                       if cfg.data.shuffle_buffer else None)

    def _layout(self):
        import torch
        return torch.channels_last if self.channels_last else torch.preserve_format

    def loss(self, net, module, batch, device, dtype):
        from kd.pseudo_labels import fm_model_loss
        from kd.step import batch_loss
        cfg = self.cfg
        x, y, soft, conf = collate(batch, self.augmenter, self.rng, module.mean, module.std, cfg.data.sizes)
        x, y = x.to(device=device, dtype=dtype, memory_format=self._layout()), y.to(device)
        parts: dict[str, float] = {}
        if cfg.mode == "foundation":
            loss, parts = fm_model_loss(_Float32Outputs(net), x, y, conf.to(device), cfg.fm)
        else:
            loss = batch_loss([o.float() for o in net(x)], y, soft, self.band, cfg.kd, cfg.mask_loss)
        return loss, parts, len(batch[S.ID])

    @property
    def validates(self) -> bool:
        return self.val is not None

    def validate(self, module, dtype, epoch: int) -> dict[str, float]:
        self.probs = predict_val(module, self.val.images, self.cfg.val.batch_size, dtype)
        return score(self.probs, self.val.masks)

    def log_validation(self, tracker, module, epoch: int) -> None:
        if self.cfg.val.panel and tracker.active:
            tracker.image(panel(self.cfg, module, self.val, self.probs, self.panel_teacher),
                          f"panels/epoch_{epoch + 1:03d}.png")
