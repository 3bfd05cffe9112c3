"""Trust, teacher fusion, the edge loss and the foundation-model objective: closed-form values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import composite_fm_loss
from kd.pseudo_labels import (FMLossConfig, balanced_bce, edge_target, fm_model_loss, fm_objective,
                              fuse_with_teacher, trust_mask)
from models import create_model

torch.set_num_threads(1)


def test_trust_mask_thresholds_inclusively():
    conf = torch.tensor([[0.0, 0.49, 0.5, 0.51, 1.0]])
    assert trust_mask(conf, 0.5).tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]
    assert trust_mask(conf, 0.0).sum() == 5 and trust_mask(conf, 1.0).sum() == 1
    with pytest.raises(ValueError, match="threshold"):
        trust_mask(conf, 1.5)
    with pytest.raises(ValueError, match="conf values"):
        trust_mask(conf * 2, 0.5)


def test_fusion_rule_by_hand():
    p = torch.tensor([0.9, 0.9, 0.2, 0.6])
    c = torch.tensor([1.0, 0.2, 0.0, 0.5])
    t = torch.tensor([0.1, 0.8, 0.05, 0.3])
    y, cf = fuse_with_teacher(p, c, t)
    # y = c p + (1 - c) t
    torch.testing.assert_close(y, torch.tensor([0.9, 0.2 * 0.9 + 0.8 * 0.8, 0.05, 0.5 * 0.6 + 0.5 * 0.3]))
    # agree = [no, yes, yes, no]; |2t-1| = [0.8, 0.6, 0.9, 0.4]
    torch.testing.assert_close(cf, torch.tensor([1.0, 0.6, 0.9, 0.5]))


def test_fusion_validates_inputs():
    with pytest.raises(ValueError, match="one shape"):
        fuse_with_teacher(torch.zeros(2), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="teacher_prob values"):
        fuse_with_teacher(torch.zeros(2), torch.zeros(2), torch.full((2,), 2.0))


def test_edge_target_is_the_inner_boundary():
    m = torch.zeros(1, 1, 6, 6)
    m[..., 1:5, 1:5] = 0.8  # soft foreground, binarised at 0.5
    e = edge_target(m, band=1)
    ring = torch.zeros(6, 6)
    ring[1:5, 1:5] = 1
    ring[2:4, 2:4] = 0
    assert torch.equal(e[0, 0], ring)
    assert edge_target(m, band=3).sum() > e.sum()


def test_balanced_bce_closed_form_at_zero_logits():
    t = torch.zeros(2, 1, 4, 5)
    t[0, 0, 0, :3] = 1  # pi = 3/20
    expected = (2 * 0.15 * 0.85 * math.log(2) + 0.0) / 2  # second image: no edge pixels -> 0
    torch.testing.assert_close(balanced_bce(torch.zeros_like(t), t), torch.tensor(expected))


def test_balanced_bce_general_value_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(1, 1, 3, 3, requires_grad=True)
    t = (torch.rand(1, 1, 3, 3) > 0.6).float()
    pi = t.mean()
    beta = 1 - pi
    manual = (-(beta * t * torch.log(torch.sigmoid(z)) + (1 - beta) * (1 - t) * torch.log(1 - torch.sigmoid(z)))).mean()
    got = balanced_bce(z, t)
    torch.testing.assert_close(got, manual)
    got.backward()
    torch.testing.assert_close(z.grad, ((torch.sigmoid(z) * (1 - beta) * (1 - t) - (1 - torch.sigmoid(z)) * beta * t)
                                        / 9).detach())


def test_objective_is_weighted_sum_of_composite_losses_plus_edge():
    torch.manual_seed(0)
    outs = [torch.randn(2, 1, 8, 8) for _ in range(4)]
    y = (torch.rand(2, 1, 8, 8) > 0.5).float()
    conf = torch.rand(2, 1, 8, 8)
    edge = torch.randn(2, 1, 8, 8)
    cfg = FMLossConfig(w_bce=0.5, w_pbce=2.0, w_iou=1.5, w_edge=0.3, conf_threshold=0.4, edge_band=1)
    loss, parts = fm_objective(outs, y, conf, cfg, edge)
    trust = (conf >= 0.4).float()
    sal = sum(w * composite_fm_loss(o, y, trust, 0.5, 2.0, 1.5) for w, o in zip((1, .5, .25, .125), outs))
    torch.testing.assert_close(loss, sal + 0.3 * balanced_bce(edge, edge_target(y, 1)))
    assert parts["trusted_frac"] == pytest.approx(float(trust.mean()))
    loss_no_edge, parts2 = fm_objective(outs, y, conf, cfg)
    torch.testing.assert_close(loss_no_edge, sal)
    assert "edge" not in parts2


def test_untrusted_pixels_only_lose_the_partial_term():
    """Raising the threshold above every confidence drops exactly the partial BCE (it becomes 0)."""
    torch.manual_seed(1)
    outs = [torch.randn(1, 1, 6, 6)]
    y = (torch.rand(1, 1, 6, 6) > 0.5).float()
    conf = torch.full((1, 1, 6, 6), 0.3)
    low = FMLossConfig(conf_threshold=0.2, side_weights=(1.0,))
    high = FMLossConfig(conf_threshold=0.9, side_weights=(1.0,))
    l_low, _ = fm_objective(outs, y, conf, low)
    l_high, _ = fm_objective(outs, y, conf, high)
    bce = F.binary_cross_entropy_with_logits(outs[0], y)
    torch.testing.assert_close(l_low - l_high, bce)  # all trusted: pBCE = BCE; none trusted: pBCE = 0


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="w_iou"):
        FMLossConfig(w_iou=-1)
    with pytest.raises(ValueError, match="conf_threshold"):
        FMLossConfig(conf_threshold=1.2)
    with pytest.raises(ValueError, match="edge_band"):
        FMLossConfig(edge_band=2)
    with pytest.raises(ValueError, match="side_weights"):
        fm_objective([torch.zeros(1, 1, 2, 2)], torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), FMLossConfig())


def test_model_loss_uses_the_edge_branch_when_there_is_one():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    y = torch.zeros(1, 1, 64, 64)
    y[..., 16:48, 16:48] = 1
    conf = torch.ones_like(y)
    cfg = FMLossConfig()
    de = create_model("dedecoder_m3")
    loss, parts = fm_model_loss(de, x, y, conf, cfg)
    assert "edge" in parts and parts["edge"] > 0
    loss.backward()
    assert de.edge_head.weight.grad.abs().sum() > 0
    _, parts_scf = fm_model_loss(create_model("scfnet_m3"), x, y, conf, cfg)
    assert "edge" not in parts_scf
