"""kd/temporal.py: closed-form values of the spatiotemporal distillation losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd.losses import kd_dice_loss
from kd.temporal import (HintAdapter, VideoKDConfig, change_consistency_loss, feature_hint_loss, frame_affinity,
                         relation_loss, soft_label_embedding, spatial_kd_loss, steadiness_loss, video_kd_loss)


def _const_clip(values: list[float], hw: int = 4) -> torch.Tensor:
    """(1, T, 1, hw, hw) clip whose frame t is constant ``values[t]``."""
    return torch.tensor(values).view(1, -1, 1, 1, 1).expand(1, len(values), 1, hw, hw).clone()


# --- change consistency -------------------------------------------------------------------------------

def test_change_consistency_closed_form():
    s = _const_clip([0.2, 0.5, 0.5])
    p = _const_clip([0.1, 0.1, 0.9])
    # student changes +0.3, 0; teacher changes 0, +0.8 -> |0.3 - 0| and |0 - 0.8|, mean 0.55
    assert change_consistency_loss(s, p).item() == pytest.approx(0.55)


def test_change_consistency_ignores_a_constant_offset_and_is_zero_for_a_copy():
    torch.manual_seed(0)
    p = torch.rand(2, 4, 1, 8, 8)
    assert change_consistency_loss(p, p).item() == 0.0
    # A student off by a constant per clip changes exactly like the teacher.
    assert change_consistency_loss((p * 0.5 + 0.2), (p * 0.5)).item() == pytest.approx(0.0, abs=1e-7)
    # A frozen student pays the teacher's mean absolute change.
    frozen = p[:, :1].expand_as(p)
    expected = (p[:, 1:] - p[:, :-1]).abs().mean().item()
    assert change_consistency_loss(frozen, p).item() == pytest.approx(expected, rel=1e-6)


def test_change_consistency_gradient_only_to_the_student():
    s = torch.full((1, 2, 1, 2, 2), 0.5, requires_grad=True)
    p = torch.rand(1, 2, 1, 2, 2, requires_grad=True)
    change_consistency_loss(s, p).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert p.grad is None


def test_change_consistency_errors():
    with pytest.raises(ValueError, match="T >= 2"):
        change_consistency_loss(torch.rand(1, 1, 1, 4, 4), torch.rand(1, 1, 1, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        change_consistency_loss(torch.rand(1, 2, 1, 4, 4), torch.rand(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        change_consistency_loss(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4))


# --- steadiness ---------------------------------------------------------------------------------------

def test_steadiness_closed_form_counts_only_pixels_the_teacher_did_not_move():
    # 2x2 frames; the teacher's left column moves by 0.5 at t = 1, its right column by 0.01 (still, < 0.05).
    p = torch.tensor([[[0.1, 0.8], [0.1, 0.8]], [[0.6, 0.81], [0.6, 0.81]]]).view(1, 2, 1, 2, 2)
    s = torch.tensor([[[0.2, 0.5], [0.2, 0.5]], [[0.9, 0.7], [0.9, 0.3]]]).view(1, 2, 1, 2, 2)
    # still pixels: the right column, student changes |0.2| and |-0.2| -> mean 0.2; the moving column is ignored
    assert steadiness_loss(s, p, below=0.05).item() == pytest.approx(0.2)
    # with a threshold above every teacher change, all four pixels count: (0.7 + 0.2 + 0.7 + 0.2) / 4
    assert steadiness_loss(s, p, below=0.6).item() == pytest.approx(0.45)
    # a student constant in time pays nothing, even where the teacher jitters below the threshold
    assert steadiness_loss(s[:, :1].expand_as(s), p).item() == 0.0
    # the change term asks the student to copy that jitter; steadiness does not
    assert change_consistency_loss(s[:, :1].expand_as(s), p).item() > 0


def test_steadiness_is_zero_when_everything_moves_and_sends_gradient_only_to_the_student():
    s = torch.rand(1, 3, 1, 4, 4, requires_grad=True)
    p = _const_clip([0.0, 0.5, 1.0])
    assert steadiness_loss(s, p).item() == 0.0
    p2 = torch.rand(1, 3, 1, 4, 4, requires_grad=True)
    steadiness_loss(s, p2, below=1.0).backward()
    assert s.grad.abs().sum() > 0 and p2.grad is None
    with pytest.raises(ValueError, match="T >= 2"):
        steadiness_loss(torch.rand(1, 1, 1, 4, 4), torch.rand(1, 1, 1, 4, 4))


# --- affinity and relation ----------------------------------------------------------------------------

def test_frame_affinity_closed_form():
    # Two 2x2 frames with 2 channels; grid 2 keeps every cell.
    a = torch.tensor([[[1.0, 0.0], [1.0, 3.0]], [[0.0, 1.0], [1.0, 4.0]]]).unsqueeze(0)   # cells: e1, e2, (1,1), (3,4)
    b = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 5.0], [0.0, 0.0]]]).unsqueeze(0)   # cells: e1, e2, 0, 0
    aff = frame_affinity(a, b, grid=2)
    assert aff.shape == (1, 4, 4)
    r2 = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                             [0.0, 1.0, 0.0, 0.0],
                             [r2, r2, 0.0, 0.0],
                             [0.6, 0.8, 0.0, 0.0]])
    torch.testing.assert_close(aff[0], expected)
    # Pooling to one cell: the cosine of the mean vectors.
    one = frame_affinity(a, b, grid=1)
    ma, mb = torch.tensor([1.25, 1.5]), torch.tensor([0.5, 1.25])
    assert one.item() == pytest.approx((ma @ mb / (ma.norm() * mb.norm())).item(), rel=1e-6)


def test_soft_label_affinity_closed_form():
    p = _const_clip([1.0, 0.0, 0.3, 0.3], hw=2)
    emb = soft_label_embedding(p)
    assert emb.shape == (1, 4, 2, 2, 2)
    aff = lambda i, j: frame_affinity(emb[:, i], emb[:, j], grid=1).item()   # noqa: E731
    assert aff(1, 0) == pytest.approx(0.0, abs=1e-7)           # fully salient vs fully background
    assert aff(3, 2) == pytest.approx(1.0)                     # equally salient
    a, b = 0.3, 1.0
    assert aff(2, 0) == pytest.approx((a * b + (1 - a) * (1 - b)) / math.sqrt((a * a + (1 - a) ** 2) * (b * b)))


def test_relation_mse_closed_form():
    # One channel: cosine of positive scalars is 1. Student: all cells positive -> affinity all 1.
    s = torch.ones(1, 2, 1, 2, 2)
    # Teacher: frame 1 has cells of both signs; frame 0 all positive -> affinity rows +1 / -1.
    t = torch.ones(1, 2, 1, 2, 2)
    t[0, 1, 0, 0, :] = -1.0                # cells 0, 1 of frame 1 negative
    # A^T[i, j] = sign(cell i of frame 1): rows 0, 1 are -1, rows 2, 3 are +1; student rows all +1.
    # (1 - (-1))^2 = 4 on half of the 16 entries -> mean 2.
    assert relation_loss(s, t, grid=2, mode="mse").item() == pytest.approx(2.0)
    assert relation_loss(t, t, grid=2, mode="mse").item() == pytest.approx(0.0)


def test_relation_kl_closed_form():
    tau = 0.5
    s = torch.ones(1, 2, 1, 1, 2)            # grid 1 would pool away the structure; use a 1x2 "grid" via grid=(1,2)
    t = s.clone()
    t[0, 0, 0, 0, 1] = -1.0                  # frame 0 cell 1 negative
    # A^T rows (frame 1 cells, both +1) against frame 0 cells (+1, -1): [1, -1]; student rows: [1, 1].
    p_t = torch.softmax(torch.tensor([1.0, -1.0]) / tau, 0)
    p_s = torch.tensor([0.5, 0.5])
    kl = (p_t * (p_t.log() - p_s.log())).sum().item()
    assert relation_loss(s, t, grid=(1, 2), mode="kl", tau=tau).item() == pytest.approx(kl * tau * tau, rel=1e-5)
    assert relation_loss(t, t, grid=(1, 2), mode="kl", tau=tau).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_accepts_teacher_features_of_another_width_and_size():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 16, 8, 8, requires_grad=True)
    t = torch.randn(2, 3, 64, 11, 11)
    loss = relation_loss(s, t, grid=4)
    loss.backward()
    assert loss.item() > 0 and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="differ in"):
        relation_loss(s, t[:, :2], grid=4)
    with pytest.raises(ValueError, match="mode"):
        relation_loss(s, t, mode="l1")


# --- spatial ------------------------------------------------------------------------------------------

def test_spatial_kd_is_the_image_loss_over_all_frames():
    torch.manual_seed(0)
    logits = [torch.randn(2, 3, 1, 8, 8) for _ in range(4)]
    p = torch.rand(2, 3, 1, 8, 8)
    expected = kd_dice_loss([l.flatten(0, 1) for l in logits], p.flatten(0, 1))
    torch.testing.assert_close(spatial_kd_loss(logits, p), expected)
    # Closed form for one frame: prob 0.5 everywhere against an all-ones target of 4 pixels:
    # D = 1 - (2*2 + 1) / (2 + 4 + 1) = 2/7 for every output; weights sum to 1.875.
    half = [torch.zeros(1, 1, 1, 2, 2) for _ in range(4)]
    assert spatial_kd_loss(half, torch.ones(1, 1, 1, 2, 2)).item() == pytest.approx(2 / 7 * 1.875)


def test_spatial_kd_takes_the_image_trainers_kd_section():
    """With a per-pixel term and sharpening, the spatial term is the image trainer's soft loss over the frames, and
    the change term follows the sharpened target the spatial term teaches."""
    from kd.step import KDLoss, sharpen_target, soft_loss
    torch.manual_seed(1)
    logits = [torch.randn(2, 3, 1, 8, 8) for _ in range(4)]
    p = torch.rand(2, 3, 1, 8, 8)
    kd = KDLoss(pixel="bce", confidence="teacher", sharpen=0.5)
    flat = [l.flatten(0, 1) for l in logits]
    torch.testing.assert_close(spatial_kd_loss(logits, p, kd), soft_loss(flat, p.flatten(0, 1), kd))
    assert spatial_kd_loss(logits, p, kd).item() > spatial_kd_loss(logits, p).item()   # the BCE is added
    _, parts = video_kd_loss(logits, p, VideoKDConfig(relation=0.0), kd=kd)
    torch.testing.assert_close(parts["spatial"], soft_loss(flat, p.flatten(0, 1), kd))
    sharp = change_consistency_loss(torch.sigmoid(logits[0]), sharpen_target(p, 0.5))
    assert parts["change"].item() == pytest.approx(sharp.item(), rel=1e-6)
    assert parts["change"].item() != pytest.approx(change_consistency_loss(torch.sigmoid(logits[0]), p).item())


def test_feature_hint_closed_form():
    adapter = HintAdapter(2, 3)
    with torch.no_grad():
        adapter.proj.weight.zero_()
        adapter.proj.weight[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 0.0])
    s = torch.ones(1, 2, 2, 2)                      # adapter output: channels 1, 2, 0 everywhere
    t = torch.zeros(1, 3, 4, 4)                      # larger teacher map: adapter output is upsampled
    # mean over 3 channels of (1, 4, 0) = 5/3
    assert feature_hint_loss(s, t, adapter).item() == pytest.approx(5 / 3)
    clip_s, clip_t = s.unsqueeze(1).expand(1, 2, 2, 2, 2), t.unsqueeze(1).expand(1, 2, 3, 4, 4)
    assert feature_hint_loss(clip_s, clip_t, adapter).item() == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="channels"):
        feature_hint_loss(s, torch.zeros(1, 5, 4, 4), adapter)


# --- combination and config ---------------------------------------------------------------------------

def test_video_kd_loss_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    logits = [torch.randn(1, 3, 1, 8, 8, requires_grad=True) for _ in range(4)]
    p = torch.rand(1, 3, 1, 8, 8)
    feat = torch.randn(1, 3, 16, 4, 4, requires_grad=True)
    cfg = VideoKDConfig(spatial=1.0, change=2.0, relation=0.5)
    total, parts = video_kd_loss(logits, p, cfg, student_feat=feat)
    assert set(parts) == {"spatial", "change", "relation"}
    expected = parts["spatial"] + 2.0 * parts["change"] + 0.5 * parts["relation"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["change"].item() == pytest.approx(
        change_consistency_loss(torch.sigmoid(logits[0]), p).item(), rel=1e-6)
    assert parts["relation"].item() == pytest.approx(
        relation_loss(feat, soft_label_embedding(p), grid=4).item(), rel=1e-6)
    total.backward()
    assert feat.grad.abs().sum() > 0
    # Single-frame clips have no temporal terms.
    _, parts1 = video_kd_loss([l[:, :1] for l in logits], p[:, :1], cfg, student_feat=feat[:, :1])
    assert set(parts1) == {"spatial"}
    # Teacher-feature relations and hints need the teacher's features.
    with pytest.raises(ValueError, match="teacher_feat"):
        video_kd_loss(logits, p, VideoKDConfig(relation_target="teacher_features"), student_feat=feat)
    with pytest.raises(ValueError, match="adapter"):
        video_kd_loss(logits, p, VideoKDConfig(hint=1.0), student_feat=feat)
    adapter = HintAdapter(16, 8)
    _, parts_h = video_kd_loss(logits, p, VideoKDConfig(hint=1.0, relation_target="teacher_features"),
                               student_feat=feat, teacher_feat=torch.randn(1, 3, 8, 4, 4), adapter=adapter)
    assert set(parts_h) == {"spatial", "change", "relation", "hint"}
    # The steadiness term joins with its weight and reads the same sharpened target as the change term.
    total_s, parts_s = video_kd_loss(logits, p, VideoKDConfig(change=0.0, relation=0.0, steady=3.0,
                                                               steady_below=0.2))
    assert set(parts_s) == {"spatial", "steady"}
    assert parts_s["steady"].item() == pytest.approx(
        steadiness_loss(torch.sigmoid(logits[0]), p, 0.2).item(), rel=1e-6)
    assert total_s.item() == pytest.approx((parts_s["spatial"] + 3.0 * parts_s["steady"]).item(), rel=1e-6)


def test_config_rejects_bad_values_by_name():
    assert not VideoKDConfig().needs_teacher_features
    assert VideoKDConfig(hint=0.1).needs_teacher_features
    for kwargs, key in [({"change": -1.0}, "change"), ({"relation_mode": "l2"}, "relation_mode"),
                        ({"relation_target": "x"}, "relation_target"), ({"relation_grid": 0}, "relation_grid"),
                        ({"relation_tau": 0.0}, "relation_tau"), ({"steady": -0.1}, "steady"),
                        ({"steady_below": 0.0}, "steady_below"), ({"steady_below": 1.5}, "steady_below")]:
        with pytest.raises(ValueError, match=key):
            VideoKDConfig(**kwargs)


def test_hint_adapter_is_a_trainable_1x1_conv():
    adapter = HintAdapter(16, 64)
    assert isinstance(adapter.proj, nn.Conv2d) and adapter.proj.kernel_size == (1, 1)
    assert adapter(torch.zeros(1, 16, 3, 3)).shape == (1, 64, 3, 3)
