"""Output calibration over a paired folder: what ``sodkd calibrate`` and a training run's ``output.calibrate`` do.

:func:`val_logits` runs every validation pair through a model the way ``sodkd predict`` does (resized to the working
size, the map's logits kept at that size); :func:`calibrate_model` chooses the scale on them
(:func:`kd.calibration.choose_output_scale`) and folds it into the model (:func:`models.fuse.scale_output`),
returning the record a weights header keeps. The why is in :mod:`kd.calibration`. Never imports Ray.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from cluster import storage
from kd.calibration import MAX_S_DROP, SCALES, ScaleChoice, choose_output_scale, to_logits
from kd.imageio import ImageDecodeError, decode_image, decode_mask, resize

log = logging.getLogger(__name__)

__all__ = ["val_logits", "model_predict", "calibrate_model", "calibration_record"]


def val_logits(predict: Callable[[np.ndarray], Any], cat, size: int, batch: int = 16):
    """Logit maps of every pair of ``cat`` (a paired catalog) at ``size``: ``predict`` takes uint8 (N, size, size,
    3) RGB images and returns their (N, size, size) probabilities. Returns ``(logits, masks, skipped)``: the
    (size, size) logits, the uint8 masks at their own size, and the keys of pairs that could not be decoded
    (skipped with a warning)."""
    logits, masks, skipped, todo = [], [], [], []

    def flush() -> None:
        if todo:
            logits.extend(to_logits(np.asarray(predict(np.stack(todo)))))
            todo.clear()

    for item in cat.items:
        try:
            im = decode_image(storage.read_bytes(cat.fs, item.path))
            m = decode_mask(storage.read_bytes(cat.fs, item.mask_path))
        except (ImageDecodeError, OSError) as e:
            skipped.append(item.key)
            log.warning("skipped %s: %s", item.key, e)
            continue
        todo.append(resize(im, (size, size)))
        masks.append(m)
        if len(todo) == batch:
            flush()
            log.info("calibrate: %d / %d pairs through the model", len(logits), len(cat.items))
    flush()
    return logits, masks, skipped


def model_predict(model) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` for :func:`val_logits` from an eval-mode model of this package (``normalize`` + ``predict``)."""
    import torch

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = model.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
            return model.predict(x)[:, 0].float().numpy()
    return run


def calibration_record(choice: ScaleChoice, val: str, size: int, skipped: Sequence[str]) -> dict[str, Any]:
    """What a weights header (``calibration``) and ``--json`` keep of a choice."""
    return {"val": val, "pairs": choice.images, "skipped": list(skipped), "size": size, "scale": choice.scale,
            "mae_before": choice.before["mae"], "mae_after": choice.after["mae"],
            "sm_before": choice.before["sm"], "sm_after": choice.after["sm"]}


def calibrate_model(model, cat, val: str, size: int, scales: Sequence[float] = SCALES,
                    max_s_drop: float = MAX_S_DROP, batch: int = 16, predict=None):
    """Choose ``model``'s output scale on the pairs of ``cat`` (named ``val`` in the record) at ``size`` and fold it
    into the model (in place). ``predict`` overrides how the maps are made (default :func:`model_predict`).
    Returns ``(choice, record)``; raises ValueError when no pair could be decoded."""
    from models.fuse import scale_output
    logits, masks, skipped = val_logits(predict or model_predict(model), cat, size, batch)
    if not masks:
        raise ValueError(f"{val}: no validation pair could be decoded ({len(skipped)} skipped)")
    choice = choose_output_scale(logits, masks, scales, max_s_drop)
    scale_output(model, choice.scale)
    return choice, calibration_record(choice, val, size, skipped)
