"""MobileNetV3-Large as a feature encoder for dense prediction (the KD-SCFNet student backbone).

Howard et al., "Searching for MobileNetV3" (ICCV 2019), the "large" variant: a 3x3 stride-2 stem
(hardswish) followed by 15 inverted-residual blocks. Each block is

    expand 1x1 (skipped when the expansion equals the input width) -> depthwise kxk (stride s)
    -> optional squeeze-excitation (reduction 4, hard-sigmoid gate) -> project 1x1 (linear)

with a residual add when the stride is 1 and the width does not change. Widths are scaled by
``width_mult`` and rounded with :func:`make_divisible` (multiples of 8), so at x0.5 the four taps after
blocks 3, 6, 12 and 15 have 16, 24, 56 and 80 channels at strides 4, 8, 16 and 32.

Only the encoder is built: SCFNet does not use the final 1x1 960-channel conv or the classifier.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["MobileNetV3Large", "make_divisible", "LARGE_BLOCKS"]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it.

    The rule of the MobileNet papers: ``max(min_value, int(v + d/2) // d * d)``, plus one more ``d``
    when rounding down lost more than 10%.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class BlockSpec(NamedTuple):
    kernel: int
    expand: int      # expanded (hidden) width at x1.0
    out: int         # output width at x1.0
    se: bool
    act: str         # "relu" or "hswish"
    stride: int


# The 15 blocks of MobileNetV3-Large (Table 1 of the paper).
LARGE_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(3, 16, 16, False, "relu", 1),
    BlockSpec(3, 64, 24, False, "relu", 2),
    BlockSpec(3, 72, 24, False, "relu", 1),     # tap 1: stride 4
    BlockSpec(5, 72, 40, True, "relu", 2),
    BlockSpec(5, 120, 40, True, "relu", 1),
    BlockSpec(5, 120, 40, True, "relu", 1),     # tap 2: stride 8
    BlockSpec(3, 240, 80, False, "hswish", 2),
    BlockSpec(3, 200, 80, False, "hswish", 1),
    BlockSpec(3, 184, 80, False, "hswish", 1),
    BlockSpec(3, 184, 80, False, "hswish", 1),
    BlockSpec(3, 480, 112, True, "hswish", 1),
    BlockSpec(3, 672, 112, True, "hswish", 1),  # tap 3: stride 16
    BlockSpec(5, 672, 160, True, "hswish", 2),
    BlockSpec(5, 960, 160, True, "hswish", 1),
    BlockSpec(5, 960, 160, True, "hswish", 1),  # tap 4: stride 32
)
TAP_AFTER = (3, 6, 12, 15)  # 1-based block indices whose outputs are returned


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    raise ValueError(f"unknown activation {name!r}; expected 'relu' or 'hswish'")


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                act: str | None = "relu") -> nn.Sequential:
    """kxk conv (no bias, 'same' padding) + BatchNorm + optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(_activation(act))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel gate: ``x * hardsigmoid(W2 relu(W1 avgpool(x)))`` with a hidden width of ``c/4``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = make_divisible(channels / reduction, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """One MobileNetV3 block; see the module docstring."""

    def __init__(self, cin: int, hidden: int, cout: int, kernel: int, stride: int, se: bool, act: str):
        super().__init__()
        self.use_residual = stride == 1 and cin == cout
        self.expand = conv_bn_act(cin, hidden, 1, act=act) if hidden != cin else nn.Identity()
        self.depthwise = conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = conv_bn_act(hidden, cout, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.use_residual else y


class MobileNetV3Large(nn.Module):
    """MobileNetV3-Large encoder returning the features after blocks 3, 6, 12 and 15.

    ``forward(x)`` with ``x`` of shape (N, 3, H, W) returns four tensors at strides 4, 8, 16 and 32,
    with ``self.out_channels`` channels (16, 24, 56, 80 at ``width_mult=0.5``).
    """

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        self.width_mult = width_mult
        stem_out = make_divisible(16 * width_mult)
        self.stem = conv_bn_act(3, stem_out, 3, stride=2, act="hswish")
        blocks, cin = [], stem_out
        for spec in LARGE_BLOCKS:
            hidden = make_divisible(spec.expand * width_mult)
            cout = make_divisible(spec.out * width_mult)
            blocks.append(InvertedResidual(cin, hidden, cout, spec.kernel, spec.stride, spec.se, spec.act))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = tuple(self.blocks[i - 1].project[0].out_channels for i in TAP_AFTER)
        self.strides = (4, 8, 16, 32)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for index, block in enumerate(self.blocks, start=1):
            x = block(x)
            if index in TAP_AFTER:
                feats.append(x)
        return feats


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
