"""Training on foundation-model pseudo labels: trust, teacher fusion, the edge loss and the full objective.

The foundation labeller (``cluster/foundation.py``) writes, per image, a soft pseudo mask ``p`` (SAM's
probability) and a per-pixel confidence ``c`` in [0, 1]. This module turns them into training targets and
losses (He et al., "Boosting SOD with knowledge distilled from large foundation models", arXiv 2501.04582):

- **trust** (:func:`trust_mask`): ``w = 1[c >= tau]``, the "labelled" region of the partial BCE; pixels below
  the threshold ``tau`` give no partial-BCE gradient;
- **fusion** with a SOD teacher (:func:`fuse_with_teacher`, beyond the paper, off by default): where the
  foundation mask is unsure, a SOD teacher's soft label ``t`` fills in, and where both agree the pixel
  becomes trusted (rule in the function's docstring);
- **edge loss** (:func:`balanced_bce`) for the DEDecoder's edge branch, against the boundary of the pseudo
  mask (:func:`edge_target`);
- **objective** (:func:`fm_objective`): ``sum_i w_i (a BCE + b pBCE + c IoU)(s_i)`` over the side outputs plus
  ``e * balancedBCE(edge)``, all weights in :class:`FMLossConfig`.

The BCE, partial BCE and IoU themselves are :mod:`kd.losses`' (``composite_fm_loss``), not re-implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses import SIDE_WEIGHTS, boundary_map, composite_fm_loss, deep_supervision

__all__ = ["FMLossConfig", "trust_mask", "fuse_with_teacher", "edge_target", "balanced_bce", "fm_objective",
           "fm_model_loss"]


@dataclass(frozen=True)
class FMLossConfig:
    """Weights and thresholds of the foundation-model objective (the ``loss`` block of a training config).

    Attributes:
        w_bce, w_pbce, w_iou: weights of BCE (all pixels), partial BCE (trusted pixels) and IoU.
        w_edge: weight of the balanced edge BCE (used when the model has an edge branch).
        conf_threshold: ``tau``: pixels with confidence ``c >= tau`` are trusted.
        edge_band: width (odd) of the boundary band the edge branch is trained to find.
        side_weights: deep-supervision weights of the side outputs, finest first.
    """

    w_bce: float = 1.0
    w_pbce: float = 1.0
    w_iou: float = 1.0
    w_edge: float = 1.0
    conf_threshold: float = 0.5
    edge_band: int = 3
    side_weights: tuple[float, ...] = SIDE_WEIGHTS

    def __post_init__(self) -> None:
        for name in ("w_bce", "w_pbce", "w_iou", "w_edge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.conf_threshold <= 1.0:
            raise ValueError(f"conf_threshold: must lie in [0, 1], got {self.conf_threshold}")
        if self.edge_band < 1 or self.edge_band % 2 == 0:
            raise ValueError(f"edge_band: must be an odd int >= 1, got {self.edge_band}")
        if not self.side_weights:
            raise ValueError("side_weights: must not be empty")


def trust_mask(conf: Tensor, threshold: float) -> Tensor:
    """``w = 1[c >= threshold]`` as a float tensor of ``conf``'s shape (the partial-BCE region)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if bool((conf < 0).any()) or bool((conf > 1).any()):
        raise ValueError("conf values must lie in [0, 1]")
    return (conf >= threshold).to(conf.dtype if conf.is_floating_point() else torch.float32)


def fuse_with_teacher(fm_prob: Tensor, fm_conf: Tensor, teacher_prob: Tensor) -> tuple[Tensor, Tensor]:
    """Fuse a foundation pseudo mask with a SOD teacher's soft label, per pixel.

    With ``p`` the foundation probability, ``c`` its confidence and ``t`` the SOD teacher's probability::

        y   = c * p + (1 - c) * t                                  # fused label
        c_f = max(c, 1[(p > 0.5) == (t > 0.5)] * |2t - 1|)         # fused confidence

    Where the foundation model is confident its label wins; where it is not, the teacher's soft label takes
    over in proportion. A pixel becomes trusted (``c_f`` high) also when the teacher is confident *and* agrees
    with the foundation mask's decision; disagreement never raises trust, so a pixel on which the two
    disagree and the foundation is unsure stays out of the partial BCE.

    Args:
        fm_prob, fm_conf, teacher_prob: tensors of one shape, values in [0, 1].
    Returns:
        ``(y, c_f)``, both of that shape, in [0, 1].
    """
    if not (fm_prob.shape == fm_conf.shape == teacher_prob.shape):
        raise ValueError(f"fm_prob {tuple(fm_prob.shape)}, fm_conf {tuple(fm_conf.shape)} and teacher_prob "
                         f"{tuple(teacher_prob.shape)} must have one shape")
    for name, x in (("fm_prob", fm_prob), ("fm_conf", fm_conf), ("teacher_prob", teacher_prob)):
        if bool((x < 0).any()) or bool((x > 1).any()):
            raise ValueError(f"{name} values must lie in [0, 1]")
    y = fm_conf * fm_prob + (1.0 - fm_conf) * teacher_prob
    agree = ((fm_prob > 0.5) == (teacher_prob > 0.5)).to(fm_conf.dtype)
    return y, torch.maximum(fm_conf, agree * (2.0 * teacher_prob - 1.0).abs())


def edge_target(mask: Tensor, band: int = 3) -> Tensor:
    """Edge map the edge branch learns: the boundary band of the binarised pseudo mask.

    ``e = boundary_map(1[mask > 0.5], band)`` (:func:`kd.losses.boundary_map`): 1 on foreground pixels that
    touch background, widened to ``band`` pixels; 0 elsewhere. Shape of ``mask`` ((B, 1, H, W)).
    """
    return boundary_map((mask > 0.5).to(mask.dtype if mask.is_floating_point() else torch.float32), band)


def balanced_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Class-balanced BCE for thin structures (as in HED, Xie & Tu 2015), per image, mean over the batch.

    With ``pi = mean(t)`` the edge fraction of one image and ``beta = 1 - pi``::

        L = mean_x( -beta * t * log sigmoid(z) - (1 - beta) * (1 - t) * log(1 - sigmoid(z)) )

    Edge pixels are rare, so each class is weighted by the other's frequency; at ``z = 0`` a binary target
    gives ``L = 2 * pi * (1 - pi) * log 2``. An image with no edge pixels has ``beta = 1`` and contributes 0.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match target shape {tuple(target.shape)}")
    t = target.detach().to(logits.dtype)
    beta = 1.0 - t.reshape(t.shape[0], -1).mean(dim=1)
    beta = beta.view(-1, *([1] * (t.dim() - 1)))
    pos = -t * F.logsigmoid(logits)
    neg = -(1.0 - t) * F.logsigmoid(-logits)
    per_pixel = beta * pos + (1.0 - beta) * neg
    return per_pixel.reshape(per_pixel.shape[0], -1).mean(dim=1).mean()


def fm_objective(logits_list: Sequence[Tensor], target: Tensor, conf: Tensor, cfg: FMLossConfig,
                 edge_logits: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The student's loss on pseudo labels.

    ``L = sum_i w_i * (a * BCE(s_i, y) + b * pBCE(s_i, y; 1[c >= tau]) + c_iou * IoU(sigmoid(s_i), y))
    + e * balancedBCE(edge_logits, edge_target(y))`` with ``w_i`` = ``cfg.side_weights``; the edge term only
    when ``edge_logits`` is given.

    Args:
        logits_list: side-output logits, finest first, each ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` pseudo mask ``y`` in [0, 1].
        conf: ``(B, 1, H, W)`` confidence in [0, 1].
        edge_logits: ``(B, 1, H, W)`` or None.
    Returns:
        the 0-d loss and its parts as floats (``sal``, ``edge``, ``trusted_frac``) for logging.
    """
    if len(logits_list) != len(cfg.side_weights):
        raise ValueError(f"{len(logits_list)} side outputs but loss.side_weights has {len(cfg.side_weights)}")
    trust = trust_mask(conf, cfg.conf_threshold)
    sal = deep_supervision(
        lambda logits, y: composite_fm_loss(logits, y, trust, cfg.w_bce, cfg.w_pbce, cfg.w_iou),
        logits_list, target, cfg.side_weights)
    parts = {"sal": float(sal.detach()), "trusted_frac": float(trust.mean())}
    if edge_logits is None or cfg.w_edge == 0:
        return sal, parts
    edge = balanced_bce(edge_logits, edge_target(target, cfg.edge_band))
    parts["edge"] = float(edge.detach())
    return sal + cfg.w_edge * edge, parts


def fm_model_loss(model: nn.Module, images: Tensor, target: Tensor, conf: Tensor,
                  cfg: FMLossConfig) -> tuple[Tensor, dict[str, float]]:
    """Run ``model`` on normalised ``images`` and return :func:`fm_objective`.

    A model with an edge branch (``has_edge_branch``, e.g. ``dedecoder_m3``) is called as
    ``model(images, with_edge=True)`` and also gets the edge loss; any other model gets the rest. Calling
    through ``model(...)`` (not a method of the inner module) keeps a DDP wrapper's gradient hooks in play.
    """
    inner = getattr(model, "module", model)
    if getattr(inner, "has_edge_branch", False):
        outs, edge = model(images, with_edge=True)
    else:
        outs, edge = model(images), None
    return fm_objective(outs, target, conf, cfg, edge)

