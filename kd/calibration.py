"""Output calibration for the benchmark's MAE: one logit scale ``k`` for the finest map, chosen on validation pairs.

Why a scale helps. A student trained with BCE (on masks, or on a teacher's probabilities) learns ``p = P(salient |
image)``: it is *calibrated*. The benchmark's MAE compares that map with a binary mask, and the expected absolute
error ``E|p - y| = p (1 - q) + (1 - p) q`` of a pixel that is salient with probability ``q`` is linear in ``p``: it
is minimised at ``p = 1`` when ``q > 0.5`` and at ``p = 0`` when ``q < 0.5`` (the median, not the mean). A
calibrated map therefore pays MAE wherever it is honestly unsure. Multiplying the logits by ``k > 1``,
``p_k = sigmoid(k z)``, moves every pixel towards 0 or 1 on its own side of 0.5: the 0.5 contour, the map's
ranking of pixels and so max F (a threshold sweep) do not change; MAE, weighted F and mean E improve while ``k``
is not so large that confident mistakes dominate; the S-measure, which rewards soft region structure, drops a
little. ``k`` is chosen to minimise MAE on validation pairs (never on the test set) within a bound on the S it
costs, and then folded into the model's finest head (:func:`models.fuse.scale_output`), so the calibrated model costs nothing extra to run.

The same argument is why :class:`kd.step.KDLoss` can sharpen the teacher's targets during training (``sharpen =
1 / k``); a scale after training applies to any student, FS students included, and the reference runs report both
(``benchmarks/RESULTS.md``).

This module never imports Ray; ``sodkd calibrate`` (:mod:`jobs.calibrate_cmd`) runs it over a paired folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kd.metrics import SODEvaluator

__all__ = ["SCALES", "MAX_S_DROP", "ScaleChoice", "choose_output_scale", "to_logits"]

# the candidate scales: 1 (the model as trained) and upwards; above ~6 the map is all but binary
SCALES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)
MAX_S_DROP = 0.005


@dataclass
class ScaleChoice:
    """The chosen scale and every candidate's validation metrics (``kd.metrics`` keys)."""

    scale: float
    images: int
    metrics: dict[float, dict[str, float]] = field(default_factory=dict)

    @property
    def before(self) -> dict[str, float]:
        return self.metrics[1.0]

    @property
    def after(self) -> dict[str, float]:
        return self.metrics[self.scale]

    def table(self) -> str:
        """A markdown table of the candidates (MAE, S, weighted F, max F, mean E), the chosen row marked."""
        keys = ("mae", "sm", "wfm", "fm_max", "em_mean")
        rows = ["| scale | MAE | S | weighted F | max F | mean E |", "|---|---|---|---|---|---|"]
        for k, m in self.metrics.items():
            mark = " (chosen)" if k == self.scale else ""
            rows.append(f"| {k:g}{mark} | " + " | ".join(f"{m[key]:.4f}" for key in keys) + " |")
        return "\n".join(rows)


def to_logits(probs: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Probability maps (what every runner returns) as logits, ``p`` clamped to [1e-6, 1 - 1e-6] first."""
    return torch.logit(torch.as_tensor(probs).float(), eps=1e-6)


def choose_output_scale(logits: Sequence[torch.Tensor], masks: Sequence[np.ndarray],
                        scales: Sequence[float] = SCALES, max_s_drop: float = MAX_S_DROP) -> ScaleChoice:
    """The scale of ``scales`` whose maps have the lowest MAE against ``masks`` among those that keep the S-measure
    within ``max_s_drop`` of the model as trained (ties: the smaller scale).

    Args:
        logits: one (S, S) logit map per validation image, at the model's working size (:func:`to_logits` of
            the runner's maps for images resized to S x S).
        masks: the matching uint8 masks at their own size; each scaled probability map is resized to its mask
            bilinearly, as ``sodkd predict`` resizes the model's map to the image.
        scales: candidate scales, each > 0; 1 (the model as trained) is always scored.
        max_s_drop: how much S the scale may cost (>= 0; 1 turns the guard off). MAE keeps falling, ever more
            slowly, as the map approaches a binary one, while S (and the soft matte ``sodkd predict --mode alpha``
            writes) pays for every step: measured on a DUTS-TR hold-out, most of the MAE gain comes by k = 2 at
            an S cost under 0.005 (``benchmarks/RESULTS.md``, section ``calibration``).
    """
    if len(logits) != len(masks):
        raise ValueError(f"choose_output_scale: {len(logits)} maps for {len(masks)} masks")
    if not len(logits):
        raise ValueError("choose_output_scale: no validation pairs")
    if not max_s_drop >= 0:
        raise ValueError(f"choose_output_scale: max_s_drop must be >= 0, got {max_s_drop}")
    bad = [k for k in scales if not k > 0]
    if bad:
        raise ValueError(f"choose_output_scale: scales must be > 0, got {bad}")
    cands = sorted({1.0, *map(float, scales)})
    evs = {k: SODEvaluator() for k in cands}
    for z, m in zip(logits, masks):
        z = z.float()[None, None]
        for k, ev in evs.items():
            p = torch.sigmoid(k * z)
            if tuple(p.shape[-2:]) != m.shape[:2]:
                p = F.interpolate(p, size=m.shape[:2], mode="bilinear", align_corners=False)
            ev.step((p[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), m)
    metrics = {k: ev.results() for k, ev in evs.items()}
    keep = [k for k in cands if metrics[k]["sm"] >= metrics[1.0]["sm"] - max_s_drop]
    best = min(keep, key=lambda k: (metrics[k]["mae"], k))
    return ScaleChoice(scale=best, images=len(logits), metrics=metrics)
