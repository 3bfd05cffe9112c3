"""DEDecoder: an edge-preserving student for foundation-model pseudo labels (He et al., arXiv 2501.04582).

The third paper trains a small saliency network on pseudo masks made by BLIP -> GroundingDINO -> SAM. Its
student decoder restores resolution *step by step* with *dynamic upsampling* and keeps object edges sharp.
This file is our reading of that idea, built from public descriptions; read top to bottom:

1. **Encoder**: exactly the SCFNet student encoder of ``scfnet_m3`` (MobileNetV3-Large x0.5 -> one 3x3
   conv + BN + ReLU per level to width ``c`` -> dilated context conv on the top level). The attribute names
   (``backbone``, ``mapping``, ``context``) match :class:`models.scfnet.SCFNet`, so the encoder of a trained
   ``scfnet_m3`` loads into a DEDecoder with ``load_state_dict(..., strict=False)``.
2. **Dynamic upsampling** (:class:`DySample`, after Liu et al., "Learning to Upsample by Learning to
   Sample", ICCV 2023): every x2 step predicts, per output pixel, a 2-D offset from the bilinear sampling
   position and samples the coarse feature there with ``grid_sample``. With zero offsets it *is* bilinear
   upsampling; learned offsets move samples away from the other side of an edge, so an upsampled boundary
   stays sharp instead of being smeared over two coarse pixels.
3. **Decoder**, coarse to fine, every fusion a 3x3 conv + BN + ReLU at width ``c``::

       d5 = f5                                          # stride 32
       d4 = fuse4(DySample(d5) + f4 * (1 + up(d5)))     # stride 16
       d3 = fuse3(DySample(d4) + f3 * (1 + up(d4)))     # stride 8
       d2 = fuse2(DySample(d3) + f2 * (1 + up(d3)))     # stride 4

   where ``up(d)`` is the same DySample output squashed by a sigmoid gate (the coarser decision guides
   which finer encoder features pass, as SCFNet's fusion does).
4. **Edge branch** at stride 2: ``u1 = reduce(DySample(d2))`` (1x1 conv to ``c1`` channels);
   ``e = edge_conv(u1)`` and ``edge_logits = edge_head(e)``; the finest saliency feature is
   ``d1 = refine(u1 + e * sigmoid(edge_logits))``, so boundary pixels get the edge features added where
   the edge branch is confident. The edge branch is supervised with the boundary of the pseudo mask.
5. **Heads**: a 3x3 conv to one channel on ``d1, d2, d3, d4``, bilinearly resized to the input size.

``forward`` returns the four saliency logits finest first, like every sodkd model; ``forward_with_edge``
also returns the edge logits (input size) for training with an edge loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SODModel
from .registry import config_with_overrides, register_model
from .scfnet import ConvBNReLU, SCFNet, SCFNetConfig, build_backbone

__all__ = ["DEDecoder", "DEDecoderConfig", "DySample"]


class DySample(nn.Module):
    """Learned-offset upsampling by ``scale`` (point sampling with ``grid_sample``).

    For an input ``x`` (N, C, H, W) and output (N, C, sH, sW), every output pixel ``(i, j)`` first gets its
    bilinear source position in input-pixel coordinates, ``p0 = ((j + 0.5) / s - 0.5, (i + 0.5) / s - 0.5)``
    (the ``align_corners=False`` convention). A 1x1 conv on ``x`` predicts ``2 * g * s^2`` numbers per input
    pixel; pixel-shuffled, they are one offset ``o = (ox, oy)`` per output pixel and channel group ``g``.
    With the dynamic scope of DySample, ``o = 0.5 * sigmoid(scope(x)) * offset(x)``, so an offset never
    exceeds half an input pixel times the raw prediction; otherwise ``o = 0.25 * offset(x)``.
    The output is ``x`` sampled bilinearly at ``p0 + o`` (border padding), per group of ``C / g`` channels.

    The offset conv starts at zero, so a fresh DySample equals ``F.interpolate(x, scale_factor=s,
    mode="bilinear", align_corners=False)`` exactly; the offsets are learned from there.

    Args:
        channels: C, divisible by ``groups``.
        scale: integer upsampling factor (2 in DEDecoder).
        groups: channel groups sharing one offset field.
        dynamic_scope: use the learned, sigmoid-gated offset range instead of the fixed 0.25.
    """

    def __init__(self, channels: int, scale: int = 2, groups: int = 4, dynamic_scope: bool = True):
        super().__init__()
        if scale < 1:
            raise ValueError(f"DySample: scale must be >= 1, got {scale}")
        if groups < 1 or channels % groups:
            raise ValueError(f"DySample: channels ({channels}) must be divisible by groups ({groups})")
        self.scale, self.groups, self.dynamic_scope = scale, groups, dynamic_scope
        out = 2 * groups * scale * scale
        self.offset = nn.Conv2d(channels, out, 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.scope = nn.Conv2d(channels, out, 1) if dynamic_scope else None
        if self.scope is not None:
            nn.init.normal_(self.scope.weight, std=0.01)
            nn.init.zeros_(self.scope.bias)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Per-output-pixel offsets in input-pixel units, (N, g, 2, sH, sW) with (x, y) order."""
        n, _, h, w = x.shape
        s, g = self.scale, self.groups
        raw = self.offset(x)
        raw = raw * torch.sigmoid(self.scope(x)) * 0.5 if self.scope is not None else raw * 0.25
        # (N, 2*g*s*s, H, W) -> pixel shuffle -> (N, 2*g, sH, sW) -> (N, g, 2, sH, sW)
        return F.pixel_shuffle(raw, s).view(n, g, 2, s * h, s * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s, g = self.scale, self.groups
        oh, ow = s * h, s * w
        off = self.offsets(x)
        ys = (torch.arange(oh, device=x.device, dtype=x.dtype) + 0.5) / s - 0.5
        xs = (torch.arange(ow, device=x.device, dtype=x.dtype) + 0.5) / s - 0.5
        px = xs.view(1, 1, 1, ow) + off[:, :, 0]                    # (N, g, sH, sW), input-pixel units
        py = ys.view(1, 1, oh, 1) + off[:, :, 1]
        # pixel coordinate -> grid_sample's [-1, 1] (align_corners=False: -1 is the left edge of pixel 0)
        grid = torch.stack((2.0 * (px + 0.5) / w - 1.0, 2.0 * (py + 0.5) / h - 1.0), dim=-1)
        out = F.grid_sample(x.reshape(n * g, c // g, h, w), grid.reshape(n * g, oh, ow, 2),
                            mode="bilinear", padding_mode="border", align_corners=False)
        return out.view(n, c, oh, ow)


@dataclass(frozen=True)
class DEDecoderConfig:
    """Architecture of one DEDecoder variant (every field is a constructor keyword of ``create_model``).

    Attributes:
        backbone, width_mult, channels, dilation: the SCFNet encoder (see :class:`SCFNetConfig`).
        edge_channels: width ``c1`` of the stride-2 edge/refine stage (kept small: it runs on 1/4 of the
            input pixels).
        groups: DySample channel groups (must divide ``channels``).
        dynamic_scope: DySample's learned offset range.
    """

    backbone: str = "mobilenetv3_large"
    width_mult: float = 0.5
    channels: int = 16
    dilation: int = 5
    edge_channels: int = 8
    groups: int = 4
    dynamic_scope: bool = True

    def __post_init__(self) -> None:
        self.encoder_config()  # validates backbone/width_mult/channels/dilation with SCFNet's own rules
        if not (isinstance(self.edge_channels, int) and self.edge_channels > 0):
            raise ValueError(f"edge_channels: must be a positive int, got {self.edge_channels!r}")
        if not (isinstance(self.groups, int) and self.groups > 0) or self.channels % self.groups:
            raise ValueError(f"groups: must be a positive int dividing channels ({self.channels}), "
                             f"got {self.groups!r}")

    def encoder_config(self) -> SCFNetConfig:
        return SCFNetConfig(self.backbone, self.width_mult, self.channels, self.dilation)


class FusionStep(nn.Module):
    """One x2 decoder step: ``d = fuse(DySample(d_coarse) + f * (1 + sigmoid(DySample(d_coarse))))``."""

    def __init__(self, channels: int, groups: int, dynamic_scope: bool):
        super().__init__()
        self.up = DySample(channels, 2, groups, dynamic_scope)
        self.fuse = ConvBNReLU(channels, channels)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(coarse)
        if up.shape[-2:] != skip.shape[-2:]:  # odd input sizes: align to the encoder feature
            up = F.interpolate(up, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(up + skip * (1.0 + torch.sigmoid(up)))


class DEDecoder(SODModel):
    """SCFNet encoder + step-by-step DySample decoder + stride-2 edge branch (see the module docstring)."""

    has_edge_branch = True

    def __init__(self, config: DEDecoderConfig | None = None):
        super().__init__()
        config = config or DEDecoderConfig()
        self.config = dataclasses.asdict(config)
        c, c1 = config.channels, config.edge_channels
        self.backbone = build_backbone(config.encoder_config())
        self.mapping = nn.ModuleList(ConvBNReLU(cin, c) for cin in self.backbone.out_channels)
        self.context = ConvBNReLU(c, c, dilation=config.dilation)
        self.step4 = FusionStep(c, config.groups, config.dynamic_scope)
        self.step3 = FusionStep(c, config.groups, config.dynamic_scope)
        self.step2 = FusionStep(c, config.groups, config.dynamic_scope)
        self.up1 = DySample(c, 2, config.groups, config.dynamic_scope)
        self.reduce = nn.Sequential(nn.Conv2d(c, c1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        self.edge_conv = ConvBNReLU(c1, c1)
        self.edge_head = nn.Conv2d(c1, 1, 3, padding=1)
        self.refine = ConvBNReLU(c1, c1)
        self.heads = nn.ModuleList([nn.Conv2d(c1, 1, 3, padding=1)] +
                                   [nn.Conv2d(c, 1, 3, padding=1) for _ in range(3)])
        self.channels = c
        self._init_decoder()

    def _init_decoder(self) -> None:
        """He init for the decoder convs (as SCFNet); the encoder keeps its own init and every DySample
        keeps its zero offsets, so the untrained decoder upsamples bilinearly."""
        keep = {id(p) for m in self.modules() if isinstance(m, DySample) for p in m.parameters()}
        keep |= {id(p) for p in self.backbone.parameters()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m.weight) not in keep:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d) and id(m.weight) not in keep:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # The SCFNet encoder, unchanged: the same attributes, so SCFNet.encode runs on this module as well.
    encode = SCFNet.encode

    def decode(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``[f2, f3, f4, f5]`` -> (``[d1, d2, d3, d4]`` for the heads, stride-2 edge logits)."""
        f2, f3, f4, f5 = feats
        d4 = self.step4(f5, f4)
        d3 = self.step3(d4, f3)
        d2 = self.step2(d3, f2)
        u1 = self.reduce(self.up1(d2))
        e = self.edge_conv(u1)
        edge_logits = self.edge_head(e)
        d1 = self.refine(u1 + e * torch.sigmoid(edge_logits))
        return [d1, d2, d3, d4], edge_logits

    def forward_with_edge(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(N, 3, H, W) -> (four saliency logits (N, 1, H, W) finest first, edge logits (N, 1, H, W))."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected input of shape (N, 3, H, W), got {tuple(x.shape)}")
        size = x.shape[-2:]
        decoded, edge_logits = self.decode(self.encode(x))
        outs = [F.interpolate(head(d), size=size, mode="bilinear", align_corners=False)
                for head, d in zip(self.heads, decoded)]
        return outs, F.interpolate(edge_logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, with_edge: bool = False):
        """(N, 3, H, W) -> four logit maps (N, 1, H, W): ``[out1, out2, out3, out4]``, finest first.

        ``with_edge=True`` returns ``(outputs, edge_logits)`` as :meth:`forward_with_edge` does; training
        code calls it this way so a DDP wrapper's forward (and its gradient hooks) still runs.
        """
        outs, edge = self.forward_with_edge(x)
        return (outs, edge) if with_edge else outs


# --- registered variants -------------------------------------------------------------------------------

@register_model
def dedecoder_m3(**kwargs) -> DEDecoder:
    """Edge-preserving student: scfnet_m3 encoder + DySample decoder + edge branch (foundation-model KD)."""
    return DEDecoder(config_with_overrides(DEDecoderConfig(), kwargs, "dedecoder_m3"))

