"""ResNet-18/34/50 encoders for dense prediction (the SCFNet teacher backbones).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016). The stem (7x7/2 conv, BN, ReLU,
3x3/2 max-pool) is followed by four stages; ``forward`` returns the output of each stage, at strides
4, 8, 16 and 32 with 64/128/256/512 channels (basic blocks, R18/R34) or 256/512/1024/2048 channels
(bottlenecks, R50). The bottleneck puts its stride on the 3x3 conv (the "v1.5" layout most weights use).
No pooling head or classifier is built.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNetEncoder", "RESNET_DEPTHS"]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """Two 3x3 convs: ``relu(x' + bn(conv(relu(bn(conv(x))))))``, x' the (projected) shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(*_conv_bn(cin, width, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(width, cout, 3))
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.body(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand by 4, plus the (projected) shortcut, then ReLU."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(*_conv_bn(cin, width, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(width, cout, 1))
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.body(x))


# depth -> (block type, blocks per stage)
RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNetEncoder(nn.Module):
    """ResNet-``depth`` trunk; ``forward(x)`` -> [c2, c3, c4, c5] at strides 4, 8, 16, 32."""

    def __init__(self, depth: int = 50):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNET_DEPTHS)}")
        block, counts = RESNET_DEPTHS[depth]
        self.depth = depth
        self.stem = nn.Sequential(*_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        stages, cin = [], 64
        for index, (width, count) in enumerate(zip((64, 128, 256, 512), counts)):
            stride = 1 if index == 0 else 2
            layers = []
            for i in range(count):
                layers.append(block(cin, width, stride if i == 0 else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(w * block.expansion for w in (64, 128, 256, 512))
        self.strides = (4, 8, 16, 32)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each residual body so every block starts as the identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats
