"""One training step's loss for all three jobs, and the picture panel the trainer logs.

A batch may mix two kinds of rows (``soft`` flags them):

- **hard** rows carry a ground-truth mask ``m`` (teachers, the supervised-only FS student):
  ``L_hard = sum_i w_i [D(p_i, m) + b * D(edge(p_i), edge(m)) + c * BCE(z_i, m)]`` -- KD-SCFNet's soft dice
  and boundary dice (``b = 1, c = 0``: the paper's loss), optionally with a per-pixel BCE (:class:`MaskLoss`);
- **soft** rows carry a teacher's probability map ``t`` (distillation, :class:`KDLoss`):
  ``L_soft = sum_i w_i [S(p_i, t) + lambda * P(z_i, t)]``, a structural term ``S`` (soft dice or soft IoU)
  beside a calibrated per-pixel term ``P`` (BCE or KL to the teacher, optional temperature, optional
  per-pixel confidence weights),

with ``z_i`` the logits of side output i, ``p_i = sigmoid(z_i)``, ``w = (1, 1/2, 1/4, 1/8)``, ``D`` the soft
dice and ``edge`` the boundary band (see :mod:`kd.losses`). Both losses average over their rows, so the batch
loss is the row-weighted mean ``(n_hard * L_hard + n_soft * L_soft) / (n_hard + n_soft)``.

Why a per-pixel term (the optimum argument). For a soft target, the dice ``1 - 2 sum(p t) / (sum p + sum t)``
is not minimised by ``p = t``. Its gradient in one pixel is ``dD/dp_j = -2 (t_j (P + T) - I) / (P + T)^2``
(``P = sum p``, ``T = sum t``, ``I = sum p t``): negative, so the loss falls by raising ``p_j``, wherever
``t_j > I / (P + T) = (1 - D) / 2``, and positive elsewhere. Over the box ``[0, 1]`` the optimum therefore sets
every pixel with ``t`` above that threshold to 1 and the rest to 0: a thresholded, larger map than the
teacher's wherever the teacher is unsure (what the reference runs measured: 38% salient pixels against
the teacher's 27%). The BCE ``-(t log p + (1 - t) log(1 - p))`` has derivative ``(p - t) / (p (1 - p))``
per pixel, zero exactly at ``p = t``: it is *calibrated*, so the student learns the teacher's probability
and not a thresholding of it. KL ``t log(t/p) + (1-t) log((1-t)/(1-p))`` is the BCE minus the teacher's
entropy: the same gradient, 0 at the optimum. Per-pixel weights that depend only on ``t`` (confidence
``|2t - 1|``) leave each pixel's optimum at ``p = t``; they only decide which pixels the student spends its
capacity on. The dice stays beside it for structure: it is normalised per image, so small objects count
as much as large ones.

Why sharpen the target (``KDLoss.sharpen``). The benchmark's MAE compares a map with a *binary* mask. If the
teacher is calibrated, a pixel is salient with probability ``t`` and a prediction ``p`` has expected absolute
error ``t (1 - p) + (1 - t) p``: linear in ``p``, so it is minimised by ``p = 1`` where ``t > 1/2`` and ``p = 0``
elsewhere -- the teacher's *thresholded* map, not ``t`` (the median, not the mean, of a 0/1 variable). A
calibrated term teaches ``t`` itself and so leaves MAE on the table wherever the teacher is unsure. Sharpening
the target to ``t_s = sigmoid(logit(t) / s)`` with ``0 < s < 1`` moves it towards that threshold map while
keeping the order of the teacher's beliefs (``s -> 0``: the hard map ``t > 1/2``, ``s = 0`` in the config);
every term then learns ``t_s`` (its own optimum argument unchanged), and the confidence weights still come
from the teacher's own ``t``. The choice of ``s`` is made on validation data (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses import SIDE_WEIGHTS, boundary_dice, deep_supervision, iou_loss, soft_dice

__all__ = ["KDLoss", "MaskLoss", "soft_loss", "mask_loss", "batch_loss", "pixel_term", "confidence_weights",
           "sharpen_target", "make_panel"]


@dataclasses.dataclass(frozen=True)
class KDLoss:
    """The distillation loss of soft-labelled rows (config section ``kd``; module docstring for the maths).

    Attributes:
        structure: ``dice`` (KD-SCFNet's soft dice), ``iou`` (soft IoU) or ``none``.
        pixel: ``none`` (the paper's dice-only loss), ``bce`` or ``kl`` to the teacher's probability.
        pixel_weight: ``lambda``, the weight of the per-pixel term.
        temperature: ``T``: the per-pixel term compares ``sigmoid(z / T)`` with ``sigmoid(logit(t) / T)``,
            times ``T^2`` (Hinton et al.); 1 = plain.
        confidence: ``none`` or ``teacher``: per-pixel weights ``floor + (1 - floor) |2t - 1|`` on the
            per-pixel term (normalised to mean 1 over the batch's pixels).
        confidence_floor: the weight of a pixel the teacher is least sure of (t = 0.5).
        sharpen: ``s``: every term learns ``sigmoid(logit(t) / s)`` instead of ``t`` (module docstring: the MAE
            optimum of a calibrated teacher is its thresholded map); 1 = the teacher's own probability,
            0 = the hard map ``t > 0.5``.
    """

    structure: Literal["dice", "iou", "none"] = "dice"
    pixel: Literal["none", "bce", "kl"] = "none"
    pixel_weight: float = 1.0
    temperature: float = 1.0
    confidence: Literal["none", "teacher"] = "none"
    confidence_floor: float = 0.25
    sharpen: float = 1.0

    def __post_init__(self) -> None:
        from kd.config import ConfigError
        if self.structure == "none" and self.pixel == "none":
            raise ConfigError("kd: structure and pixel are both none: nothing to learn from")
        if self.pixel_weight < 0:
            raise ConfigError(f"kd.pixel_weight: must be >= 0, got {self.pixel_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"kd.temperature: must be > 0, got {self.temperature}")
        if not 0 <= self.confidence_floor <= 1:
            raise ConfigError(f"kd.confidence_floor: must lie in [0, 1], got {self.confidence_floor}")
        if not 0 <= self.sharpen <= 1:
            raise ConfigError(f"kd.sharpen: must lie in [0, 1] (1 = the teacher's probability, 0 = its hard "
                              f"map), got {self.sharpen}")

    def describe(self) -> str:
        parts = [] if self.structure == "none" else [self.structure]
        if self.pixel != "none":
            term = self.pixel + (f"/T={self.temperature:g}" if self.temperature != 1 else "")
            term += " x conf" if self.confidence != "none" else ""
            parts.append(term if self.pixel_weight == 1 else f"{self.pixel_weight:g} {term}")
        text = " + ".join(parts)
        return text if self.sharpen == 1 else f"{text}, target sharpened s={self.sharpen:g}"


@dataclasses.dataclass(frozen=True)
class MaskLoss:
    """The loss of rows with a ground-truth mask (config section ``mask_loss``).

    ``boundary``: weight of the boundary dice (1 = KD-SCFNet); ``bce``: weight of a per-pixel BCE (0 = the paper).
    """

    boundary: float = 1.0
    bce: float = 0.0

    def __post_init__(self) -> None:
        from kd.config import ConfigError
        if self.boundary < 0 or self.bce < 0:
            raise ConfigError(f"mask_loss: boundary and bce must be >= 0, got {self.boundary}, {self.bce}")


_EPS = 1e-4


def confidence_weights(t: Tensor, floor: float) -> Tensor:
    """``w = floor + (1 - floor) |2t - 1|``: 1 where the teacher is sure, ``floor`` where it says 0.5."""
    return floor + (1.0 - floor) * (2.0 * t - 1.0).abs()


def sharpen_target(t: Tensor, s: float) -> Tensor:
    """``sigmoid(logit(t) / s)`` (``0 < s <= 1``), or the hard map ``t > 0.5`` for ``s = 0`` (module docstring)."""
    t = t.detach().clamp(0.0, 1.0)
    if s == 1.0:
        return t
    if s == 0.0:
        return (t > 0.5).to(t.dtype)
    return torch.sigmoid(torch.logit(t.clamp(_EPS, 1 - _EPS)) / float(s))


def pixel_term(logits: Tensor, t: Tensor, cfg: KDLoss, weights_from: Tensor | None = None) -> Tensor:
    """The per-pixel term ``P(z, t)`` of one side output: mean (or confidence-weighted mean) over pixels.

    ``weights_from``: the map the confidence weights come from (the teacher's own, unsharpened ``t``); default ``t``.
    """
    q = t.detach().clamp(0.0, 1.0)
    temp = float(cfg.temperature)
    z = logits
    if temp != 1.0:
        q = torch.sigmoid(torch.logit(q.clamp(_EPS, 1 - _EPS)) / temp)
        z = logits / temp
    per = F.binary_cross_entropy_with_logits(z, q, reduction="none")
    if cfg.pixel == "kl":
        qc = q.clamp(_EPS, 1 - _EPS)
        per = per + qc * torch.log(qc) + (1 - qc) * torch.log(1 - qc)   # minus the teacher's entropy
    if cfg.confidence == "teacher":
        w = confidence_weights((t if weights_from is None else weights_from).detach(), cfg.confidence_floor)
        per = per * (w / w.mean().clamp_min(1e-6))
    return per.mean() * (temp * temp)


def soft_loss(logits_list: Sequence[Tensor], target: Tensor, cfg: KDLoss = KDLoss(),
              weights: Sequence[float] = SIDE_WEIGHTS) -> Tensor:
    """``sum_i w_i [S(p_i, t_s) + lambda P(z_i, t_s)]`` over the side outputs, ``t_s`` the sharpened target
    (:func:`sharpen_target`; ``t_s = t`` at ``sharpen = 1``), confidence weights from ``t`` (module docstring)."""
    teacher = target.detach()
    sharp = sharpen_target(teacher, float(cfg.sharpen))

    def per_output(z: Tensor, t: Tensor) -> Tensor:
        term = z.new_zeros(())
        if cfg.structure == "dice":
            term = term + soft_dice(torch.sigmoid(z), t)
        elif cfg.structure == "iou":
            term = term + iou_loss(torch.sigmoid(z), t)
        if cfg.pixel != "none" and cfg.pixel_weight:
            term = term + float(cfg.pixel_weight) * pixel_term(z, t, cfg, weights_from=teacher)
        return term

    return deep_supervision(per_output, logits_list, sharp, weights)


def mask_loss(logits_list: Sequence[Tensor], mask: Tensor, band: int, cfg: MaskLoss = MaskLoss(),
              weights: Sequence[float] = SIDE_WEIGHTS) -> Tensor:
    """``sum_i w_i [D(p_i, m) + b D(edge(p_i), edge(m)) + c BCE(z_i, m)]`` (KD-SCFNet's at b=1, c=0)."""
    def per_output(z: Tensor, m: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        term = soft_dice(p, m)
        if cfg.boundary:
            term = term + float(cfg.boundary) * boundary_dice(p, m, band)
        if cfg.bce:
            term = term + float(cfg.bce) * F.binary_cross_entropy_with_logits(z, m)
        return term

    return deep_supervision(per_output, logits_list, mask.detach(), weights)


def batch_loss(logits_list: Sequence[Tensor], target: Tensor, soft: Tensor, band: int,
               kd: KDLoss = KDLoss(), mask: MaskLoss = MaskLoss()) -> Tensor:
    """Loss of one batch of side outputs against mixed targets (module docstring).

    Args:
        logits_list: four ``(B, 1, H, W)`` side-output logits, finest first.
        target: ``(B, 1, H, W)`` in [0, 1]: masks for hard rows, teacher probabilities for soft rows.
        soft: ``(B,)`` bool, True where ``target`` is a teacher's soft label.
        band: boundary band width for the hard rows (``kd.losses.boundary_band(epoch)``).
        kd: the soft rows' loss; mask: the hard rows' loss.
    Returns:
        0-d tensor.
    """
    if soft.dim() != 1 or soft.shape[0] != target.shape[0]:
        raise ValueError(f"soft must be a (B,) flag vector for B={target.shape[0]}, got {tuple(soft.shape)}")
    soft = soft.to(device=target.device, dtype=torch.bool)
    n = target.shape[0]
    n_soft = int(soft.sum())
    if n_soft == 0:
        return mask_loss(logits_list, target, band, mask)
    if n_soft == n:
        return soft_loss(logits_list, target, kd)
    hard = ~soft
    l_soft = soft_loss([x[soft] for x in logits_list], target[soft], kd)
    l_hard = mask_loss([x[hard] for x in logits_list], target[hard], band, mask)
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
