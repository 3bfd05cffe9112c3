"""Losses for training SOD teachers and distilling students: plain functions on tensors.

Shapes: a saliency map is ``(B, 1, H, W)`` (``(B, H, W)`` also works); every loss reduces per image over
all non-batch dimensions and returns the mean over the batch as a 0-d tensor unless stated otherwise.
``logits`` are raw network outputs; ``prob`` are probabilities in [0, 1] (``sigmoid(logits)``).

Papers:
- KD-SCFNet (Zhang, Liang, Shi, ECCV 2022, arXiv 2208.02178): soft dice, boundary dice, the deep-supervision
  weights 1, 1/2, 1/4, 1/8 for the side outputs s2..s5, the shrinking boundary band, and the distillation loss
  ``D(s2,t) + D(s3,t)/2 + D(s4,t)/4 + D(s5,t)/8`` against ``t = sigmoid(teacher out2)``.
- Foundation-model distillation (He et al., arXiv 2501.04582): BCE + partial BCE on trusted pixels + IoU.
- Hinton, Vinyals, Dean, "Distilling the knowledge in a neural network" (2015): temperature and the T^2 factor.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SIDE_WEIGHTS: tuple[float, ...] = (1.0, 1.0 / 2, 1.0 / 4, 1.0 / 8)
"""Weights of the four side outputs (finest first), as in KD-SCFNet."""


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{name_a} and {name_b} must be torch tensors, got {type(a).__name__} "
                        f"and {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} does not match {name_b} shape {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"{name_a} must have a batch dimension and at least one more, got {tuple(a.shape)}")


def _per_image_sum(x: Tensor) -> Tensor:
    """(B, ...) -> (B,) sums over everything but the batch dimension."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def soft_dice(prob: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft dice loss, per image, mean over the batch (KD-SCFNet's ``D``).

    ``D(p, t) = 1 - (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps)``, sums over all pixels of one image.

    Args:
        prob: ``(B, 1, H, W)`` probabilities in [0, 1].
        target: same shape, a hard mask or soft labels (e.g. the teacher's probabilities) in [0, 1].
        eps: smoothing, 1 as in the paper; keeps an empty prediction against an empty target at loss 0.
    Returns:
        0-d tensor, mean over the batch of the per-image loss; in [0, 1] for inputs in [0, 1].
    """
    _check_pair("prob", prob, "target", target)
    inter = _per_image_sum(prob * target)
    total = _per_image_sum(prob) + _per_image_sum(target)
    return (1.0 - (2.0 * inter + eps) / (total + eps)).mean()


def deep_supervision(loss_fn: Callable[[Tensor, Tensor], Tensor], logits_list: Sequence[Tensor],
                     target: Tensor, weights: Sequence[float] = SIDE_WEIGHTS) -> Tensor:
    """Weighted sum of one loss over the side outputs: ``sum_i weights[i] * loss_fn(logits_list[i], target)``.

    Args:
        loss_fn: ``(logits, target) -> 0-d tensor``.
        logits_list: side-output logits, finest first (s2, s3, s4, s5), each the shape of ``target``.
        target: the map every output is compared with.
        weights: one weight per output; KD-SCFNet uses 1, 1/2, 1/4, 1/8.
    """
    if len(logits_list) != len(weights):
        raise ValueError(f"logits_list has {len(logits_list)} outputs but weights has {len(weights)} entries")
    if len(logits_list) == 0:
        raise ValueError("logits_list is empty")
    total = logits_list[0].new_zeros(())
    for w, logits in zip(weights, logits_list):
        total = total + float(w) * loss_fn(logits, target)
    return total


def kd_dice_loss(student_logits_list: Sequence[Tensor], teacher_prob: Tensor,
                 weights: Sequence[float] = SIDE_WEIGHTS) -> Tensor:
    """KD-SCFNet distillation loss on unlabeled images.

    ``L = D(s2, t) + D(s3, t)/2 + D(s4, t)/4 + D(s5, t)/8`` with ``s_i = sigmoid(student logits i)``,
    ``t = sigmoid(teacher out2)`` (pass it as ``teacher_prob``, detached) and ``D`` = :func:`soft_dice`.

    Args:
        student_logits_list: four ``(B, 1, H, W)`` logits, finest first.
        teacher_prob: ``(B, 1, H, W)`` teacher probabilities in [0, 1]; no gradient flows into it.
    """
    t = teacher_prob.detach()
    return deep_supervision(lambda logits, tgt: soft_dice(torch.sigmoid(logits), tgt),
                            student_logits_list, t, weights)


def boundary_map(x: Tensor, band: int = 1) -> Tensor:
    """Soft inner boundary of a saliency map, widened to a band (KD-SCFNet's boundary target).

    ``e = maxpool3x3(1 - x) - (1 - x)``: 1 on foreground pixels that touch background, 0 inside either region,
    fractional for soft maps. Then ``maxpool_band(e)`` (stride 1, same size) widens the edge to ``band``
    pixels; ``band = 1`` keeps it as is. Pixels outside the image do not count as background.

    Args:
        x: ``(B, 1, H, W)`` (or ``(B, H, W)``) map in [0, 1].
        band: odd kernel size >= 1 of the widening max-pool.
    Returns:
        tensor of the shape of ``x``, values in [0, 1].
    """
    if not isinstance(band, int) or band < 1 or band % 2 == 0:
        raise ValueError(f"band must be an odd int >= 1, got {band!r}")
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}")
    inv = 1.0 - x
    edge = F.max_pool2d(inv, kernel_size=3, stride=1, padding=1) - inv
    if band > 1:
        edge = F.max_pool2d(edge, kernel_size=band, stride=1, padding=band // 2)
    return edge.squeeze(1) if squeeze else edge


def boundary_dice(prob: Tensor, target: Tensor, band: int = 1, eps: float = 1.0) -> Tensor:
    """Soft dice between boundary bands: ``D(boundary_map(prob, band), boundary_map(target, band))``."""
    _check_pair("prob", prob, "target", target)
    return soft_dice(boundary_map(prob, band), boundary_map(target, band), eps=eps)


def boundary_band(epoch: int, start: int = 13, step: int = 2, every: int = 10, minimum: int = 1) -> int:
    """Width of the boundary band at ``epoch`` (0-based): ``max(minimum, start - step * (epoch // every))``.

    KD-SCFNet starts at 13 and narrows by 2 every 10 epochs down to 1, so the boundary loss first looks at a
    wide region around the edge and ends on the edge itself. ``start`` and ``minimum`` must be odd and ``step``
    even so every band is a valid (odd) max-pool kernel.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if start % 2 == 0 or minimum % 2 == 0 or minimum < 1:
        raise ValueError(f"start ({start}) and minimum ({minimum}) must be odd and >= 1")
    if step % 2 != 0 or step < 0:
        raise ValueError(f"step must be an even int >= 0, got {step}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return max(minimum, start - step * (epoch // every))


def teacher_loss(logits_list: Sequence[Tensor], mask: Tensor, band: int,
                 weights: Sequence[float] = SIDE_WEIGHTS) -> Tensor:
    """Fully supervised loss of KD-SCFNet teachers (and of the supervised-only student).

    ``L = sum_i w_i * (D(p_i, m) + D(boundary_map(p_i, band), boundary_map(m, band)))`` with
    ``p_i = sigmoid(logits_i)``, ``w = (1, 1/2, 1/4, 1/8)``, ``m`` the ground-truth mask in [0, 1] and ``band``
    from :func:`boundary_band`.
    """
    def per_output(logits: Tensor, tgt: Tensor) -> Tensor:
        p = torch.sigmoid(logits)
        return soft_dice(p, tgt) + boundary_dice(p, tgt, band)

    return deep_supervision(per_output, logits_list, mask, weights)


def bce_soft(logits: Tensor, target: Tensor, temperature: float = 1.0, target_is_logits: bool = False) -> Tensor:
    """Binary cross-entropy against soft targets, tempered as in Hinton's KD.

    ``L = T^2 * mean( -(q * log sigmoid(z/T) + (1 - q) * log(1 - sigmoid(z/T))) )`` over all pixels, where
    ``z`` are the student logits and ``q`` the target probability. If ``target_is_logits`` the target is the
    teacher's logits ``y`` and ``q = sigmoid(y / T)`` is tempered the same way; otherwise ``target`` already is
    a probability and is used unchanged (a probability cannot be re-tempered without its logit).

    Why ``T^2``: the gradient w.r.t. ``z`` is ``(sigmoid(z/T) - q) / T``; with tempered teacher logits the
    difference itself shrinks like ``(z - y) / (4T)`` for large ``T``, so the gradient falls as ``1/T^2``.
    Multiplying by ``T^2`` (Hinton et al., 2015) keeps its size roughly independent of ``T``, so changing the
    temperature does not silently change the effective learning rate. At ``T = 1`` this is plain BCE. The
    factor is applied for probability targets too, for one rule regardless of the target's form.
    """
    _check_pair("logits", logits, "target", target)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    q = torch.sigmoid(target / t) if target_is_logits else target
    q = q.detach()
    return F.binary_cross_entropy_with_logits(logits / t, q) * (t * t)


def iou_loss(prob: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft IoU loss per image, mean over the batch.

    ``L = 1 - (sum(p * t) + eps) / (sum(p + t - p * t) + eps)``; the denominator is the soft union.
    """
    _check_pair("prob", prob, "target", target)
    inter = _per_image_sum(prob * target)
    union = _per_image_sum(prob + target - prob * target)
    return (1.0 - (inter + eps) / (union + eps)).mean()


def partial_bce(logits: Tensor, target: Tensor, trust_mask: Tensor) -> Tensor:
    """BCE averaged over trusted pixels only (partial BCE of the foundation-model paper).

    ``L = sum(w * bce(z, t)) / sum(w)`` over the whole batch, ``w`` = ``trust_mask`` in [0, 1] (a 0/1 mask
    or soft weights). Pixels whose pseudo label is not trusted (``w = 0``) give no gradient. If no pixel is
    trusted the loss is 0 (not NaN), still attached to the graph so ``backward()`` works.
    """
    _check_pair("logits", logits, "target", target)
    _check_pair("logits", logits, "trust_mask", trust_mask)
    w = trust_mask.detach().to(logits.dtype)
    if bool((w < 0).any()) or bool((w > 1).any()):
        raise ValueError("trust_mask values must lie in [0, 1]")
    bce = F.binary_cross_entropy_with_logits(logits, target.detach(), reduction="none")
    total_w = w.sum()
    denom = torch.where(total_w > 0, total_w, torch.ones_like(total_w))
    return (w * bce).sum() / denom


def composite_fm_loss(logits: Tensor, target: Tensor, trust_mask: Tensor, w_bce: float = 1.0,
                      w_pbce: float = 1.0, w_iou: float = 1.0) -> Tensor:
    """Foundation-model distillation loss: ``w_bce * BCE + w_pbce * partialBCE + w_iou * IoU``.

    ``BCE`` is over all pixels against the pseudo mask, ``partialBCE`` (:func:`partial_bce`) only over the
    pixels whose pseudo label is trusted, ``IoU`` = :func:`iou_loss` of ``sigmoid(logits)`` against the mask
    (He et al., arXiv 2501.04582). All inputs ``(B, 1, H, W)``; ``target`` and ``trust_mask`` in [0, 1].
    """
    bce = F.binary_cross_entropy_with_logits(logits, target.detach())
    loss = w_bce * bce + w_pbce * partial_bce(logits, target, trust_mask)
    return loss + w_iou * iou_loss(torch.sigmoid(logits), target.detach())
