"""DEDecoder student and its DySample upsampler: closed-form checks of the sampling, the encoder reuse,
the edge branch and the model contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import count_params, create_model
from models.dedecoder import DEDecoder, DEDecoderConfig, DySample

torch.set_num_threads(1)


def test_fresh_dysample_is_exactly_bilinear_upsampling():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 7)
    for dynamic in (True, False):
        up = DySample(16, scale=2, groups=4, dynamic_scope=dynamic)
        ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(up(x), ref, atol=1e-5, rtol=0)
    up3 = DySample(8, scale=3, groups=2)
    torch.testing.assert_close(up3(x[:, :8]), F.interpolate(x[:, :8], scale_factor=3, mode="bilinear",
                                                              align_corners=False), atol=1e-5, rtol=0)


def test_dysample_offset_of_one_pixel_samples_the_neighbour():
    """A constant offset of +1 input pixel in x (fixed scope: o = 0.25 * bias = 1) samples the bilinear
    upsampling of the image shifted one pixel to the left; the outermost columns differ only by clamping."""
    x = torch.arange(4 * 6, dtype=torch.float32).view(1, 1, 4, 6).repeat(1, 4, 1, 1)
    up = DySample(4, scale=2, groups=1, dynamic_scope=False)
    with torch.no_grad():
        up.offset.bias.zero_()
        # raw channels are (group, xy, s*s sub-pixels): the first s*s = 4 are the x offsets of group 0
        up.offset.bias[:4].fill_(4.0)
    shifted = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    ref = F.interpolate(shifted, scale_factor=2, mode="bilinear", align_corners=False)
    out = up(x)
    torch.testing.assert_close(out[..., 1:-2], ref[..., 1:-2], atol=1e-4, rtol=0)  # col 0: edge clamp
    # a linear ramp in x (value = 6*row + col): every interior sample moved by exactly +1
    torch.testing.assert_close(out[..., 2:-3] - F.interpolate(x, scale_factor=2, mode="bilinear",
                                                              align_corners=False)[..., 2:-3],
                               torch.ones_like(out[..., 2:-3]), atol=1e-4, rtol=0)


def test_dysample_offsets_are_per_pixel_and_learned():
    torch.manual_seed(0)
    up = DySample(8, scale=2, groups=2)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    loss = (up(x) * torch.randn(1, 8, 12, 12)).sum()
    loss.backward()
    assert up.offset.weight.grad is not None and up.offset.weight.grad.abs().sum() > 0
    with torch.no_grad():
        up.offset.weight.normal_(std=1.0)
    off = up.offsets(x.detach())
    assert off.shape == (1, 2, 2, 12, 12)
    assert off.flatten(2).std(dim=-1).min() > 0  # differs from pixel to pixel
    assert off.abs().max() <= 0.5 * up.offset(x.detach()).abs().max() + 1e-6  # dynamic scope bound


def test_dysample_rejects_bad_groups():
    with pytest.raises(ValueError, match="divisible by groups"):
        DySample(10, groups=4)


def test_forward_with_edge_shapes_and_forward_contract():
    torch.manual_seed(0)
    model = create_model("dedecoder_m3").eval()
    x = torch.randn(2, 3, 64, 80)
    outs, edge = model.forward_with_edge(x)
    assert len(outs) == model.num_outputs == 4
    assert all(o.shape == (2, 1, 64, 80) for o in outs) and edge.shape == (2, 1, 64, 80)
    with torch.no_grad():
        plain = model(x)
    for a, b in zip(plain, outs):
        torch.testing.assert_close(a, b.detach())
    torch.testing.assert_close(model.predict(x), torch.sigmoid(outs[0]).detach())


def test_encoder_weights_are_interchangeable_with_scfnet_m3():
    torch.manual_seed(0)
    scf = create_model("scfnet_m3").eval()
    de = create_model("dedecoder_m3").eval()
    encoder_keys = [k for k in scf.state_dict() if k.split(".")[0] in ("backbone", "mapping", "context")]
    missing, unexpected = de.load_state_dict({k: scf.state_dict()[k] for k in encoder_keys}, strict=False)
    assert not unexpected and not any(k.split(".")[0] in ("backbone", "mapping", "context") for k in missing)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(scf.encode(x), de.encode(x)):
            torch.testing.assert_close(a, b)


def test_edge_branch_gates_the_finest_feature():
    """Zeroing the edge head's output changes out1 (the edge gate feeds the refine conv) but not the
    coarser outputs, which do not depend on the edge branch."""
    torch.manual_seed(0)
    model = create_model("dedecoder_m3").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.edge_head.weight.zero_()
        model.edge_head.bias.fill_(-30.0)
        after = model(x)
    assert not torch.allclose(before[0], after[0])
    for i in (1, 2, 3):
        torch.testing.assert_close(before[i], after[i])


def test_config_validation_and_size():
    with pytest.raises(ValueError, match="groups"):
        DEDecoderConfig(channels=16, groups=3)
    with pytest.raises(ValueError, match="edge_channels"):
        DEDecoderConfig(edge_channels=0)
    with pytest.raises(ValueError, match="dedecoder_m3: unknown config key"):
        create_model("dedecoder_m3", chanels=8)
    small = create_model("dedecoder_m3", edge_channels=4)
    assert small.config["edge_channels"] == 4
    n = count_params(DEDecoder())
    assert 0.6e6 < n < 1.0e6, n  # the same budget as the scfnet_m3 student (~0.79 M)
