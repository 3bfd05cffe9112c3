"""Golden values for kd.losses: tiny hand-made maps, the expected numbers worked out by hand inline."""

from __future__ import annotations

import math

import pytest
import torch

from kd import losses as L


def t(rows, dtype=torch.float64):
    """A single-image (1, 1, H, W) tensor from nested lists."""
    return torch.tensor(rows, dtype=dtype)[None, None]


def assert_value(got, expected, atol=1e-6):
    got_f = float(got)
    assert math.isfinite(got_f), f"loss is not finite: {got_f}"
    assert abs(got_f - expected) <= atol, f"new value {got_f:.9f}, expected {expected:.9f}"


def square_mask(size=7, lo=2, hi=5):
    m = torch.zeros(1, 1, size, size, dtype=torch.float64)
    m[..., lo:hi, lo:hi] = 1.0
    return m


# ---------------------------------------------------------------- soft dice

def test_soft_dice_golden_per_image_then_batch_mean():
    # image 1: p=[1,.5,0,0] t=[1,1,0,0]: inter 1.5, sums 1.5+2 -> 1 - (3+1)/(3.5+1) = 1/9
    # image 2: all zero -> 1 - 1/1 = 0 ; batch mean = 1/18
    p = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    tg = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    assert_value(L.soft_dice(p, tg), 1 / 18)
    # p=.25 everywhere, t one pixel: inter .25, sums 1+1 -> 1 - 1.5/3 = .5
    assert_value(L.soft_dice(t([[0.25, 0.25], [0.25, 0.25]]), t([[1.0, 0.0], [0.0, 0.0]])), 0.5)
    # eps=0 on a perfect prediction is exactly 0
    assert_value(L.soft_dice(t([[1.0, 0.0]]), t([[1.0, 0.0]]), eps=0.0), 0.0)


def test_soft_dice_accepts_bhw_and_rejects_mismatched_shapes():
    p = torch.full((2, 3, 3), 0.5)
    assert_value(L.soft_dice(p, torch.ones(2, 3, 3)), 1 - (9 + 1) / (4.5 + 9 + 1))
    with pytest.raises(ValueError, match=r"prob shape \(2, 3, 3\) does not match target shape \(2, 3, 4\)"):
        L.soft_dice(p, torch.ones(2, 3, 4))


def test_soft_dice_gradcheck():
    torch.manual_seed(0)
    p = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    tg = (torch.rand(2, 1, 4, 4, dtype=torch.float64) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: L.soft_dice(x, tg), (p,))


# ---------------------------------------------------------------- deep supervision / KD

def test_deep_supervision_weights_outputs_1_half_quarter_eighth():
    target = torch.zeros(1, 1, 2, 2)
    outs = [torch.full((1, 1, 2, 2), v) for v in (1.0, 2.0, 3.0, 4.0)]
    got = L.deep_supervision(lambda lg, tg: (lg - tg).abs().mean(), outs, target)
    assert_value(got, 1 + 2 / 2 + 3 / 4 + 4 / 8)  # 3.25
    with pytest.raises(ValueError, match="3 outputs but weights has 4"):
        L.deep_supervision(lambda lg, tg: lg.mean(), outs[:3], target)


def test_kd_dice_loss_golden():
    teacher = t([[1.0, 1.0], [0.0, 0.0]])
    # logits 0 -> s=.5: inter 1, sums 2+2 -> D = 1 - 3/5 = .4 ; logit ln3 -> s=.75: inter 1.5, sums 3+2 -> 1/3
    outs = [torch.zeros_like(teacher), torch.full_like(teacher, math.log(3)),
            torch.zeros_like(teacher), torch.zeros_like(teacher)]
    assert_value(L.kd_dice_loss(outs, teacher), 0.4 + (1 / 3) / 2 + 0.4 / 4 + 0.4 / 8)  # 0.716667


def test_kd_dice_loss_trains_student_only():
    teacher = torch.rand(2, 1, 4, 4, requires_grad=True)
    outs = [torch.zeros(2, 1, 4, 4, requires_grad=True) for _ in range(4)]
    L.kd_dice_loss(outs, teacher).backward()
    assert teacher.grad is None, "gradient leaked into the teacher's probabilities"
    norms = [o.grad.abs().sum().item() for o in outs]
    # the same map at each output: gradient norms in the ratio of the weights 1 : 1/2 : 1/4 : 1/8
    assert all(n > 0 for n in norms), norms
    assert [round(n / norms[0], 6) for n in norms] == [1.0, 0.5, 0.25, 0.125], norms


# ---------------------------------------------------------------- boundaries

def test_boundary_map_ring_and_band_widening():
    m = square_mask()  # 3x3 square at rows/cols 2..4 of a 7x7 map
    ring = L.boundary_map(m, 1)
    expected = m.clone()
    expected[..., 3, 3] = 0.0  # the centre touches no background
    assert torch.equal(ring, expected), f"new ring:\n{ring[0, 0]}"
    wide = L.boundary_map(m, 3)
    assert wide.sum().item() == 25 and torch.equal(wide[..., 1:6, 1:6], torch.ones(1, 1, 5, 5, dtype=m.dtype)), \
        f"new band-3 map:\n{wide[0, 0]}"
    assert L.boundary_map(m, 5).sum().item() == 49


def test_boundary_map_soft_values_and_image_border():
    # x=[1, .25]: 1-x=[0,.75], maxpool3 (border is not background) = [.75,.75] -> [.75, 0]
    got = L.boundary_map(t([[1.0, 0.25]]), 1)
    assert torch.allclose(got, t([[0.75, 0.0]])), f"new values {got.flatten().tolist()}"
    assert L.boundary_map(torch.ones(1, 1, 5, 5), 3).abs().sum().item() == 0.0
    assert L.boundary_map(torch.full((1, 5, 5), 0.5), 1).abs().sum().item() == 0.0  # (B, H, W) works
    with pytest.raises(ValueError, match="odd int"):
        L.boundary_map(torch.ones(1, 1, 5, 5), 4)


def test_boundary_dice_golden():
    m = square_mask()
    assert_value(L.boundary_dice(m, m, 1), 0.0)
    zero = torch.zeros_like(m)
    assert_value(L.boundary_dice(zero, m, 1), 1 - 1 / (8 + 1))     # 8-pixel ring
    assert_value(L.boundary_dice(zero, m, 3), 1 - 1 / (25 + 1))    # widened to a 5x5 block


def test_boundary_dice_gradcheck():
    torch.manual_seed(1)
    p = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: L.boundary_dice(x, square_mask(6, 1, 4), 3), (p,))


def test_boundary_band_schedule():
    got = [L.boundary_band(e) for e in (0, 9, 10, 19, 20, 59, 60, 68, 1000)]
    assert got == [13, 13, 11, 11, 9, 3, 1, 1, 1], got
    assert L.boundary_band(25, start=7, step=2, every=5, minimum=3) == 3
    with pytest.raises(ValueError):
        L.boundary_band(0, start=12)
    with pytest.raises(ValueError):
        L.boundary_band(-1)


def test_teacher_loss_golden():
    m = square_mask()
    outs = [torch.zeros_like(m) for _ in range(4)]  # p = .5 everywhere
    # dice: inter 4.5, sums 24.5+9 -> 1 - 10/34.5 ; boundary of a constant map is 0, of the mask an 8-px ring
    # -> 1 - 1/9 ; weights sum 1.875
    assert_value(L.teacher_loss(outs, m, band=1), (1 - 10 / 34.5 + 8 / 9) * 1.875)  # 2.998188


# ---------------------------------------------------------------- BCE / IoU / partial BCE

def test_bce_soft_golden_and_temperature():
    z = torch.zeros(1, 1, 2, 2)
    assert_value(L.bce_soft(z, torch.full_like(z, 0.25)), math.log(2))
    assert_value(L.bce_soft(z, torch.full_like(z, 0.25), temperature=2.0), 4 * math.log(2))  # T^2 factor
    y = torch.full_like(z, math.log(3))
    assert_value(L.bce_soft(y, y, target_is_logits=True), 0.562335145)        # entropy of .75
    assert_value(L.bce_soft(y, y, temperature=2.0, target_is_logits=True), 2.627225591)  # 4*H(sig(ln3/2))
    with pytest.raises(ValueError, match="temperature"):
        L.bce_soft(z, z, temperature=0.0)


def test_bce_soft_t2_keeps_gradient_scale_with_tempered_teacher():
    y = torch.zeros(1, 1, 1, 1)

    def grad(temp):
        z = torch.ones(1, 1, 1, 1, requires_grad=True)
        L.bce_soft(z, y, temperature=temp, target_is_logits=True).backward()
        return z.grad.item()

    # T * (sigmoid(1/T) - 1/2): .231059 at T=1, .249792 at T=10, -> 1/4
    assert abs(grad(1.0) - 0.231059) < 1e-5 and abs(grad(10.0) - 0.249792) < 1e-5, (grad(1.0), grad(10.0))


def test_iou_loss_golden():
    # p=[1,.5,0,0] t=[1,1,0,0]: inter 1.5, union 1+1+0+0 = 2 -> 1 - 2.5/3 = 1/6
    assert_value(L.iou_loss(t([[1.0, 0.5], [0.0, 0.0]]), t([[1.0, 1.0], [0.0, 0.0]])), 1 / 6)
    assert_value(L.iou_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)), 0.0)
    torch.manual_seed(2)
    p = torch.rand(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: L.iou_loss(x, (p.detach() > 0.5).double()), (p,))


def test_partial_bce_golden():
    logits = t([[0.0, 0.0, math.log(3), math.log(3)]])
    target = t([[1.0, 0.0, 1.0, 0.0]])
    # per-pixel BCE: ln2, ln2, -ln.75, -ln.25 ; trusted pixels 0 and 2
    assert_value(L.partial_bce(logits, target, t([[1.0, 0.0, 1.0, 0.0]])), 0.490414627)
    # soft weights 1, 0, .5, 0 -> (ln2 + .5 * -ln.75) / 1.5
    assert_value(L.partial_bce(logits, target, t([[1.0, 0.0, 0.5, 0.0]])), 0.557992145)


def test_partial_bce_only_trusted_pixels_get_gradient_and_empty_trust_is_zero():
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)
    target = torch.ones(1, 1, 2, 2)
    trust = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    L.partial_bce(logits, target, trust).backward()
    assert torch.equal(logits.grad != 0, trust.bool()), f"new grad {logits.grad.flatten().tolist()}"

    logits.grad = None
    loss = L.partial_bce(logits, target, torch.zeros_like(target))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    with pytest.raises(ValueError, match=r"trust_mask values must lie in \[0, 1\]"):
        L.partial_bce(logits, target, torch.full_like(target, 2.0))
    with pytest.raises(ValueError, match="trust_mask shape"):
        L.partial_bce(logits, target, torch.ones(1, 1, 2, 3))


def test_composite_fm_loss_golden():
    logits = torch.zeros(1, 1, 2, 2)
    target = t([[1.0, 1.0], [0.0, 0.0]], torch.float32)
    trust = t([[1.0, 1.0], [1.0, 0.0]], torch.float32)
    # BCE ln2, partial BCE ln2, IoU at p=.5: inter 1, union 3 -> 1 - 2/4 = .5
    assert_value(L.composite_fm_loss(logits, target, trust), 2 * math.log(2) + 0.5)
    assert_value(L.composite_fm_loss(logits, target, trust, w_bce=0.5, w_pbce=2.0, w_iou=3.0),
                 2.5 * math.log(2) + 1.5)


def test_losses_decrease_under_gradient_descent():
    """A student fitting a fixed teacher map with each loss really gets closer to it."""
    torch.manual_seed(3)
    target = (torch.rand(2, 1, 8, 8) > 0.6).float()
    for name, fn in [
        ("kd_dice", lambda z: L.kd_dice_loss([z, z, z, z], target)),
        ("teacher", lambda z: L.teacher_loss([z, z, z, z], target, band=3)),
        ("composite", lambda z: L.composite_fm_loss(z, target, torch.ones_like(target))),
    ]:
        z = torch.zeros(2, 1, 8, 8, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.3)
        first = fn(z).item()
        for _ in range(40):
            opt.zero_grad()
            fn(z).backward()
            opt.step()
        last = fn(z).item()
        assert last < 0.5 * first, f"{name}: loss went {first:.4f} -> {last:.4f}"
