"""Video saliency evaluation: per-frame metrics averaged per sequence and overall, plus temporal stability.

- **Per-frame metrics** (S-measure, max F, MAE, ...) come from :class:`kd.metrics.SODEvaluator` (PySODMetrics
  defaults: prediction resized to the mask, ``mask > 128``, per-frame min-max normalisation). One evaluator per
  sequence gives the per-sequence figures (mean over its frames); ``overall`` pools every frame of every
  sequence (a long sequence weighs more), ``sequence_mean`` is the unweighted mean over sequences.
- **Temporal stability** (:func:`temporal_stability`, ours): over pairs of consecutive frames whose ground truth
  barely changes -- fewer than ``gt_change_max`` (1%) of the pixels flip between the two masks -- the mean absolute
  change of the *predicted probability map*, ``mean_pixels |p_t - p_{t-1}|`` with ``p`` in [0, 1] (raw, not
  min-max normalised, so a map that flickers between faint and strong counts). Lower is steadier. It is reported
  as ``flicker`` next to ``stable_pairs`` (how many pairs qualified).

Inference (:func:`predict_frames`): an image model runs frame by frame; a model with a ``streamer()`` (the video
student) runs in streaming mode, so frame ``t`` sees frames ``t-K .. t``, as it would live.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from kd.augment import postprocess, preprocess
from kd.metrics import SODEvaluator, resize_to

__all__ = ["temporal_stability", "gt_change_fraction", "VideoEvaluator", "predict_frames", "SUMMARY_KEYS"]

GT_CHANGE_MAX = 0.01
SUMMARY_KEYS = ("sm", "fm_max", "mae", "flicker")


def gt_change_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels whose binarised mask (``> 128``) differs between two uint8 masks of one size."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    return float(np.mean((a > 128) != (b > 128)))


def temporal_stability(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                       gt_change_max: float = GT_CHANGE_MAX) -> tuple[float, int]:
    """Mean absolute change of the prediction between consecutive frames whose mask barely changes.

    ``flicker = mean_{t in S} mean_pixels |p_t - p_{t-1}|`` over ``S = {t >= 1 : change(gt_t, gt_{t-1}) <
    gt_change_max}``, with ``p = pred / 255`` resized (bilinear) to the mask's size.

    Args:
        preds: uint8 HxW maps of consecutive frames of one sequence (any size).
        gts: uint8 masks of the same frames.
    Returns:
        ``(flicker, pairs)``; ``flicker`` is NaN when no pair qualifies.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} masks")
    changes = []
    for t in range(1, len(gts)):
        if gt_change_fraction(gts[t], gts[t - 1]) < gt_change_max:
            a = resize_to(preds[t], gts[t].shape).astype(np.float64) / 255.0
            b = resize_to(preds[t - 1], gts[t - 1].shape).astype(np.float64) / 255.0
            changes.append(float(np.mean(np.abs(a - b))))
    return (float(np.mean(changes)) if changes else float("nan")), len(changes)


class VideoEvaluator:
    """Accumulates frames per sequence: ``add_sequence(name, preds, gts)``, then ``results()``."""

    def __init__(self, gt_change_max: float = GT_CHANGE_MAX):
        self.gt_change_max = gt_change_max
        self._all = SODEvaluator()
        self._per_seq: dict[str, dict] = {}
        self._flicker_sum, self._pairs = 0.0, 0

    def add_sequence(self, name: str, preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> dict[str, float]:
        """Score one sequence's frames (in order); returns its figures. A name may be added once."""
        if name in self._per_seq:
            raise ValueError(f"sequence {name!r} was already added")
        if len(preds) != len(gts) or not preds:
            raise ValueError(f"sequence {name!r}: {len(preds)} predictions for {len(gts)} masks")
        ev = SODEvaluator()
        for p, g in zip(preds, gts):
            ev.step(p, g)
            self._all.step(p, g)
        flicker, pairs = temporal_stability(preds, gts, self.gt_change_max)
        if pairs:
            self._flicker_sum += flicker * pairs
            self._pairs += pairs
        figures = {**ev.results(), "flicker": flicker, "stable_pairs": pairs, "frames": len(preds)}
        self._per_seq[name] = figures
        return figures

    def results(self) -> dict:
        """``{"sequences": {name: figures}, "overall": figures over all frames, "sequence_mean": unweighted}``.

        ``overall["flicker"]`` is pooled over every qualifying pair; ``sequence_mean["flicker"]`` averages the
        sequences that have at least one such pair.
        """
        if not self._per_seq:
            raise ValueError("no sequence evaluated: call add_sequence() first")
        overall = {**self._all.results(),
                   "flicker": self._flicker_sum / self._pairs if self._pairs else float("nan"),
                   "stable_pairs": self._pairs, "frames": self._all.count}
        seq_mean: dict[str, float] = {}
        for key in overall:
            values = [f[key] for f in self._per_seq.values() if not (isinstance(f[key], float) and np.isnan(f[key]))]
            seq_mean[key] = float(np.mean(values)) if values else float("nan")
        return {"sequences": dict(self._per_seq), "overall": overall, "sequence_mean": seq_mean}


@torch.inference_mode()
def predict_frames(model: torch.nn.Module, frames: Iterable[np.ndarray], size: int | None = None) -> list[np.ndarray]:
    """Saliency maps (uint8, each frame's original size) of consecutive frames of one sequence.

    ``model`` is put in eval mode. Models with ``streamer()`` run in streaming mode; others frame by frame.
    Frames are uint8 HxWx3 RGB, resized to ``size`` (default ``model.input_size``) and normalised with the model's
    statistics (``kd.augment.preprocess``); maps are resized back (``kd.augment.postprocess``).
    """
    model.eval()
    size = int(size or getattr(model, "input_size", 352))
    device = next(model.parameters()).device
    stream = model.streamer() if hasattr(model, "streamer") else None
    out = []
    for frame in frames:
        x = preprocess(frame, size, mean=model.mean, std=model.std)[None].to(device)
        prob = stream.predict(x) if stream is not None else model.predict(x)
        out.append(postprocess(prob, frame.shape[:2]))
    return out

