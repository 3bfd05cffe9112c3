"""The image task's input pipeline on Ray Data (built on the driver; Ray tasks and actors run its stages).

Every source becomes Ray Data rows ``{id, image, target, soft}`` (+ ``conf`` in mode foundation) -- the image
decoded and resized once to ``data.load_size`` (square, uint8), the target a uint8 map of the same size (a mask,
or a teacher's probability x 255):

* paired sources (``data.paired``): image and mask by stem (:func:`load_pairs`);
* offline soft labels (the Parquet shards of ``sodkd label``): read as their own dataset and joined to the
  images by ``id`` (:func:`join_labels`, a broadcast join against the image manifest: the labels stream, the
  manifest is small);
* online soft labels: a teacher actor pool (:class:`OnlineLabeler` under ``map_batches`` with
  ``ActorPoolStrategy``) inside the same pipeline that feeds the trainer, so no label is stored.

The decoded images are materialised once (``data.cache``) so epochs re-run only the teacher, and their blocks
are drawn in a new order every epoch (``data.shuffle_blocks``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from cluster import catalog, storage
from cluster.raypool import cached_filesystem
from cluster.storage import S3Config
from cluster.teachers.spec import EnsembleConfig
from cluster.teacher_actor import TeacherActor
from kd import schema as S

if TYPE_CHECKING:
    from cluster.training.sections import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["load_pairs", "load_images", "join_labels", "full_confidence", "OnlineLabeler", "TrainData",
           "build_train_dataset"]


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
    fs, _ = cached_filesystem(root_uri, s3)
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
    fs, _ = cached_filesystem(root_uri, s3)
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
    a SOD teacher's label PNG) are fused in per pixel (:func:`cluster.training.foundation.foundation_maps`).
    """
    from cluster.labels import decode_label
    from cluster.training.foundation import foundation_maps
    from kd.imageio import resize

    def u8(m: np.ndarray) -> np.ndarray:
        return resize((m * 255.0 + 0.5).astype(np.uint8), (size, size))

    fs, _ = cached_filesystem(root_uri, s3)
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


class OnlineLabeler(TeacherActor):
    """Ray Data callable class: fills ``target`` with a teacher's probabilities (x 255, uint8) per batch.

    The labelling job's teacher actor (:class:`cluster.teacher_actor.TeacherActor`, loaded once per actor) with
    the trainer's columns as output: the teacher sees the decoded image at ``data.load_size`` and its map is
    returned at the same size, so the worker's augmentation moves image and label together. Also callable
    directly (tests).
    """

    def __init__(self, teachers: Sequence[str], *, s3: S3Config | None = None, tta: str = "none",
                 teacher_size: int | None = None, device: str = "cpu", precision: str = "auto", threads: int = 1,
                 backend: str = "auto", ensemble: EnsembleConfig | None = None):
        super().__init__(teachers, s3=s3, tta=tta, teacher_size=teacher_size, device=device, precision=precision,
                         threads=threads, backend=backend, ensemble=ensemble)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(batch[S.IMAGE])
        if len(images) == 0:
            return dict(batch)
        p, _ = self.maps(images, images.shape[1])
        out = dict(batch)
        out[S.TARGET] = (p.float().cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
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
            from cluster.training.foundation import check_foundation_shards
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
                                   "precision": pool.precision, "threads": pool.threads(),
                                   "backend": pool.backend, "ensemble": t.ensemble}))
    dataset = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    if not online:   # with an online teacher its input was shuffled above; the labels stream behind it
        dataset = _shuffled_blocks(dataset, cfg)
    rows = sum(counts.values())
    if rows == 0:
        raise ValueError("training data: every source is empty after decoding")
    return TrainData(dataset, rows, counts)
