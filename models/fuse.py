"""Inference-time graph simplification: BatchNorm folded into the convolution before it; an output scale
folded into the finest head (:func:`scale_output`).

In eval mode a ``BatchNorm2d`` after a ``Conv2d`` is an affine map per output channel, so the pair is one
convolution with ``W' = W * g / sqrt(var + eps)`` and ``b' = (b - mean) * g / sqrt(var + eps) + beta``
(``g, beta`` the BN weight and bias). Every conv + BN pair in this package's models sits in an
``nn.Sequential`` (``ConvBNReLU``, MobileNetV3's ``conv_bn``, the DEDecoder's ``reduce``), so folding walks the
sequentials and replaces such a pair by the folded conv and an ``nn.Identity``. Module names and indices stay
as they are (a state dict of the folded model has no BN entries, which is why folding works on a copy).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm", "count_batchnorm", "scale_output", "undo_output_scale"]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every ``Conv2d -> BatchNorm2d`` pair of a ``Sequential`` folded.

    The copy computes the same function in eval mode (up to float rounding, ~1e-6 on probabilities); the
    original is not changed. A BN that does not directly follow a conv stays.
    """
    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and conv.out_channels == bn.num_features):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return folded


def count_batchnorm(model: nn.Module) -> int:
    """How many ``BatchNorm2d`` modules ``model`` still has (0 after folding one of this package's models)."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def scale_output(model: nn.Module, scale: float) -> nn.Module:
    """``model`` (changed in place and returned) with its finest head's logits multiplied by ``scale``.

    The finest map is ``heads[0]`` in every student of this package (SCFNet's out2, the DEDecoder's out1, the
    video student's), a ``Conv2d`` whose output is only upsampled bilinearly before the sigmoid: scaling its
    weight and bias scales the logits exactly, so ``predict`` becomes ``sigmoid(scale * z)`` at no cost
    (:mod:`kd.calibration` says why and how the scale is chosen). The coarser heads, which only train or guide,
    are left alone.
    """
    if not scale > 0:
        raise ValueError(f"scale_output: scale must be > 0, got {scale}")
    heads = getattr(model, "heads", None)
    if not isinstance(heads, nn.ModuleList) or not len(heads) or not isinstance(heads[0], nn.Conv2d):
        raise ValueError(f"scale_output: {type(model).__name__} has no conv head heads[0] to scale")
    with torch.no_grad():
        heads[0].weight.mul_(scale)
        if heads[0].bias is not None:
            heads[0].bias.mul_(scale)
    return model


def undo_output_scale(model: nn.Module, meta: dict) -> float:
    """Undo the ``output_scale`` a calibrated file's header ``meta`` records (``sodkd calibrate``), in place: the
    model as trained, which is what further training starts from. Returns the scale undone (1: nothing to do)."""
    scale = float(meta.get("output_scale", 1.0))
    if scale != 1.0:
        scale_output(model, 1.0 / scale)
    return scale
