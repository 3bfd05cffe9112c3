"""One training step's loss for all three jobs, and the picture panel the trainer logs.

A batch may mix two kinds of rows (``soft`` flags them):

- **hard** rows carry a ground-truth mask ``m``: the KD-SCFNet teacher loss, used for teachers and for the
  supervised-only (FS) student, ``L_hard = sum_i w_i (D(p_i, m) + D(edge_b(p_i), edge_b(m)))``;
- **soft** rows carry a teacher's probability map ``t``: the distillation loss
  ``L_soft = sum_i w_i D(p_i, t)`` (+ ``kd_bce * sum_i w_i BCE(p_i, t)`` when asked: beyond the paper, whose
  released code distils with the dice alone; BCE is minimised at ``p = t`` pixel by pixel, where the dice of a
  soft target rewards pushing every pixel above about ``dice / 2`` to 1),

with ``p_i = sigmoid(side output i)``, ``w = (1, 1/2, 1/4, 1/8)``, ``D`` the soft dice and ``edge_b`` the
boundary band of width ``b`` (see :mod:`kd.losses`). Both losses average over their rows, so the batch loss
is the row-weighted mean ``(n_hard * L_hard + n_soft * L_soft) / (n_hard + n_soft)``: a mixed batch weighs
every image equally whatever its label source.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from kd.losses import bce_soft, deep_supervision, kd_dice_loss, teacher_loss

__all__ = ["batch_loss", "make_panel"]


def _soft_loss(logits_list: Sequence[Tensor], target: Tensor, kd_bce: float) -> Tensor:
    loss = kd_dice_loss(logits_list, target)
    if kd_bce:
        loss = loss + float(kd_bce) * deep_supervision(bce_soft, logits_list, target.detach())
    return loss


def batch_loss(logits_list: Sequence[Tensor], target: Tensor, soft: Tensor, band: int,
               kd_bce: float = 0.0) -> Tensor:
    """Loss of one batch of side outputs against mixed targets (module docstring).

    Args:
        logits_list: four ``(B, 1, H, W)`` side-output logits, finest first.
        target: ``(B, 1, H, W)`` in [0, 1]: masks for hard rows, teacher probabilities for soft rows.
        soft: ``(B,)`` bool, True where ``target`` is a teacher's soft label.
        band: boundary band width for the hard rows (``kd.losses.boundary_band(epoch)``).
        kd_bce: weight of the per-pixel BCE added to the soft rows' dice (0 = the paper's loss).
    Returns:
        0-d tensor.
    """
    if soft.dim() != 1 or soft.shape[0] != target.shape[0]:
        raise ValueError(f"soft must be a (B,) flag vector for B={target.shape[0]}, got {tuple(soft.shape)}")
    soft = soft.to(device=target.device, dtype=torch.bool)
    n = target.shape[0]
    n_soft = int(soft.sum())
    if n_soft == 0:
        return teacher_loss(logits_list, target, band)
    if kd_bce < 0:
        raise ValueError(f"kd_bce must be >= 0, got {kd_bce}")
    if n_soft == n:
        return _soft_loss(logits_list, target, kd_bce)
    hard = ~soft
    l_soft = _soft_loss([x[soft] for x in logits_list], target[soft], kd_bce)
    l_hard = teacher_loss([x[hard] for x in logits_list], target[hard], band)
    return (n_soft * l_soft + (n - n_soft) * l_hard) / n


def _gray_to_rgb(m: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    m = np.asarray(m)
    if m.dtype != np.uint8:
        m = (np.clip(m.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    img = Image.fromarray(m, "L" if m.ndim == 2 else "RGB").resize((size, size), Image.BILINEAR)
    arr = np.asarray(img)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def make_panel(rows: Sequence[Sequence[np.ndarray | None]], tile: int = 128, gap: int = 2) -> np.ndarray:
    """A grid picture, one row per sample, one column per map (e.g. image | teacher | student | mask).

    Args:
        rows: per sample, a list of arrays: uint8 ``HxWx3`` images or ``HxW`` maps (uint8 0..255 or float in
            [0, 1]); ``None`` leaves a black tile (e.g. no teacher for this run). All rows have the same length.
        tile: side of each square tile in pixels.
    Returns:
        uint8 ``(R*tile + (R-1)*gap) x (C*tile + (C-1)*gap) x 3``, white gaps.
    """
    if not rows:
        raise ValueError("make_panel: rows is empty")
    ncol = len(rows[0])
    if any(len(r) != ncol for r in rows):
        raise ValueError("make_panel: every row must have the same number of columns")
    h = len(rows) * tile + (len(rows) - 1) * gap
    w = ncol * tile + (ncol - 1) * gap
    panel = np.full((h, w, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, item in enumerate(row):
            y, x = r * (tile + gap), c * (tile + gap)
            panel[y:y + tile, x:x + tile] = 0 if item is None else _gray_to_rgb(item, tile)
    return panel
