"""models.backbone_weights: torchvision / timm ImageNet state dicts into sodkd's own encoders.

Two kinds of tests:

* Without torchvision: the encoders' own random weights are renamed to torchvision's / timm's key names
  by rules written here (independently of the loader, which walks the encoder's modules), saved and
  loaded back; plus the file checks (not a state dict, pickled objects, wrong architecture...).
* With torchvision (and timm): their *own* models, given random weights and BatchNorm statistics, are
  saved and loaded; every encoder tensor must equal the tensor it maps from, the naming rules above must
  cover exactly torchvision's keys, and the encoder's features must equal torchvision's / timm's
  intermediate features on the same input (eval mode). These skip when torchvision is not importable.

torchvision is not in the project's `test` extra: PyPI only has CUDA builds of it, whose C++ ops do not
load next to the CPU torch 2.13.0; ``import torchvision`` then raises (see ``_import_torchvision``) and
transformers, which imports torchvision when it is installed, breaks with it. Install both beside the venv
and put them on the path for this file only::

    .venv/bin/python -m pip install --no-deps --target .venv/refmodels "torchvision>=0.28,<0.29" "timm>=1.0,<2"
    PYTHONPATH=.venv/refmodels .venv/bin/python -m pytest -q tests/unit/test_backbone_weights.py
"""

from __future__ import annotations

import copy
import logging
import re
import sys

import pytest
import torch
from torch import nn

import models
from models import BackboneLoadReport, BackboneWeightsError, create_model, load_backbone_weights, save_weights
from models.mobilenetv3 import MobileNetV3Large
from models.resnet import ResNetEncoder

torch.set_num_threads(1)

MNV3_TAPS = (4, 7, 13, 16)  # torchvision features[:k] ends after blocks 3, 6, 12 and 15


# ---------------------------------------------------------------------------------------------------
# Helpers


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and buffer distinct random values (BN statistics included), in place.

    Default BatchNorm stats (mean 0, var 1, weight 1, bias 0) would make a wrong BN mapping invisible.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.dtype.is_floating_point:
                tensor.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))
            elif name.endswith("running_var") or (name.endswith("weight") and tensor.dim() == 1):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.dim() == 1:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / tensor[0].numel()) ** 0.5)
    return module


def _save(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def _block_parts(block: nn.Module) -> list[str]:
    """The sub-modules of a sodkd MobileNetV3 block that exist, in torchvision's order."""
    parts = ["expand"] if not isinstance(block.expand, nn.Identity) else []
    parts.append("depthwise")
    if not isinstance(block.se, nn.Identity):
        parts.append("se")
    return parts + ["project"]


def tv_mnv3_name(key: str, encoder: MobileNetV3Large) -> str:
    """torchvision's name of a sodkd MobileNetV3Large key (the rules stated in the loader's docstring)."""
    if m := re.fullmatch(r"stem\.(\d)\.(\w+)", key):
        return f"features.0.{m[1]}.{m[2]}"
    m = re.fullmatch(r"blocks\.(\d+)\.(expand|depthwise|se|project)\.(.+)", key)
    assert m, key
    i, part, rest = int(m[1]), m[2], m[3]
    return f"features.{i + 1}.block.{_block_parts(encoder.blocks[i]).index(part)}.{rest}"


TIMM_STAGES = (1, 2, 3, 4, 2, 3)
TIMM_POSITIONS = [(s, j) for s, n in enumerate(TIMM_STAGES) for j in range(n)]
TIMM_IR = {"expand.0": "conv_pw", "expand.1": "bn1", "depthwise.0": "conv_dw", "depthwise.1": "bn2",
           "se.fc1": "se.conv_reduce", "se.fc2": "se.conv_expand", "project.0": "conv_pwl", "project.1": "bn3"}
TIMM_DS = {"depthwise.0": "conv_dw", "depthwise.1": "bn1", "project.0": "conv_pw", "project.1": "bn2"}


def timm_mnv3_name(key: str) -> str:
    """timm's (mobilenetv3_large_100) name of a sodkd MobileNetV3Large key."""
    if m := re.fullmatch(r"stem\.(\d)\.(\w+)", key):
        return f"{['conv_stem', 'bn1'][int(m[1])]}.{m[2]}"
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+\.\w+)\.(\w+)", key)
    assert m, key
    i, module, leaf = int(m[1]), m[2], m[3]
    s, j = TIMM_POSITIONS[i]
    table = TIMM_DS if i == 0 else TIMM_IR  # timm's first block is a depthwise-separable one
    return f"blocks.{s}.{j}.{table[module]}.{leaf}"


RESNET_BODY = {0: "conv1", 1: "bn1", 3: "conv2", 4: "bn2", 6: "conv3", 7: "bn3"}


def tv_resnet_name(key: str) -> str:
    """torchvision's (= timm's) name of a sodkd ResNetEncoder key."""
    if m := re.fullmatch(r"stem\.(\d)\.(\w+)", key):
        return f"{['conv1', 'bn1'][int(m[1])]}.{m[2]}"
    if m := re.fullmatch(r"stages\.(\d)\.(\d+)\.body\.(\d)\.(\w+)", key):
        return f"layer{int(m[1]) + 1}.{m[2]}.{RESNET_BODY[int(m[3])]}.{m[4]}"
    m = re.fullmatch(r"stages\.(\d)\.(\d+)\.shortcut\.(\d)\.(\w+)", key)
    assert m, key
    return f"layer{int(m[1]) + 1}.{m[2]}.downsample.{m[3]}.{m[4]}"


def _renamed(encoder: nn.Module, rename) -> dict[str, torch.Tensor]:
    return {rename(k): v.clone() for k, v in encoder.state_dict().items()}


def assert_loaded_from(encoder: nn.Module, source: dict[str, torch.Tensor], rename) -> None:
    """Every encoder tensor equals (bit for bit) the file tensor named ``rename(key)``."""
    for key, tensor in encoder.state_dict().items():
        src = source[rename(key)]
        assert tensor.shape == src.shape and torch.equal(tensor, src.to(tensor.dtype)), key


def _close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(ours) == len(ref)
    for level, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, (level, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"tap {level}: {m}")


# ---------------------------------------------------------------------------------------------------
# Without torchvision: our renaming rules, wrappers, file checks


@pytest.mark.parametrize("rename_name", ["torchvision", "timm"])
def test_mobilenetv3_from_renamed_keys(tmp_path, rename_name):
    width = 0.5 if rename_name == "torchvision" else 1.0
    src = _randomize(MobileNetV3Large(width), seed=1)
    rename = (lambda k: tv_mnv3_name(k, src)) if rename_name == "torchvision" else timm_mnv3_name
    state = _renamed(src, rename)
    extra = ({"features.16.0.weight": torch.zeros(1), "classifier.3.weight": torch.zeros(2, 2)}
             if rename_name == "torchvision" else {"conv_head.weight": torch.zeros(1), "classifier.weight": torch.zeros(1)})
    path = _save(tmp_path, "mnv3.pth", {**state, **extra})
    target = MobileNetV3Large(width)
    report = load_backbone_weights(target, path)
    assert report.source == rename_name and report.complete
    assert report.num_loaded == len(target.state_dict())
    assert sorted(report.ignored) == sorted(extra)
    assert_loaded_from(target, state, rename)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_from_renamed_keys(tmp_path, depth):
    src = _randomize(ResNetEncoder(depth), seed=2)
    state = _renamed(src, tv_resnet_name)
    path = _save(tmp_path, "r.pth", {**state, "fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)})
    target = ResNetEncoder(depth)
    report = load_backbone_weights(target, path)
    assert report.complete and report.ignored == ["fc.weight", "fc.bias"]
    assert_loaded_from(target, state, tv_resnet_name)


def test_wrappers_prefix_and_whole_model(tmp_path):
    src = _randomize(MobileNetV3Large(0.5), seed=3)
    state = _renamed(src, lambda k: tv_mnv3_name(k, src))
    for i, obj in enumerate([{"state_dict": state, "epoch": torch.tensor(3)}, {"model": state},
                             {"model": {"state_dict": state}}, {f"module.{k}": v for k, v in state.items()}]):
        model = create_model("scfnet_m3")
        decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        report = load_backbone_weights(model, _save(tmp_path, f"w{i}.pth", obj))
        assert report.complete and report.encoder == "MobileNetV3Large(width_mult=0.5)"
        assert_loaded_from(model.backbone, state, lambda k: tv_mnv3_name(k, src))
        for k, v in model.state_dict().items():  # only the encoder changed
            if not k.startswith("backbone."):
                assert torch.equal(v, decoder_before[k]), k


def test_sodkd_files_load_one_to_one(tmp_path):
    teacher = _randomize(create_model("scfnet_r18"), seed=4)
    path = tmp_path / "teacher.sodkd"
    save_weights(teacher, path)  # {"sodkd_meta": ..., "state_dict": {"backbone.*": ..., decoder ...}}
    fresh = ResNetEncoder(18)
    report = load_backbone_weights(fresh, path)
    assert report.source == "sodkd" and report.complete
    assert all(not k.startswith("backbone.") for k in report.ignored) and report.ignored
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, teacher.backbone.state_dict()[k]), k


def test_wrong_width_and_wrong_family_raise_and_leave_the_encoder_alone(tmp_path):
    wide = _randomize(MobileNetV3Large(1.0), seed=5)
    path = _save(tmp_path, "x1.pth", _renamed(wide, lambda k: tv_mnv3_name(k, wide)))
    target = MobileNetV3Large(0.5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(BackboneWeightsError, match=r"x1\.pth: looks like a torchvision MobileNetV3-Large state dict "
                                                   r"\(width_mult ~1.*this encoder is MobileNetV3Large\(width_mult=0\.5\)"):
        load_backbone_weights(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())

    r18 = _renamed(_randomize(ResNetEncoder(18)), tv_resnet_name)
    with pytest.raises(BackboneWeightsError, match=r"looks like a torchvision/timm ResNet-18 state dict; "
                                                   r"this encoder is MobileNetV3Large\(width_mult=0\.5\)"):
        load_backbone_weights(target, _save(tmp_path, "r18.pth", r18))
    with pytest.raises(BackboneWeightsError, match=r"ResNet-18 state dict; this encoder is ResNetEncoder\(depth=50\)"):
        load_backbone_weights(ResNetEncoder(50), str(tmp_path / "r18.pth"))


def test_missing_tensors_are_reported_and_strict_refuses_them(tmp_path, caplog):
    src = _randomize(MobileNetV3Large(0.5), seed=6)
    state = {k: v for k, v in _renamed(src, lambda k: tv_mnv3_name(k, src)).items() if not k.startswith("features.0.")}
    path = _save(tmp_path, "nostem.pth", state)
    target = MobileNetV3Large(0.5)
    stem_before = target.stem[0].weight.clone()
    with pytest.raises(BackboneWeightsError, match="strict"):
        load_backbone_weights(target, path, strict=True)
    with caplog.at_level(logging.WARNING, logger="models.backbone_weights"):
        report = load_backbone_weights(target, path)
    assert not report.complete and sorted(report.missing) == sorted(k for k in target.state_dict() if k.startswith("stem."))
    assert torch.equal(target.stem[0].weight, stem_before)
    assert "left at initialisation: 6" in report.summary() and "left at initialisation" in caplog.text


def test_forcing_the_wrong_naming_maps_nothing(tmp_path):
    src = _randomize(MobileNetV3Large(0.5))
    path = _save(tmp_path, "tv.pth", _renamed(src, lambda k: tv_mnv3_name(k, src)))
    with pytest.raises(BackboneWeightsError, match=r"no tensor maps onto .*source='timm'.*torchvision MobileNetV3"):
        load_backbone_weights(MobileNetV3Large(0.5), path, source="timm")
    with pytest.raises(ValueError, match="source must be one of"):
        load_backbone_weights(MobileNetV3Large(0.5), path, source="keras")


class _Payload:
    """A pickled object: weights_only loading must refuse it (no code from the file runs)."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content, message", [
    ([torch.zeros(2)], "not a state dict of tensors .it holds a list"),
    ({}, "holds an empty dict"),
    ({"conv1.weight": torch.zeros(1), "epoch": 3}, r"1 of 2 entries are not named tensors, e.g. epoch"),
    ({"head.weight": torch.zeros(1)}, "an unrecognised state dict .1 tensors; first keys: head.weight"),
    ({"state_dict": _Payload()}, "weights_only=True failed"),
    (b"\x00not a torch file at all", "weights_only=True failed"),
])
def test_files_that_are_not_state_dicts_raise_naming_the_file(tmp_path, content, message, capsys):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(BackboneWeightsError, match=message) as err:
        load_backbone_weights(MobileNetV3Large(0.5), path)
    assert str(path) in str(err.value)
    assert "must never run" not in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(MobileNetV3Large(0.5), tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="Conv2d is not a MobileNetV3Large / ResNetEncoder"):
        load_backbone_weights(nn.Conv2d(3, 3, 1), tmp_path / "nope.pth")
    assert {"load_backbone_weights", "BackboneLoadReport", "BackboneWeightsError"} <= set(models.__all__)
    assert issubclass(BackboneWeightsError, ValueError)


# ---------------------------------------------------------------------------------------------------
# With torchvision's and timm's own models

_TORCHVISION_OPS_STUB = None


def _import_torchvision():
    """Import torchvision, or skip.

    PyPI's torchvision 0.28 is built against CUDA torch; next to the CPU build of torch 2.13 its C++
    extension (detection ops such as nms) cannot load, and torchvision 0.28 then fails at import while
    registering a fake kernel for ``torchvision::nms``. The models used here are pure PyTorch, so the
    two op *schemas* it registers against are declared first (no kernels: nms stays unusable). Only
    this test process is affected.
    """
    global _TORCHVISION_OPS_STUB
    try:
        import torchvision
    except ImportError as err:
        pytest.skip(f"torchvision is not installed ({err}); see this file's docstring to run these tests")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _TORCHVISION_OPS_STUB = torch.library.Library("torchvision", "DEF")
        _TORCHVISION_OPS_STUB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS_STUB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


@pytest.fixture(scope="module")
def tv():
    return _import_torchvision()


@pytest.fixture(scope="module")
def timm(tv):
    try:
        import timm
    except ImportError as err:
        pytest.skip(f"timm is not installed ({err}); see this file's docstring to run these tests")
    return timm


@pytest.fixture(scope="module")
def tv_mnv3_050(tv, tmp_path_factory):
    ref = _randomize(tv.models.mobilenet_v3_large(weights=None, width_mult=0.5), seed=10).eval()
    path = tmp_path_factory.mktemp("tv") / "mobilenet_v3_large_x0.5.pth"
    torch.save(ref.state_dict(), path)
    return ref, str(path)


def _tv_features(ref: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [ref.features[:k](x) for k in MNV3_TAPS]


def test_torchvision_mobilenetv3_tensors_map_one_to_one(tv_mnv3_050):
    ref, path = tv_mnv3_050
    model = create_model("scfnet_m3")
    report = load_backbone_weights(model, path)
    encoder = model.backbone
    assert isinstance(report, BackboneLoadReport) and report.source == "torchvision" and report.complete
    assert report.num_loaded == len(encoder.state_dict()) and not report.mismatched
    source = ref.state_dict()
    assert_loaded_from(encoder, source, lambda k: tv_mnv3_name(k, encoder))
    # The rules cover exactly torchvision's features.0-15; what is left is the last conv and the classifier.
    mapped = {tv_mnv3_name(k, encoder) for k in encoder.state_dict()}
    assert mapped == {k for k in source if not k.startswith(("features.16.", "classifier."))}
    assert sorted(report.ignored) == sorted(k for k in source if k.startswith(("features.16.", "classifier.")))
    assert {"classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"} <= set(report.ignored)
    assert any(k.endswith("num_batches_tracked") for k in report.loaded)
    assert "ignored from the file: 10: features.16.0.weight" in report.summary()


def test_torchvision_mobilenetv3_features_match(tv_mnv3_050):
    """Same weights, same input -> the same four taps, once BatchNorm eps is the same (see the next test)."""
    ref, path = tv_mnv3_050
    encoder = MobileNetV3Large(0.5)
    load_backbone_weights(encoder, path)
    encoder.eval()
    ref_same_eps = copy.deepcopy(ref)
    for m in ref_same_eps.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-5
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder(x)
    _close(ours, _tv_features(ref_same_eps, x))
    assert [t.shape[1] for t in ours] == [16, 24, 56, 80]


def test_torchvision_mobilenetv3_batchnorm_eps_is_a_real_difference(tv_mnv3_050):
    """An architectural difference, kept visible: torchvision's MobileNetV3 uses BatchNorm eps=1e-3, sodkd's 1e-5.

    The weights load exactly, but eval-mode features are not torchvision's to float precision; the
    report says so. If the encoder's eps is ever changed to 1e-3, this test must be updated.
    """
    ref, path = tv_mnv3_050
    assert {m.eps for m in ref.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    encoder = MobileNetV3Large(0.5)
    assert {m.eps for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}
    report = load_backbone_weights(encoder, path)
    assert any("eps=0.001" in note and "eps=1e-05" in note for note in report.notes)
    encoder.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder(x)
    ref_out = _tv_features(ref, x)
    rel = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, ref_out)]
    # With running variances drawn from [0.5, 1.5] the drift is ~0.5% of the largest activation at
    # stride 4 and grows to ~2.5% at stride 32 (it compounds over 45 BatchNorms); pretrained statistics
    # with variances near 1e-3 drift more. Clearly more than float error, clearly the same network.
    assert all(1e-4 < r < 0.1 for r in rel), rel


def test_torchvision_width_1_file_into_the_student_raises(tv, tmp_path):
    path = _save(tmp_path, "mobilenet_v3_large.pth", tv.models.mobilenet_v3_large(weights=None).state_dict())
    with pytest.raises(BackboneWeightsError, match=r"mobilenet_v3_large\.pth: looks like a torchvision "
                                                   r"MobileNetV3-Large state dict \(width_mult ~1.*stem 16 ch.*"
                                                   r"this encoder is MobileNetV3Large\(width_mult=0\.5\)"):
        load_backbone_weights(create_model("scfnet_m3"), path)


def test_torchvision_resnet_file_into_mobilenetv3_raises(tv, tmp_path):
    path = _save(tmp_path, "resnet18.pth", tv.models.resnet18(weights=None).state_dict())
    with pytest.raises(BackboneWeightsError, match=r"resnet18\.pth: looks like a torchvision/timm ResNet-18 state "
                                                   r"dict; this encoder is MobileNetV3Large\(width_mult=0\.5\)"):
        load_backbone_weights(create_model("scfnet_m3"), path)


@pytest.mark.parametrize("depth, teacher", [(18, "scfnet_r18"), (50, "scfnet_r50")])
def test_torchvision_resnet_tensors_and_features_match(tv, tmp_path, depth, teacher):
    ref = _randomize(getattr(tv.models, f"resnet{depth}")(weights=None), seed=depth).eval()
    path = _save(tmp_path, f"resnet{depth}.pth", ref.state_dict())
    model = create_model(teacher)
    report = load_backbone_weights(model, path)
    encoder = model.backbone.eval()
    assert report.complete and sorted(report.ignored) == ["fc.bias", "fc.weight"]
    source = ref.state_dict()
    assert_loaded_from(encoder, source, tv_resnet_name)
    assert {tv_resnet_name(k) for k in encoder.state_dict()} == set(source) - {"fc.weight", "fc.bias"}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder(x)
        y = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = []
        for stage in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            y = stage(y)
            expected.append(y)
    _close(ours, expected)


def test_timm_mobilenetv3_large_100(timm, tmp_path):
    ref = _randomize(timm.create_model("mobilenetv3_large_100", pretrained=False), seed=20).eval()
    path = _save(tmp_path, "mobilenetv3_large_100.pth", {"state_dict": ref.state_dict()})
    encoder = MobileNetV3Large(1.0)
    report = load_backbone_weights(encoder, path)
    assert report.source == "timm" and report.complete
    source = ref.state_dict()
    assert_loaded_from(encoder, source, timm_mnv3_name)
    assert {timm_mnv3_name(k) for k in encoder.state_dict()} == {
        k for k in source if not k.startswith(("blocks.6.", "conv_head.", "classifier."))}
    assert {"classifier.weight", "classifier.bias", "conv_head.weight"} <= set(report.ignored)
    encoder.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = ref.bn1(ref.conv_stem(x))  # timm's bn1 carries the stem activation
        stages = []
        for stage in ref.blocks[:6]:
            y = stage(y)
            stages.append(y)
        ours = encoder(x)
    _close(ours, [stages[1], stages[2], stages[4], stages[5]])  # ends of blocks 3, 6, 12, 15


def test_timm_narrower_mobilenetv3_is_another_architecture(timm, tmp_path):
    """timm scales widths by expansion ratios on rounded widths, so its x0.75 is not torchvision's / ours."""
    path = _save(tmp_path, "mobilenetv3_large_075.pth", timm.create_model("mobilenetv3_large_075").state_dict())
    with pytest.raises(BackboneWeightsError, match=r"looks like a timm MobileNetV3-Large.*this encoder is "
                                                   r"MobileNetV3Large\(width_mult=0\.75\).*only timm's x1\.0 model"):
        load_backbone_weights(MobileNetV3Large(0.75), path)


def test_timm_resnets(timm, tmp_path):
    for depth in (18, 50):
        ref = _randomize(timm.create_model(f"resnet{depth}", pretrained=False), seed=30 + depth).eval()
        path = _save(tmp_path, f"timm_resnet{depth}.pth", ref.state_dict())
        encoder = ResNetEncoder(depth)
        report = load_backbone_weights(encoder, path, source="timm")
        assert report.complete and sorted(report.ignored) == ["fc.bias", "fc.weight"]
        assert_loaded_from(encoder, ref.state_dict(), tv_resnet_name)
        encoder.eval()
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = ref.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
            _close(encoder(x), expected)
    deep = timm.create_model("resnet18d", pretrained=False).state_dict()
    with pytest.raises(BackboneWeightsError, match="deep-stem"):
        load_backbone_weights(ResNetEncoder(18), _save(tmp_path, "resnet18d.pth", deep))


def test_against_torchvision_and_timm_in_their_own_process():
    """The comparisons above need torchvision and timm, which `make setup` installs into ``.venv/refmodels``,
    off the venv's path (see the module docstring: transformers in this process must not see torchvision).
    They run here in a child pytest with that folder on its path, and every one of them must run."""
    import os
    import subprocess
    from pathlib import Path
    if os.environ.get("SODKD_REFMODELS_CHILD"):
        pytest.skip("the child run itself")
    repo = Path(__file__).resolve().parents[2]
    ref = repo / ".venv" / "refmodels"
    assert (ref / "torchvision").is_dir() and (ref / "timm").is_dir(), \
        f"{ref}: torchvision/timm missing; run `make setup` (it installs them there)"
    env = {**os.environ, "PYTHONPATH": str(ref), "SODKD_REFMODELS_CHILD": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    tail = out.stdout[-2000:]
    assert out.returncode == 0, tail
    assert re.search(r"\b1 skipped\b", tail) and re.search(r"\b\d+ passed\b", tail), tail
