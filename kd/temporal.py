"""Spatiotemporal distillation losses for the video student: plain functions on clip tensors.

After "Fast video salient object detection via spatiotemporal knowledge distillation" (Tang, Li, Zou, arXiv
2010.10027), whose abstract names spatial distillation from an image teacher and temporal distillation from
adjacent frames but gives no formulas. Every formula and default below is therefore ours; each docstring says so.

Shapes: a clip of maps is ``(B, T, 1, H, W)`` (probabilities in [0, 1] or logits, as named); a clip of features is
``(B, T, C, h, w)``. Every loss returns a 0-d tensor. Teacher inputs are detached: no gradient flows into them.

Spatial KD
    :func:`spatial_kd_loss` -- the image distillation loss per frame (:func:`kd.step.soft_loss`: KD-SCFNet's soft
    dice, with a calibrated per-pixel term beside it when ``kd.pixel`` asks) over all B*T frames;
    :func:`feature_hint_loss` -- a FitNets-style hint, ``mean((A(f_s) - f_t)^2)`` with ``A`` a 1x1 conv
    adapter (:class:`HintAdapter`).
Temporal KD
    :func:`change_consistency_loss` -- the student's change between adjacent frames follows the teacher's;
    :func:`relation_loss` -- the student's cross-frame affinity matrix follows the teacher's (from teacher
    features, or from the teacher's soft labels via :func:`soft_label_embedding`);
    :func:`steadiness_loss` -- where the teacher's map did not move, the student's should not either (off by
    default: for students already steadier than their teacher).
:func:`video_kd_loss` combines them with the weights of :class:`VideoKDConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses import SIDE_WEIGHTS
from kd.step import KDLoss, sharpen_target, soft_loss

__all__ = ["VideoKDConfig", "HintAdapter", "spatial_kd_loss", "feature_hint_loss", "change_consistency_loss",
           "steadiness_loss", "frame_affinity", "relation_loss", "soft_label_embedding", "video_kd_loss"]

RELATION_MODES = ("mse", "kl")
RELATION_TARGETS = ("soft_label", "teacher_features")


@dataclass(frozen=True)
class VideoKDConfig:
    """Weights and choices of the video distillation loss (all ours; the paper states none).

    Attributes:
        spatial: weight of :func:`spatial_kd_loss` (1, the image recipe).
        change: weight of :func:`change_consistency_loss` (1: the L1 change term is ~0.01-0.05 on real clips,
            an order below the dice term, so 1 lets it matter without dominating).
        relation: weight of :func:`relation_loss` (1).
        hint: weight of :func:`feature_hint_loss`; 0 (off) by default because it needs the teacher running
            online to get its features, while the default pipeline reads offline soft labels.
        relation_target: ``"soft_label"`` (affinity of the teacher's soft labels, works offline) or
            ``"teacher_features"`` (affinity of the teacher's stride-32 features; needs the teacher online).
        relation_mode: ``"mse"`` on cosine affinities, or ``"kl"`` between row-softmaxed affinities.
        relation_grid: the features are average-pooled to ``grid x grid`` cells before the affinity (4: 16
            cells, coarse enough to be stable at the 7x7-11x11 stride-32 maps of 224-352 inputs).
        relation_tau: temperature of the row softmax in ``"kl"`` mode.
        steady: weight of :func:`steadiness_loss` (0: off). The change term can only make the student as steady
            as its teacher; a student that is already steadier than the teacher on the training clips (the x1.0
            image student on DAVIS: flicker .0093 against the teacher's .0119) learns nothing from it. This term
            asks for less change than the teacher shows, where the teacher says nothing moved.
        steady_below: the teacher's frame-to-frame change (of its sharpened map) under which a pixel counts as
            not moving for :func:`steadiness_loss` (0.05).
    """

    spatial: float = 1.0
    change: float = 1.0
    relation: float = 1.0
    hint: float = 0.0
    relation_target: str = "soft_label"
    relation_mode: str = "mse"
    relation_grid: int = 4
    relation_tau: float = 0.1
    steady: float = 0.0
    steady_below: float = 0.05

    def __post_init__(self) -> None:
        for name in ("spatial", "change", "relation", "hint", "steady"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if self.relation_target not in RELATION_TARGETS:
            raise ValueError(f"relation_target: must be one of {RELATION_TARGETS}, got {self.relation_target!r}")
        if self.relation_mode not in RELATION_MODES:
            raise ValueError(f"relation_mode: must be one of {RELATION_MODES}, got {self.relation_mode!r}")
        if not (isinstance(self.relation_grid, int) and self.relation_grid >= 1):
            raise ValueError(f"relation_grid: must be an int >= 1, got {self.relation_grid!r}")
        if not self.relation_tau > 0:
            raise ValueError(f"relation_tau: must be > 0, got {self.relation_tau!r}")
        if not (isinstance(self.steady_below, (int, float)) and 0 < self.steady_below <= 1):
            raise ValueError(f"steady_below: must be in (0, 1], got {self.steady_below!r}")

    @property
    def needs_teacher_features(self) -> bool:
        return self.hint > 0 or (self.relation > 0 and self.relation_target == "teacher_features")


def _check_clip(name: str, x: Tensor, channels: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if x.ndim != 5:
        raise ValueError(f"{name} must be a clip (B, T, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[2] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")


def _check_same(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} does not match {name_b} shape {tuple(b.shape)}")


# --- spatial ------------------------------------------------------------------------------------------

def spatial_kd_loss(student_logits_list: Sequence[Tensor], teacher_prob: Tensor, kd: KDLoss = KDLoss(),
                    weights: Sequence[float] = SIDE_WEIGHTS) -> Tensor:
    """The image distillation loss applied to every frame of a clip: :func:`kd.step.soft_loss` over the ``B*T``
    frames.

    ``L = mean_{b,t} sum_i w_i [S(p_i[b,t], t[b,t]) + lambda P(s_i[b,t], t[b,t])]`` with ``w = (1, 1/2, 1/4, 1/8)``,
    ``t`` the teacher's probabilities (its soft labels, sharpened if ``kd.sharpen < 1``) and ``S`` / ``P`` the
    structural and per-pixel terms of ``kd`` (:class:`kd.step.KDLoss`; its docstring gives why a per-pixel term
    is needed beside the dice). ``KDLoss()`` is KD-SCFNet's soft dice alone.

    Args:
        student_logits_list: four ``(B, T, 1, H, W)`` logits, finest first.
        teacher_prob: ``(B, T, 1, H, W)`` in [0, 1].
        kd: the per-frame loss (the image trainer's ``kd`` section).
    """
    _check_clip("teacher_prob", teacher_prob, 1)
    for i, s in enumerate(student_logits_list):
        _check_same(f"student_logits_list[{i}]", s, "teacher_prob", teacher_prob)
    return soft_loss([s.flatten(0, 1) for s in student_logits_list], teacher_prob.flatten(0, 1), kd, weights)


class HintAdapter(nn.Module):
    """A 1x1 conv mapping student features (C_s channels) to the teacher layer's width (C_t), FitNets-style.

    Initialised with Kaiming-uniform weights and zero bias (PyTorch's default for the conv weight); it is trained
    with the student and discarded afterwards.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def feature_hint_loss(student_feat: Tensor, teacher_feat: Tensor, adapter: nn.Module) -> Tensor:
    """Feature hint (FitNets, Romero et al. 2015): ``L = mean((up(A(f_s)) - f_t)^2)``.

    ``A`` is the 1x1 ``adapter`` (C_s -> C_t); ``up`` resizes bilinearly to the teacher feature's size when the
    two strides differ. The mean runs over every element. Works on single frames ``(N, C, h, w)`` and on clips
    ``(B, T, C, h, w)`` (frames are flattened). Our choice: the teacher feature is used as is (no normalisation),
    so the loss scale follows the teacher layer's; the default weight is 0 (off).
    """
    if student_feat.ndim == 5 and teacher_feat.ndim == 5:
        if student_feat.shape[:2] != teacher_feat.shape[:2]:
            raise ValueError(f"student_feat {tuple(student_feat.shape)} and teacher_feat {tuple(teacher_feat.shape)} "
                             "differ in (B, T)")
        student_feat, teacher_feat = student_feat.flatten(0, 1), teacher_feat.flatten(0, 1)
    if student_feat.ndim != 4 or teacher_feat.ndim != 4 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"student_feat {tuple(student_feat.shape)} and teacher_feat {tuple(teacher_feat.shape)} "
                         "must both be (N, C, h, w) or (B, T, C, h, w) with the same N / (B, T)")
    mapped = adapter(student_feat)
    if mapped.shape[1] != teacher_feat.shape[1]:
        raise ValueError(f"adapter maps to {mapped.shape[1]} channels but the teacher feature has "
                         f"{teacher_feat.shape[1]}")
    if mapped.shape[-2:] != teacher_feat.shape[-2:]:
        mapped = F.interpolate(mapped, size=teacher_feat.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(mapped, teacher_feat.detach())


# --- temporal -----------------------------------------------------------------------------------------

def change_consistency_loss(student_prob: Tensor, teacher_prob: Tensor) -> Tensor:
    """The student's frame-to-frame change follows the teacher's (ours).

    ``L = mean_{b, t>=1, pixels} | (s_t - s_{t-1}) - (p_t - p_{t-1}) |`` with ``s`` the student's probabilities
    (``sigmoid`` of its finest output) and ``p`` the teacher's. L1 rather than L2 so that a few pixels of a
    genuinely moving boundary do not dominate the flicker of the rest. A student that copies the teacher exactly
    has loss 0; one whose maps are constant in time pays the mean absolute change of the teacher.

    Args:
        student_prob, teacher_prob: ``(B, T, 1, H, W)`` in [0, 1], ``T >= 2``.
    """
    _check_clip("student_prob", student_prob)
    _check_same("student_prob", student_prob, "teacher_prob", teacher_prob)
    if student_prob.shape[1] < 2:
        raise ValueError(f"change_consistency_loss needs clips of T >= 2 frames, got {tuple(student_prob.shape)}")
    p = teacher_prob.detach()
    return ((student_prob[:, 1:] - student_prob[:, :-1]) - (p[:, 1:] - p[:, :-1])).abs().mean()


def steadiness_loss(student_prob: Tensor, teacher_prob: Tensor, below: float = 0.05) -> Tensor:
    """Where the teacher did not move, the student should not either (ours).

    ``m_t = [|p_t - p_{t-1}| < below]`` marks the pixels whose teacher probability barely changed between adjacent
    frames; ``L = sum(m_t |s_t - s_{t-1}|) / max(sum(m_t), 1)`` over ``b, t >= 1`` and the pixels. Its optimum is a
    student constant in time on those pixels, below the teacher's own jitter there (which the change term would
    copy); moving pixels (``m = 0``) are left to the spatial and change terms. A clip in which every pixel moves
    has loss 0.

    Args:
        student_prob, teacher_prob: ``(B, T, 1, H, W)`` in [0, 1], ``T >= 2``.
        below: the change threshold, in (0, 1].
    """
    _check_clip("student_prob", student_prob)
    _check_same("student_prob", student_prob, "teacher_prob", teacher_prob)
    if student_prob.shape[1] < 2:
        raise ValueError(f"steadiness_loss needs clips of T >= 2 frames, got {tuple(student_prob.shape)}")
    p = teacher_prob.detach()
    still = ((p[:, 1:] - p[:, :-1]).abs() < below).to(student_prob.dtype)
    return ((student_prob[:, 1:] - student_prob[:, :-1]).abs() * still).sum() / still.sum().clamp(min=1.0)


def frame_affinity(a: Tensor, b: Tensor, grid: int | tuple[int, int]) -> Tensor:
    """Cosine affinity between the cells of two frames' features.

    Both ``(N, C, h, w)`` features are average-pooled to ``grid x grid`` cells (``adaptive_avg_pool2d``; a pair
    ``(gh, gw)`` gives ``gh x gw`` cells), each cell's C-vector is L2-normalised, and
    ``A[n, i, j] = cos(a_n[cell i], b_n[cell j])`` with cells in row-major order, shape ``(N, G, G)`` for
    ``G = grid^2`` cells, values in [-1, 1]. A zero vector has cosine 0 with everything (eps 1e-8).
    """
    if a.ndim != 4 or b.ndim != 4 or a.shape[:2] != b.shape[:2]:
        raise ValueError(f"frame_affinity: expected two (N, C, h, w) features with equal N, C, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    pa = F.normalize(F.adaptive_avg_pool2d(a, grid).flatten(2), dim=1, eps=1e-8)   # (N, C, G^2)
    pb = F.normalize(F.adaptive_avg_pool2d(b, grid).flatten(2), dim=1, eps=1e-8)
    return torch.bmm(pa.transpose(1, 2), pb)


def soft_label_embedding(prob: Tensor) -> Tensor:
    """Two-channel features ``[p, 1 - p]`` of a soft-label clip ``(B, T, 1, H, W)`` -> ``(B, T, 2, H, W)``.

    Used as the teacher's "features" for :func:`relation_loss` when only its soft labels are at hand (ours). After
    pooling, a cell with mean probability ``a`` is the vector ``[a, 1 - a]``, and the cosine of two cells ``a, b``
    is ``(ab + (1-a)(1-b)) / sqrt((a^2 + (1-a)^2)(b^2 + (1-b)^2))``: 1 when both cells are equally salient, 0
    between a fully salient and a fully background cell. The affinity matrix thus says which cells of frame t
    belong with which cells of frame t-1 as the teacher sees it.
    """
    _check_clip("prob", prob, 1)
    return torch.cat([prob, 1.0 - prob], dim=2)


def relation_loss(student_feat: Tensor, teacher_feat: Tensor, grid: int | tuple[int, int] = 4, mode: str = "mse",
                  tau: float = 0.1) -> Tensor:
    """The student's inter-frame relations follow the teacher's (ours).

    For every adjacent pair ``(t, t-1)``, ``A^s_t = frame_affinity(f^s_t, f^s_{t-1})`` and likewise ``A^T_t`` from
    the teacher's features (any width: both matrices are ``grid^2 x grid^2``). Then

    - ``mode="mse"``: ``L = mean_{b, t>=1, i, j} (A^s_t[i,j] - A^T_t[i,j])^2``;
    - ``mode="kl"``: rows become distributions ``P = softmax_j(A / tau)`` and
      ``L = tau^2 * mean_{b, t>=1, i} KL(P^T_t[i] || P^s_t[i])`` (the ``tau^2`` keeps the gradient size roughly
      independent of the temperature, as in Hinton et al. 2015).

    Args:
        student_feat: ``(B, T, C_s, h, w)`` student features (the video student's ``f5t``).
        teacher_feat: ``(B, T, C_t, h', w')`` teacher features, or :func:`soft_label_embedding` of its soft labels.
        grid: cells per side after pooling.
    """
    _check_clip("student_feat", student_feat)
    _check_clip("teacher_feat", teacher_feat)
    if student_feat.shape[:2] != teacher_feat.shape[:2]:
        raise ValueError(f"student_feat {tuple(student_feat.shape)} and teacher_feat {tuple(teacher_feat.shape)} "
                         "differ in (B, T)")
    if student_feat.shape[1] < 2:
        raise ValueError(f"relation_loss needs clips of T >= 2 frames, got {tuple(student_feat.shape)}")
    if mode not in RELATION_MODES:
        raise ValueError(f"relation_loss: mode must be one of {RELATION_MODES}, got {mode!r}")
    teacher_feat = teacher_feat.detach()

    def affinities(f: Tensor) -> Tensor:
        cur, prev = f[:, 1:].flatten(0, 1), f[:, :-1].flatten(0, 1)
        return frame_affinity(cur, prev, grid)                                     # (B*(T-1), G^2, G^2)

    a_s, a_t = affinities(student_feat), affinities(teacher_feat)
    if mode == "mse":
        return F.mse_loss(a_s, a_t)
    log_p_s = F.log_softmax(a_s / tau, dim=-1)
    p_t = F.softmax(a_t / tau, dim=-1)
    kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_p_s)).sum(-1)
    return kl.mean() * tau * tau


# --- the combination ----------------------------------------------------------------------------------

def video_kd_loss(student_logits_list: Sequence[Tensor], teacher_prob: Tensor, cfg: VideoKDConfig,
                  student_feat: Tensor | None = None, teacher_feat: Tensor | None = None,
                  adapter: nn.Module | None = None, kd: KDLoss = KDLoss()) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = w_sp * spatial + w_ch * change + w_rel * relation + w_hint * hint + w_st * steady`` for a batch of clips.

    Terms with weight 0 are not computed. ``kd`` is the per-frame spatial loss (:func:`spatial_kd_loss`). The
    change term compares ``sigmoid`` of the finest student output with ``teacher_prob`` sharpened as ``kd`` says
    (the map the spatial term teaches, so the two agree on what a frame's target is), and so does the steadiness
    term (:func:`steadiness_loss`, weight ``cfg.steady``); the relation term uses
    ``student_feat`` against ``teacher_feat`` or ``soft_label_embedding(teacher_prob)`` (per
    ``cfg.relation_target``); the hint needs ``student_feat``, ``teacher_feat`` and ``adapter``. Clips of a single
    frame (T = 1) have no temporal terms.

    Returns:
        ``(total, parts)`` with ``parts`` the unweighted, detached terms keyed ``spatial``, ``change``,
        ``relation``, ``hint``, ``steady`` (only those computed).
    """
    parts: dict[str, Tensor] = {}
    total = teacher_prob.new_zeros(())
    temporal = teacher_prob.ndim == 5 and teacher_prob.shape[1] >= 2

    def add(name: str, weight: float, value: Tensor) -> None:
        nonlocal total
        parts[name] = value.detach()
        total = total + float(weight) * value

    if cfg.spatial > 0:
        add("spatial", cfg.spatial, spatial_kd_loss(student_logits_list, teacher_prob, kd))
    if (cfg.change > 0 or cfg.steady > 0) and temporal:
        s_prob, t_prob = torch.sigmoid(student_logits_list[0]), sharpen_target(teacher_prob, float(kd.sharpen))
        if cfg.change > 0:
            add("change", cfg.change, change_consistency_loss(s_prob, t_prob))
        if cfg.steady > 0:
            add("steady", cfg.steady, steadiness_loss(s_prob, t_prob, float(cfg.steady_below)))
    if cfg.relation > 0 and temporal:
        if student_feat is None:
            raise ValueError("video_kd_loss: the relation term needs student_feat (forward(..., return_features=True))")
        if cfg.relation_target == "teacher_features":
            if teacher_feat is None:
                raise ValueError("video_kd_loss: relation_target='teacher_features' needs teacher_feat")
            target = teacher_feat
        else:
            target = soft_label_embedding(teacher_prob)
        add("relation", cfg.relation, relation_loss(student_feat, target, cfg.relation_grid, cfg.relation_mode,
                                                    cfg.relation_tau))
    if cfg.hint > 0:
        if student_feat is None or teacher_feat is None or adapter is None:
            raise ValueError("video_kd_loss: the hint term needs student_feat, teacher_feat and an adapter")
        add("hint", cfg.hint, feature_hint_loss(student_feat, teacher_feat, adapter))
    return total, parts
