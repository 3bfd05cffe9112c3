"""Which tensor of a torchvision or timm ImageNet state dict goes into which tensor of sodkd's encoders
(:func:`models.load_backbone_weights` loads them).

The mapping is built by walking the *target* encoder, module by module, so it follows the encoder's
real structure (which blocks have an expansion conv or a squeeze-excite) rather than a fixed table.
Each conv / BatchNorm / SE module of the encoder is paired with one module of the file; all of its
tensors (``weight``, ``bias`` and, for BatchNorm, ``running_mean``, ``running_var``,
``num_batches_tracked``) are taken from that module.

:class:`~models.mobilenetv3.MobileNetV3Large` (``stem``, ``blocks.0`` .. ``blocks.14``):

=====================================  ==============================  ===============================
sodkd                                  torchvision                     timm (``mobilenetv3_large_100``)
=====================================  ==============================  ===============================
``stem.0`` conv / ``stem.1`` BN        ``features.0.0`` / ``.0.1``     ``conv_stem`` / ``bn1``
``blocks.i`` (i = 0..14)               ``features.{i+1}.block``        ``blocks.{s}.{j}`` (*)
``  .expand.0`` / ``.expand.1``        ``.{k}.0`` / ``.{k}.1`` (**)    ``.conv_pw`` / ``.bn1``
``  .depthwise.0`` / ``.depthwise.1``  ``.{k}.0`` / ``.{k}.1``         ``.conv_dw`` / ``.bn2``
``  .se.fc1`` / ``.se.fc2``            ``.{k}.fc1`` / ``.{k}.fc2``     ``.se.conv_reduce`` / ``.se.conv_expand``
``  .project.0`` / ``.project.1``      ``.{k}.0`` / ``.{k}.1``         ``.conv_pwl`` / ``.bn3``
=====================================  ==============================  ===============================

(*) timm groups the 15 blocks into stages of 1, 2, 3, 4, 2 and 3 blocks, so block ``i`` is
``blocks.{s}.{j}``. timm's first block is a depthwise-separable block without an expansion conv whose
layers are named ``conv_dw`` / ``bn1`` / ``conv_pw`` / ``bn2`` (depthwise, then project).
(**) torchvision numbers the sub-modules of ``block`` in order, skipping absent ones: ``k`` counts
expand (when present), depthwise, SE (when present), project. Ignored: torchvision's
``features.16`` (the 960-channel 1x1 conv) and ``classifier.*``; timm's last stage ``blocks.6``
(the same 1x1 conv), ``conv_head`` and ``classifier``.

:class:`~models.resnet.ResNetEncoder` (torchvision and timm use the same names for plain ResNets):
``stem.0`` / ``stem.1`` <- ``conv1`` / ``bn1``; ``stages.s.b`` <- ``layer{s+1}.b``; inside a block the
n-th conv / BN of ``body`` <- ``conv{n}`` / ``bn{n}``; ``shortcut.0`` / ``shortcut.1`` <-
``downsample.0`` / ``downsample.1``. Ignored: ``fc.*``. (timm's ``resnet*d`` deep-stem variants
have a different stem and are rejected.)

A file in sodkd's own naming (an encoder state dict, or a whole model's with ``backbone.`` keys) is
accepted too (``source="sodkd"``, found by ``"auto"``) and mapped one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from .mobilenetv3 import MobileNetV3Large
from .resnet import ResNetEncoder

__all__ = ["TIMM_MNV3_LARGE_STAGES", "find_encoder", "describe_encoder", "encoder_family", "key_mapping"]

# timm's MobileNetV3-Large puts its 15 inverted-residual blocks in stages of these sizes.
TIMM_MNV3_LARGE_STAGES = (1, 2, 3, 4, 2, 3)


def find_encoder(model_or_backbone: nn.Module) -> nn.Module:
    """The supported encoder: the module itself or its ``backbone`` attribute."""
    if isinstance(model_or_backbone, (MobileNetV3Large, ResNetEncoder)):
        return model_or_backbone
    backbone = getattr(model_or_backbone, "backbone", None)
    if isinstance(backbone, (MobileNetV3Large, ResNetEncoder)):
        return backbone
    found = type(backbone).__name__ if isinstance(backbone, nn.Module) else "none"
    raise TypeError(f"{type(model_or_backbone).__name__} is not a MobileNetV3Large / ResNetEncoder and has no such "
                    f"`backbone` (found: {found}); cannot load backbone weights into it")


def describe_encoder(encoder: nn.Module) -> str:
    if isinstance(encoder, MobileNetV3Large):
        return f"MobileNetV3Large(width_mult={encoder.width_mult:g})"
    return f"ResNetEncoder(depth={encoder.depth})"


def encoder_family(encoder: nn.Module) -> str:
    return "mobilenetv3" if isinstance(encoder, MobileNetV3Large) else "resnet"


def key_mapping(encoder: nn.Module, source: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{encoder key: file key}`` for every encoder tensor that has a counterpart in this naming."""
    if source == "sodkd":
        prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
        return {k: prefix + k for k in encoder.state_dict()}
    if isinstance(encoder, MobileNetV3Large):
        modules = _mnv3_torchvision(encoder) if source == "torchvision" else _mnv3_timm(encoder, state)
    else:
        modules = _resnet(encoder)  # timm's ResNets use torchvision's names
    return _expand(encoder, modules)


def _expand(encoder: nn.Module, modules: dict[str, str]) -> dict[str, str]:
    """Turn a module-level pairing into a tensor-level one: ``a.b.weight`` <- ``modules[a.b] + .weight``."""
    pairs = {}
    for key in encoder.state_dict():
        module, _, leaf = key.rpartition(".")
        if module in modules:
            pairs[key] = f"{modules[module]}.{leaf}"
    return pairs


def _conv_bn(modules: dict[str, str], target: str, conv: str, bn: str) -> None:
    modules[f"{target}.0"] = conv
    modules[f"{target}.1"] = bn


def _mnv3_torchvision(encoder: MobileNetV3Large) -> dict[str, str]:
    modules: dict[str, str] = {}
    _conv_bn(modules, "stem", "features.0.0", "features.0.1")
    for i, block in enumerate(encoder.blocks):
        src, k = f"features.{i + 1}.block", 0
        if not isinstance(block.expand, nn.Identity):
            _conv_bn(modules, f"blocks.{i}.expand", f"{src}.{k}.0", f"{src}.{k}.1")
            k += 1
        _conv_bn(modules, f"blocks.{i}.depthwise", f"{src}.{k}.0", f"{src}.{k}.1")
        k += 1
        if not isinstance(block.se, nn.Identity):
            modules[f"blocks.{i}.se.fc1"] = f"{src}.{k}.fc1"
            modules[f"blocks.{i}.se.fc2"] = f"{src}.{k}.fc2"
            k += 1
        _conv_bn(modules, f"blocks.{i}.project", f"{src}.{k}.0", f"{src}.{k}.1")
    return modules


def _mnv3_timm(encoder: MobileNetV3Large, state: dict[str, torch.Tensor]) -> dict[str, str]:
    positions = [(s, j) for s, n in enumerate(TIMM_MNV3_LARGE_STAGES) for j in range(n)]
    modules: dict[str, str] = {}
    _conv_bn(modules, "stem", "conv_stem", "bn1")
    for i, (block, (s, j)) in enumerate(zip(encoder.blocks, positions)):
        src = f"blocks.{s}.{j}"
        if not isinstance(block.se, nn.Identity):
            modules[f"blocks.{i}.se.fc1"] = f"{src}.se.conv_reduce"
            modules[f"blocks.{i}.se.fc2"] = f"{src}.se.conv_expand"
        if f"{src}.conv_pwl.weight" in state or not isinstance(block.expand, nn.Identity):
            # InvertedResidual: conv_pw (expand) -> conv_dw -> se -> conv_pwl (project)
            if not isinstance(block.expand, nn.Identity):
                _conv_bn(modules, f"blocks.{i}.expand", f"{src}.conv_pw", f"{src}.bn1")
            _conv_bn(modules, f"blocks.{i}.depthwise", f"{src}.conv_dw", f"{src}.bn2")
            _conv_bn(modules, f"blocks.{i}.project", f"{src}.conv_pwl", f"{src}.bn3")
        else:
            # DepthwiseSeparableConv: conv_dw -> se -> conv_pw (project)
            _conv_bn(modules, f"blocks.{i}.depthwise", f"{src}.conv_dw", f"{src}.bn1")
            _conv_bn(modules, f"blocks.{i}.project", f"{src}.conv_pw", f"{src}.bn2")
    return modules


def _resnet(encoder: ResNetEncoder) -> dict[str, str]:
    modules: dict[str, str] = {"stem.0": "conv1", "stem.1": "bn1"}
    for s, stage in enumerate(encoder.stages):
        for b, block in enumerate(stage):
            target, src = f"stages.{s}.{b}", f"layer{s + 1}.{b}"
            convs = [i for i, m in enumerate(block.body) if isinstance(m, nn.Conv2d)]
            norms = [i for i, m in enumerate(block.body) if isinstance(m, nn.BatchNorm2d)]
            for n, index in enumerate(convs, start=1):
                modules[f"{target}.body.{index}"] = f"{src}.conv{n}"
            for n, index in enumerate(norms, start=1):
                modules[f"{target}.body.{index}"] = f"{src}.bn{n}"
            if not isinstance(block.shortcut, nn.Identity):
                _conv_bn(modules, f"{target}.shortcut", f"{src}.downsample.0", f"{src}.downsample.1")
    return modules
