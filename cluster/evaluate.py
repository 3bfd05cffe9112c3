"""Evaluate a model (any teacher/model spec) on a paired image/mask catalog: metrics, curves, sample panels.

Test-time protocol of the paper: resize to the model's input size, sigmoid, resize back to the mask's size.
Used by ``make demo``, the reference runs and reports; ``sodkd eval`` scores folders of saved maps instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

import numpy as np

from cluster import storage
from cluster.catalog import Catalog, Item
from cluster.teachers import Teacher, build_teacher
from kd.imageio import decode_image, decode_mask, resize
from kd.metrics import SODEvaluator

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    name: str
    metrics: dict[str, float]
    curves: dict[str, np.ndarray]
    samples: dict[str, np.ndarray]      # item key -> HxW uint8 prediction at the mask's size (a few items)
    images_per_s: float
    count: int


def predict_items(teacher: Teacher, catalog: Catalog, items: list[Item], batch_size: int = 8
                  ) -> Iterator[tuple[Item, np.ndarray, np.ndarray]]:
    """Yield (item, RGB image, uint8 prediction at the image's own size) for ``items``."""
    s = teacher.input_size
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = [decode_image(storage.read_bytes(catalog.fs, it.path)) for it in chunk]
        batch = np.stack([resize(im, (s, s)) for im in images])
        probs = teacher.predict(batch)
        for it, im, p in zip(chunk, images, probs):
            pred = resize((np.clip(p, 0, 1) * 255 + 0.5).astype(np.uint8), im.shape[:2])
            yield it, im, pred


def evaluate(model: str | Teacher, catalog: Catalog, name: str | None = None, limit: int | None = None,
             sample_keys: list[str] | None = None, batch_size: int = 8, progress_every: int = 100) -> EvalResult:
    """Score ``model`` (a spec string or a loaded :class:`Teacher`) on a paired catalog."""
    teacher = build_teacher(model, device="cpu") if isinstance(model, str) else model
    items = catalog.items[:limit] if limit else catalog.items
    if any(it.mask_path is None for it in items):
        raise ValueError(f"{catalog.uri}: evaluation needs a paired catalog (images with masks)")
    wanted = set(sample_keys or [])
    ev, samples = SODEvaluator(), {}
    t0 = time.perf_counter()
    for n, (it, _, pred) in enumerate(predict_items(teacher, catalog, items, batch_size), 1):
        gt = decode_mask(storage.read_bytes(catalog.fs, it.mask_path))
        pred = resize(pred, gt.shape)
        ev.step(pred, gt)
        if it.key in wanted:
            samples[it.key] = pred
        if progress_every and n % progress_every == 0:
            log.info("%s: evaluated %d/%d images", name or teacher.id, n, len(items))
    dt = time.perf_counter() - t0
    return EvalResult(name or teacher.id, ev.results(), ev.curves(), samples, len(items) / dt, len(items))
