"""models/: every registered model runs forward and backward; size targets; registry; weight files."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import models
from models import (SODModel, UnknownModelError, WeightsFormatError, count_macs, count_params, create_model,
                    list_models, load_state, load_weights, read_metadata, save_weights)
from models.mobilenetv3 import MobileNetV3Large, make_divisible
from models.resnet import ResNetEncoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def real_batch(shared_data) -> torch.Tensor:
    """Two real ECSSD images, resized to 64x64, as a uint8 batch (2, 3, 64, 64)."""
    paths = sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:2]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _trained_bn(model: SODModel, x: torch.Tensor, steps: int = 2) -> SODModel:
    """Give BatchNorm non-default running statistics, so weight round trips are not trivially equal."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


def test_registry_lists_the_scfnet_family():
    assert {"scfnet_m3", "scfnet_r18", "scfnet_r50"} <= set(list_models())
    assert list_models("scfnet_r*") == [n for n in list_models() if n.startswith("scfnet_r")]


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name, real_batch):
    torch.manual_seed(0)
    model = create_model(name).train()
    assert model.name == name
    x = model.normalize(real_batch)
    outs = model(x)
    assert len(outs) == model.num_outputs == 4
    for o in outs:
        assert o.shape == (2, 1, 64, 64)
        assert torch.isfinite(o).all()
    # Distinct heads give distinct maps.
    assert not torch.allclose(outs[0], outs[3])
    target = (real_batch.float().mean(1, keepdim=True) > 128).float()
    loss = sum(nn.functional.binary_cross_entropy_with_logits(o, target) for o in outs)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
    # The gradient reaches the very first conv of the encoder and every head.
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0
    for head in getattr(model, "heads", []):
        assert head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("hw", [(67, 45), (96, 128)])
def test_outputs_match_any_input_size(hw):
    model = create_model("scfnet_m3").eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *hw))
    assert [tuple(o.shape[-2:]) for o in outs] == [hw] * 4


def test_student_size_and_cost_match_the_paper():
    model = create_model("scfnet_m3")
    params, macs = count_params(model), count_macs(model, 352)
    assert 0.76e6 <= params <= 0.82e6, params
    assert 0.22e9 <= macs <= 0.26e9, macs


def test_r50_teacher_size_matches_the_paper():
    assert 25e6 <= count_params(create_model("scfnet_r50")) <= 27.5e6


def test_mobilenetv3_taps_channels_and_strides():
    enc = MobileNetV3Large(width_mult=0.5)
    assert enc.out_channels == (16, 24, 56, 80)
    feats = enc(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [16, 24, 56, 80]
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32]
    assert MobileNetV3Large(1.0).out_channels == (24, 40, 112, 160)
    assert [make_divisible(v) for v in (12, 20, 36, 60, 92, 100)] == [16, 24, 40, 64, 96, 104]


@pytest.mark.parametrize("depth,channels", [(18, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048))])
def test_resnet_stage_features(depth, channels):
    enc = ResNetEncoder(depth)
    feats = enc(torch.zeros(1, 3, 64, 64))
    assert tuple(f.shape[1] for f in feats) == channels == enc.out_channels
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="depth 101"):
        ResNetEncoder(101)


def test_encoder_and_decoder_are_reusable_parts():
    model = create_model("scfnet_m3").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.encode(x)
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (16, 8, 8), (16, 4, 4), (16, 2, 2)]
        decoded = model.decode(feats)
        assert [tuple(d.shape[-2:]) for d in decoded] == [(16, 16), (8, 8), (4, 4), (2, 2)]
        assert decoded[3] is feats[3]
        manual = model.side_outputs(decoded, (64, 64))
        for a, b in zip(manual, model(x)):
            assert torch.equal(a, b)


def test_mac_count_matches_an_independent_conv_hook_count():
    """count_macs (FlopCounterMode / 2) against MACs summed from Conv2d output shapes."""
    model = create_model("scfnet_m3").eval()
    total = 0

    def hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 96, 96))
    for h in handles:
        h.remove()
    assert count_macs(model, 96) == total
    # one conv by hand: 10*10 outputs x 8 channels x (3 in x 3x3 kernel)
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), 10) == 10 * 10 * 8 * 3 * 9


def test_count_macs_restores_training_mode():
    model = create_model("scfnet_m3").train()
    count_macs(model, 64)
    assert model.training


def test_unknown_model_name_fails_loudly():
    with pytest.raises(UnknownModelError) as err:
        create_model("scfnet_m4")
    msg = str(err.value)
    assert "scfnet_m4" in msg and "Did you mean 'scfnet_m3'" in msg
    for name in list_models():
        assert name in msg
    assert isinstance(err.value, ValueError)


def test_bad_config_keys_and_values_name_the_key():
    with pytest.raises(ValueError, match=r"scfnet_m3: unknown config key\(s\) \['chanels'\]"):
        create_model("scfnet_m3", chanels=8)
    with pytest.raises(ValueError, match="backbone: unknown 'vgg16'"):
        create_model("scfnet_m3", backbone="vgg16")
    with pytest.raises(ValueError, match="width_mult"):
        create_model("scfnet_r50", width_mult=0.5)
    with pytest.raises(ValueError, match="channels"):
        create_model("scfnet_m3", channels=0)


def test_config_overrides_change_the_model_and_are_recorded():
    narrow = create_model("scfnet_m3", channels=8)
    assert narrow.config == {"backbone": "mobilenetv3_large", "width_mult": 0.5, "channels": 8, "dilation": 5}
    assert count_params(narrow) < count_params(create_model("scfnet_m3"))
    rebuilt = create_model("scfnet_m3", **narrow.config)
    assert count_params(rebuilt) == count_params(narrow)


def test_preprocessing_attributes_and_normalize(real_batch):
    for name in list_models():
        model = create_model(name)
        assert len(model.mean) == 3 and len(model.std) == 3 and model.input_size == 352
    model = create_model("scfnet_m3")
    assert model.mean == pytest.approx((124.55, 118.90, 102.94))
    assert model.std == pytest.approx((56.77, 55.97, 57.50))
    x = model.normalize(real_batch)
    assert x.dtype == torch.float32 and x.shape == real_batch.shape
    expected_r = (real_batch[:, 0].float() - 124.55) / 56.77
    torch.testing.assert_close(x[:, 0], expected_r)
    torch.testing.assert_close(model.normalize(real_batch.float() / 255.0, value_range=1.0), x)
    torch.testing.assert_close(model.normalize(real_batch[0].numpy()), x[0])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model.normalize(real_batch.permute(0, 2, 3, 1))
    with pytest.raises(TypeError, match="int64"):
        model.normalize(real_batch.long())


def test_predict_is_the_sigmoid_of_the_finest_output(real_batch):
    model = create_model("scfnet_m3").eval()
    x = model.normalize(real_batch)
    with torch.no_grad():
        p = model.predict(x)
        torch.testing.assert_close(p, torch.sigmoid(model(x)[0]))
    assert p.shape == (2, 1, 64, 64) and p.min() >= 0 and p.max() <= 1


def test_param_groups_split_backbone_from_the_rest():
    model = create_model("scfnet_m3")
    groups = model.param_groups(0.064, backbone_lr_mult=0.1, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(0.0064) and groups[1]["lr"] == pytest.approx(0.064)
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[0]["params"]} == backbone_ids
    assert not backbone_ids & {id(p) for p in groups[1]["params"]}
    assert sum(p.numel() for g in groups for p in g["params"]) == count_params(model)
    torch.optim.SGD(groups, lr=0.064, momentum=0.9)  # accepted as optimizer groups
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert [g["name"] for g in model.param_groups(0.1)] == ["head"]


def test_save_load_roundtrip_outputs_identical(tmp_path, real_batch):
    torch.manual_seed(1)
    model = _trained_bn(create_model("scfnet_m3", channels=8), torch.randn(2, 3, 64, 64))
    path = tmp_path / "w" / "student.pt"
    written = save_weights(model, path, extra_meta={"epoch": 3, "val/mae": 0.041})
    meta = read_metadata(path)
    assert meta == written
    assert meta["model"] == "scfnet_m3" and meta["config"]["channels"] == 8
    assert meta["torch_version"] == torch.__version__ and meta["dtype"] == "float32"
    assert meta["epoch"] == 3 and meta["val/mae"] == 0.041
    assert meta["num_params"] == count_params(model)
    assert meta["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"])
    loaded = load_weights(path)
    assert isinstance(loaded, SODModel) and loaded.name == "scfnet_m3" and not loaded.training
    assert loaded.config == model.config
    x = model.normalize(real_batch)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            assert torch.equal(a, b)
    # load_state into a freshly built model gives the same state, buffers included
    fresh = load_state(create_model("scfnet_m3", channels=8), path)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_widen_decoder_keeps_the_maps_and_trains_the_new_channels(tmp_path, real_batch):
    from models.scfnet import widen_decoder
    torch.manual_seed(3)
    model = _trained_bn(create_model("scfnet_m3", channels=8), torch.randn(2, 3, 64, 64))
    model.input_size = 224
    x = model.normalize(real_batch)
    exact = widen_decoder(model, 20, noise=0.0)      # 8 -> 20: channels 0-3 appear three times, 4-7 twice
    assert exact.config["channels"] == 20 and exact.input_size == 224 and exact.name == "scfnet_m3"
    assert count_params(exact) > count_params(model)
    for train in (False, True):                       # eval (running stats) and train (batch stats) alike
        model.train(train), exact.train(train)
        with torch.no_grad():
            for a, b in zip(model(x), exact(x)):
                torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    # the encoder is untouched; the saved file names its width and loads back as the wide model
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 exact.backbone.state_dict().values()))
    save_weights(exact, tmp_path / "wide.pt")
    assert load_weights(tmp_path / "wide.pt").config["channels"] == 20
    # with noise the copies differ, so one step moves a copy and its source apart (the symmetry is broken)
    noisy = widen_decoder(model, 16, noise=0.05, seed=1).train()
    w = noisy.scfm2.cv3[0].weight
    gap0 = (w[8:] - w[:8]).abs().sum().item()
    assert gap0 > 0
    torch.optim.SGD(noisy.parameters(), lr=0.1).zero_grad()
    sum(o.mean() for o in noisy(x)).backward()
    grad = noisy.scfm2.cv3[0].weight.grad
    assert not torch.allclose(grad[8:], grad[:8])
    with pytest.raises(ValueError, match="channels must be >= the model's 8"):
        widen_decoder(model, 4)


def test_slim_keeps_the_most_important_channels_and_its_widths(tmp_path, real_batch):
    from models.scfnet import slim
    torch.manual_seed(4)
    model = create_model("scfnet_m3")
    for m in model.modules():      # distinct BN scales, so the channels' importance is not a tie
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 2.0)
    model = _trained_bn(model, torch.randn(2, 3, 64, 64))
    model.input_size = 224
    x = model.normalize(real_batch)
    # to the model's own widths: an exact copy, in eval and train mode alike
    same = slim(model, 0.5, 16)
    for train in (False, True):
        model.train(train), same.train(train)
        with torch.no_grad():
            for a, b in zip(model(x), same(x)):
                torch.testing.assert_close(b, a)
    model.eval()
    # to x0.3 / c = 8: the architecture create_model builds for those widths, a quarter of the parameters
    thin = slim(model, 0.3, 8)
    ref = create_model("scfnet_m3", width_mult=0.3, channels=8)
    assert [(k, v.shape) for k, v in thin.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert count_params(thin) < 0.4 * count_params(model) and not thin.training
    # the stem keeps its 8 channels; a residual stream keeps the channels with the largest summed |gamma|
    # over the blocks that add into it (blocks 4-6, 24 -> 16 channels), with their weights copied as they are
    blocks = model.backbone.blocks
    gamma = sum(blocks[i].project[1].weight.abs() for i in (3, 4, 5))
    kept = gamma.topk(16).indices.sort().values
    torch.testing.assert_close(thin.backbone.blocks[4].project[1].weight, blocks[4].project[1].weight[kept])
    dec = model.scfm2.cv3[0].weight
    assert any(torch.equal(thin.scfm2.cv3[0].weight[0, 0], dec[i, j]) for i in range(16) for j in range(16))
    # it runs, differs from the source (what the dropped channels did is lost) and saves as the slim model
    with torch.no_grad():
        p_thin, p_src = thin.predict(x), model.predict(x)
    assert p_thin.shape == p_src.shape and not torch.allclose(p_thin, p_src)
    save_weights(thin, tmp_path / "thin.pt")
    cfg = load_weights(tmp_path / "thin.pt").config
    assert (cfg["width_mult"], cfg["channels"]) == (0.3, 8)
    with pytest.raises(ValueError, match="channels must be <= the model's 16"):
        slim(model, 0.3, 32)
    with pytest.raises(ValueError, match="wider than the model's 0.5"):
        slim(model, 0.75, 8)
    with pytest.raises(ValueError, match="only MobileNetV3 encoders"):
        slim(create_model("scfnet_r18"), 0.5, 8)


def test_fp16_file_is_smaller_and_loads_into_float32(tmp_path, real_batch):
    torch.manual_seed(2)
    model = _trained_bn(create_model("scfnet_m3"), torch.randn(2, 3, 64, 64))
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_weights(model, full)
    save_weights(model, half, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert read_metadata(half)["dtype"] == "float16"
    loaded = load_weights(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = model.normalize(real_batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x), model.predict(x), atol=1e-2, rtol=0)
        assert not torch.equal(loaded(x)[0], model(x)[0])  # it really went through float16


def test_weights_in_a_stream_and_bare_state_dicts(tmp_path):
    model = create_model("scfnet_m3", channels=8).eval()
    buf = io.BytesIO()
    save_weights(model, buf)
    buf.seek(0)
    assert read_metadata(buf)["model"] == "scfnet_m3"
    buf.seek(0)
    assert count_params(load_weights(buf)) == count_params(model)
    # a bare state dict (e.g. from DDP, "module." prefixed) loads with load_state but not load_weights
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, bare)
    target = load_state(create_model("scfnet_m3", channels=8), bare)
    assert torch.equal(target.heads[0].weight, model.heads[0].weight)
    with pytest.raises(WeightsFormatError, match="no sodkd metadata header"):
        load_weights(bare)
    with pytest.raises(WeightsFormatError, match="no sodkd metadata header"):
        read_metadata(bare)


def test_weight_file_errors_name_the_file(tmp_path):
    model = create_model("scfnet_m3", channels=8)
    path = tmp_path / "m3.pt"
    save_weights(model, path)
    with pytest.raises(WeightsFormatError, match="holds weights of 'scfnet_m3'"):
        load_state(create_model("scfnet_r18"), path)
    with pytest.raises(WeightsFormatError, match="does not fit"):
        load_state(create_model("scfnet_m3"), path)  # channels 16 vs 8
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsFormatError, match="junk.pt"):
        read_metadata(junk)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_weights(model, tmp_path / "x.pt", extra_meta={"step": np.int64(3)})
    with pytest.raises(ValueError, match="reserved"):
        save_weights(model, tmp_path / "x.pt", extra_meta={"model": "other"})
    assert not (tmp_path / "x.pt").exists()


def test_public_api_is_exported():
    for name in ("register_model", "create_model", "list_models", "save_weights", "load_weights",
                 "count_params", "count_macs", "read_metadata", "load_state", "SODModel"):
        assert hasattr(models, name), name
