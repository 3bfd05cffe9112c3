"""The foundation task's data: foundation-model pseudo-label shards -> (image, target, confidence) samples.

The foundation labeller (:mod:`cluster.label.foundation`, :mod:`cluster.foundation`) writes label shards whose
rows carry the pseudo mask (``label_png``) and its per-pixel confidence (``conf_png``). The student
(``dedecoder_m3`` by default) trains on them in the one training loop (:mod:`cluster.training.loop`) as the
image task in ``mode: foundation`` (:class:`cluster.training.image.ImageTask`):

* each row is joined **by id** to its image; with ``data.unlabeled[i].teacher_labels`` set, a SOD teacher's
  label for the same id is fused in per pixel (:func:`kd.pseudo_labels.fuse_with_teacher`): that is
  :func:`foundation_maps`, shared by the Ray Data join of the core and by :func:`load_samples`;
* the loss is ``sum_i w_i (BCE + partial BCE on c >= tau + IoU)(s_i) + w_edge * edge BCE``
  (:func:`kd.pseudo_labels.fm_model_loss`, weights in the ``fm`` block of the training config), with the
  paper's augmentations applied to image, target and confidence together and multi-scale batches.

:func:`load_samples` reads a (modest) pseudo-label set into memory in this process: for inspection, notebooks
and tests of the join; training streams through Ray Data instead.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from cluster import storage
from cluster.storage import S3Config
from kd import schema as S

log = logging.getLogger(__name__)

__all__ = ["Sample", "foundation_maps", "require_foundation_labels", "check_foundation_shards", "load_samples"]


@dataclasses.dataclass
class Sample:
    """One training sample at the label size: uint8 image HxWx3, float32 target and confidence HxW."""

    id: str
    key: str
    image: np.ndarray
    target: np.ndarray
    conf: np.ndarray


def _decode_gray(data: bytes | None, what: str) -> np.ndarray:
    from cluster.labels import decode_label
    if data is None:
        raise ValueError(f"{what}: missing PNG")
    return decode_label(bytes(data))


def foundation_maps(label_png: bytes, conf_png: bytes, teacher_png: bytes | None = None,
                    what: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """A foundation label row's ``(target, confidence)``, float32 HxW in [0, 1], at the label size.

    With ``teacher_png`` (a SOD teacher's label of the same image, any size), the two are fused per pixel by
    :func:`kd.pseudo_labels.fuse_with_teacher` after resizing the teacher's map to the label size.
    """
    import torch

    from kd.imageio import resize
    from kd.pseudo_labels import fuse_with_teacher

    target = _decode_gray(label_png, f"{what}: pseudo mask")
    conf = _decode_gray(conf_png, f"{what}: confidence")
    if target.shape != conf.shape:
        raise ValueError(f"{what}: pseudo mask {target.shape} and confidence {conf.shape} differ in size")
    if teacher_png is not None:
        t_map = _decode_gray(teacher_png, f"{what}: teacher label")
        if t_map.shape != target.shape:
            t_map = resize((t_map * 255).round().astype(np.uint8), target.shape).astype(np.float32) / 255.0
        y, c = fuse_with_teacher(torch.from_numpy(target), torch.from_numpy(conf), torch.from_numpy(t_map))
        target, conf = y.numpy(), c.numpy()
    return target.astype(np.float32), conf.astype(np.float32)


def require_foundation_labels(uri: str, s3: S3Config | None = None) -> None:
    """Raise ``ValueError`` naming ``uri`` unless its label shards carry foundation confidences."""
    from cluster import labels as L

    fs, root = L.resolve_root(uri, s3)
    check_foundation_shards(uri, fs, L.shard_paths(fs, root, S.LABELS_DIR))


def check_foundation_shards(uri: str, fs, shards: list[str]) -> None:
    """:func:`require_foundation_labels` on an already listed output (``shards`` of ``uri`` on ``fs``)."""
    import pyarrow.parquet as pq

    if not shards:
        raise ValueError(f"{uri}: no label shards (expected {S.LABELS_DIR}/*.parquet of a labelling run)")
    if S.CONF_PNG not in pq.read_schema(shards[0], filesystem=fs).names:
        raise ValueError(f"{uri}: label shards have no {S.CONF_PNG!r} column; label with "
                         f"`sodkd label --teacher foundation` first")


def load_samples(labels: str, images: str, teacher_labels: str | None = None, s3: S3Config | None = None,
                 limit: int | None = None) -> list[Sample]:
    """Foundation label rows joined by id to their images (fused with teacher labels when given), in memory.

    Args:
        labels: output of ``sodkd label --teacher foundation`` (folder or ``s3://``).
        images: the folder/bucket the labelled keys are relative to (the labelling job's ``input``).
        teacher_labels: optional SOD-teacher label output over the same images; images without a teacher
            label keep the foundation label.
        limit: at most this many rows (sorted by id).
    Raises:
        ValueError: the label output has no foundation columns (a SOD teacher made it), or holds no rows.
        FileNotFoundError: a labelled image is missing.
    """
    from cluster.labels import read_labels
    from kd.imageio import decode_image, resize

    require_foundation_labels(labels, s3)
    table = read_labels(labels, s3)
    if table.num_rows == 0:
        raise ValueError(f"{labels}: no label rows")
    rows = sorted(table.select([S.ID, S.KEY, S.LABEL_PNG, S.CONF_PNG]).to_pylist(), key=lambda r: r[S.ID])
    if limit:
        rows = rows[:limit]
    teacher: dict[str, bytes] = {}
    if teacher_labels:
        t = read_labels(teacher_labels, s3, columns=[S.LABEL_PNG])
        teacher = dict(zip(t.column(S.ID).to_pylist(), t.column(S.LABEL_PNG).to_pylist()))
    fs, root = storage.get_filesystem(images, s3)
    samples = []
    for r in rows:
        target, conf = foundation_maps(r[S.LABEL_PNG], r[S.CONF_PNG], teacher.get(r[S.ID]), r[S.KEY])
        h, w = target.shape
        try:
            image = decode_image(storage.read_bytes(fs, storage.join(root, r[S.KEY])), max_side=max(h, w))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{images}: image {r[S.KEY]!r} of label {r[S.ID]} not found") from e
        samples.append(Sample(r[S.ID], r[S.KEY], resize(image, (h, w)), target, conf))
    if teacher_labels:
        log.info("fused %d of %d foundation labels with teacher labels from %s",
                 sum(r[S.ID] in teacher for r in rows), len(samples), teacher_labels)
    return samples
