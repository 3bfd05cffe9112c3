"""Evaluate a model (any teacher/model spec) on a paired image/mask catalog: metrics, curves, sample panels.

Test-time protocol of the paper: resize to the model's input size, sigmoid, resize back to the mask's size.
Every model runs through :class:`cluster.predictor.Predictor` (the engine ``sodkd predict`` and ``sodkd serve``
use): a spec string is loaded by it (``auto``: ONNX Runtime for weights on a CPU), a loaded teacher (an ensemble,
a TTA wrapper) is wrapped. Used by ``make demo``, the reference runs and reports; ``sodkd eval`` scores folders of
saved maps instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

import numpy as np

from cluster import storage
from cluster.catalog import Catalog, Item
from cluster.predictor import Predictor
from cluster.teachers import Teacher
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


def as_predictor(model: str | Teacher | Predictor) -> Predictor:
    """A spec string loaded by :meth:`Predictor.load` (CPU, ``auto``), a teacher wrapped, a predictor as is."""
    if isinstance(model, Predictor):
        return model
    return Predictor.load(model, device="cpu") if isinstance(model, str) else Predictor.wrap(model)


def predict_items(model: str | Teacher | Predictor, catalog: Catalog, items: list[Item], batch_size: int = 8
                  ) -> Iterator[tuple[Item, np.ndarray, np.ndarray]]:
    """Yield (item, RGB image, uint8 prediction at the image's own size) for ``items``."""
    pred = as_predictor(model)
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = [decode_image(storage.read_bytes(catalog.fs, it.path)) for it in chunk]
        for it, im, p in zip(chunk, images, pred.predict_uint8(images)):
            yield it, im, p


def evaluate(model: str | Teacher | Predictor, catalog: Catalog, name: str | None = None, limit: int | None = None,
             sample_keys: list[str] | None = None, batch_size: int = 8, progress_every: int = 100) -> EvalResult:
    """Score ``model`` (a spec string, a loaded :class:`Teacher` or a :class:`Predictor`) on a paired catalog."""
    runner = as_predictor(model)
    items = catalog.items[:limit] if limit else catalog.items
    if any(it.mask_path is None for it in items):
        raise ValueError(f"{catalog.uri}: evaluation needs a paired catalog (images with masks)")
    wanted = set(sample_keys or [])
    ev, samples = SODEvaluator(), {}
    t0 = time.perf_counter()
    for n, (it, _, pred) in enumerate(predict_items(runner, catalog, items, batch_size), 1):
        gt = decode_mask(storage.read_bytes(catalog.fs, it.mask_path))
        pred = resize(pred, gt.shape)
        ev.step(pred, gt)
        if it.key in wanted:
            samples[it.key] = pred
        if progress_every and n % progress_every == 0:
            log.info("%s: evaluated %d/%d images", name or runner.teacher.id, n, len(items))
    dt = time.perf_counter() - t0
    return EvalResult(name or runner.teacher.id, ev.results(), ev.curves(), samples, len(items) / dt, len(items))
