"""SCFNet, the semantics-guided contextual fusion network of KD-SCFNet (Zhang et al., ECCV 2022).

Read top to bottom:

1. **Encoder** (``backbone``): MobileNetV3-Large x0.5 for the student, a ResNet for the teachers. It gives
   four features at strides 4, 8, 16, 32.
2. **Mapping** (``mapping``): one 3x3 conv + BN + ReLU per level to a common width ``c``; the top level
   then passes a 3x3 conv with dilation 5 (``context``) to widen its receptive field. Result:
   ``[f2, f3, f4, f5]``, all with ``c`` channels. :meth:`SCFNet.encode` stops here, so other decoders
   (the video student, an edge-preserving decoder) can reuse the encoder.
3. **Decoder**: three SCFM modules, top-down, each guided by the semantic feature ``f5``::

       d4 = SCFM(f4, f5, f5);  d3 = SCFM(f3, d4, f5);  d2 = SCFM(f2, d3, f5)

4. **Heads**: a 3x3 conv to one channel on ``d2, d3, d4, f5``, upsampled bilinearly to the input size.
   The outputs are logits, finest first; inference uses ``sigmoid(out2)``.

Variants registered at the bottom: ``scfnet_m3`` (the ~0.79 M-parameter student, c=16) and the
``scfnet_r18``/``scfnet_r34``/``scfnet_r50`` teachers (c=64; R50 is the paper's 26 M teacher).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SODModel
from .mobilenetv3 import TAP_AFTER, MobileNetV3Large
from .registry import config_with_overrides, register_model
from .resnet import RESNET_DEPTHS, ResNetEncoder

__all__ = ["SCFNet", "SCFNetConfig", "SCFM", "build_backbone", "widen_decoder", "slim", "BACKBONES"]

BACKBONES = ("mobilenetv3_large", *(f"resnet{d}" for d in sorted(RESNET_DEPTHS)))


@dataclass(frozen=True)
class SCFNetConfig:
    """Architecture of one SCFNet variant (every field is a constructor keyword of ``create_model``).

    Attributes:
        backbone: one of ``BACKBONES``.
        width_mult: MobileNetV3 width multiplier (must be 1.0 for ResNets).
        channels: the decoder width ``c`` (16 for the student, 64 for teachers).
        dilation: dilation of the extra 3x3 conv on the top-level feature.
    """

    backbone: str = "mobilenetv3_large"
    width_mult: float = 0.5
    channels: int = 16
    dilation: int = 5

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: unknown {self.backbone!r}; choose one of {list(BACKBONES)}")
        if not self.width_mult > 0:
            raise ValueError(f"width_mult: must be > 0, got {self.width_mult}")
        if self.backbone.startswith("resnet") and self.width_mult != 1.0:
            raise ValueError(f"width_mult: ResNet backbones have no width multiplier, got {self.width_mult}")
        if not (isinstance(self.channels, int) and self.channels > 0):
            raise ValueError(f"channels: must be a positive int, got {self.channels!r}")
        if not (isinstance(self.dilation, int) and self.dilation > 0):
            raise ValueError(f"dilation: must be a positive int, got {self.dilation!r}")


def build_backbone(config: SCFNetConfig) -> nn.Module:
    """The encoder named by ``config.backbone``; it exposes ``out_channels`` (4 ints)."""
    if config.backbone == "mobilenetv3_large":
        return MobileNetV3Large(width_mult=config.width_mult)
    return ResNetEncoder(depth=int(config.backbone.removeprefix("resnet")))


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias, 'same' padding for any dilation) + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def upsample_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to the spatial size of ``ref`` (a no-op when they already match)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class SCFM(nn.Module):
    """Semantics-guided contextual fusion module.

    With ``fl`` the lower (finer) feature, ``fh`` the higher (coarser) one and ``fd`` the deep semantic
    feature, all of width c, and ``up`` a bilinear resize to the size of the tensor it is combined with::

        fdh = cv1(fh + fh * up(fd))      # semantics re-weight the higher level
        fhl = cv2(fl + fl * up(fh))      # the higher level re-weights the lower level
        out = cv3(fhl + up(fdh))         # at the resolution of fl
    """

    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvBNReLU(channels, channels)
        self.cv2 = ConvBNReLU(channels, channels)
        self.cv3 = ConvBNReLU(channels, channels)

    def forward(self, fl: torch.Tensor, fh: torch.Tensor, fd: torch.Tensor) -> torch.Tensor:
        fdh = self.cv1(fh + fh * upsample_like(fd, fh))
        fhl = self.cv2(fl + fl * upsample_like(fh, fl))
        return self.cv3(fhl + upsample_like(fdh, fl))


class SCFNet(SODModel):
    """SCFNet: encoder -> mapping -> 3 SCFMs -> 4 heads (see the module docstring)."""

    def __init__(self, config: SCFNetConfig | None = None):
        super().__init__()
        config = config or SCFNetConfig()
        self.config = dataclasses.asdict(config)
        self.backbone = build_backbone(config)
        c = config.channels
        self.mapping = nn.ModuleList(ConvBNReLU(cin, c) for cin in self.backbone.out_channels)
        self.context = ConvBNReLU(c, c, dilation=config.dilation)
        self.scfm4, self.scfm3, self.scfm2 = SCFM(c), SCFM(c), SCFM(c)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 3, padding=1) for _ in range(4))
        self.channels = c
        self._init_decoder()

    def _init_decoder(self) -> None:
        for module in (self.mapping, self.context, self.scfm4, self.scfm3, self.scfm2, self.heads):
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (N, 3, H, W) -> mapped features ``[f2, f3, f4, f5]`` of width c
        at strides 4, 8, 16, 32 (``f5`` after the dilated context conv)."""
        feats = [m(f) for m, f in zip(self.mapping, self.backbone(x))]
        feats[3] = self.context(feats[3])
        return feats

    def decode(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[f2, f3, f4, f5]`` -> ``[d2, d3, d4, f5]``, the features the four heads read."""
        f2, f3, f4, f5 = feats
        d4 = self.scfm4(f4, f5, f5)
        d3 = self.scfm3(f3, d4, f5)
        d2 = self.scfm2(f2, d3, f5)
        return [d2, d3, d4, f5]

    def side_outputs(self, decoded: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        """One logit map per decoded feature, bilinearly resized to ``size`` (H, W)."""
        return [F.interpolate(head(d), size=size, mode="bilinear", align_corners=False)
                for head, d in zip(self.heads, decoded)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> four logit maps (N, 1, H, W): ``[out2, out3, out4, out5]``, finest first."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected input of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.side_outputs(self.decode(self.encode(x)), x.shape[-2:])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(out2)`` as :meth:`SODModel.predict`, without the three coarser heads and their upsampling
        (inference reads only the finest map; the exported graphs are traced from here). A subclass with its own
        ``forward`` (the video student) keeps the sigmoid of that forward's first output."""
        if type(self).forward is not SCFNet.forward:
            return super().predict(x)
        d2 = self.decode(self.encode(x))[0]
        return torch.sigmoid(F.interpolate(self.heads[0](d2), size=x.shape[-2:], mode="bilinear",
                                           align_corners=False))


def widen_decoder(model: SCFNet, channels: int, noise: float = 0.01, seed: int = 0) -> SCFNet:
    """A copy of ``model`` whose decoder width ``c`` is ``channels``, computing the same maps (Net2WiderNet).

    Every width-c tensor of the decoder (mapping, context, the SCFMs, the heads' inputs) shares one channel
    map ``g``: new channel ``j`` repeats old channel ``g(j) = j`` for ``j < c`` and ``(j - c) mod c`` above,
    so old channel ``i`` appears ``n(i)`` times. A conv's output rows and every BatchNorm entry are copied
    through ``g``; its input columns are copied and divided by ``n(g(j))``, so each layer's sum over the
    copies equals the old sum. The products and sums inside an SCFM act channel by channel, so they keep
    the map too; the encoder is copied as is. With ``noise = 0`` the widened model's outputs equal the old
    ones (up to rounding) in eval *and* train mode (a copy has its source's batch statistics).

    Copies of one channel would get equal gradients forever; ``noise`` (a fraction of each conv's weight
    std) is added to the rows of the new output channels to break that symmetry, at a small cost in the
    initial function.
    """
    c = model.channels
    if channels < c:
        raise ValueError(f"widen_decoder: channels must be >= the model's {c}, got {channels}")
    g = torch.tensor([j if j < c else (j - c) % c for j in range(channels)])
    n = torch.bincount(g, minlength=c).float()
    wide = type(model)(SCFNetConfig(**{**model.config, "channels": channels}))
    wide.name, wide.input_size = model.name, model.input_size
    gen = torch.Generator().manual_seed(seed)
    state = {}
    decoder = ("mapping.", "context.", "scfm4.", "scfm3.", "scfm2.", "heads.")
    for key, old in model.state_dict().items():
        new = old.clone()
        if key.startswith(decoder):
            if old.ndim == 4:                                       # conv weight (out, in, kh, kw)
                if not key.startswith("mapping."):                  # input columns in c-space
                    new = new[:, g] / n[g].view(1, -1, 1, 1)
                if not key.startswith("heads."):                    # output rows in c-space
                    new = new[g]
                    if noise > 0 and channels > c:
                        std = float(old.float().std())
                        new[c:] += noise * std * torch.randn(new[c:].shape, generator=gen).to(new.dtype)
            elif old.ndim == 1 and old.numel() == c and not key.startswith("heads."):
                new = new[g]                                        # BatchNorm weight/bias/running stats
        state[key] = new
    wide.load_state_dict(state)
    return wide


def _top(importance: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` largest entries, in their original order."""
    return importance.topk(k).indices.sort().values


def _take_conv(dst: nn.Conv2d, src: nn.Conv2d, rows: torch.Tensor, cols: torch.Tensor | None) -> None:
    """``dst``'s weight (and bias) := ``src``'s at output channels ``rows`` and input channels ``cols``
    (``None``: all, or a depthwise conv, whose input is its output channel)."""
    w = src.weight.detach()[rows]
    dst.weight.data.copy_(w if cols is None else w[:, cols])
    if dst.bias is not None:
        dst.bias.data.copy_(src.bias.detach()[rows])


def _take_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, rows: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).data.copy_(getattr(src, name).detach()[rows])


def _gamma(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight.detach().abs().float()


def slim(model: SCFNet, width_mult: float, channels: int) -> SCFNet:
    """A narrower copy of a MobileNetV3 ``model``: encoder at ``width_mult``, decoder width ``channels``,
    each layer keeping the source's most important channels (network slimming, Liu et al. 2017).

    A channel's importance is the magnitude of the BatchNorm scale that writes it: ``|gamma|`` of the stem and
    project BNs for the blocks' output stream (summed over every block that adds into one residual stream, so
    a stream keeps one set of channels end to end), of the depthwise BN for a block's hidden channels, the L1
    norm of the squeeze-excitation's first conv rows for its hidden units, and ``|gamma|`` summed over all
    decoder BNs for the decoder's shared width-c space (the SCFMs multiply and add width-c tensors channel by
    channel, so they must keep the same channels). Every kept weight is copied from the source; what the
    dropped channels contributed is lost, so the slim model computes a different (worse) map and needs
    fine-tuning (distillation) before use -- far less of it than a model of that size from random weights.
    Slimming to the source's own widths returns an exact copy. The result's config records the new widths,
    so its saved file fine-tunes as the slim model.
    """
    cfg = model.config
    if cfg["backbone"] != "mobilenetv3_large":
        raise ValueError(f"slim: only MobileNetV3 encoders can be slimmed, not {cfg['backbone']!r}")
    if channels > model.channels:
        raise ValueError(f"slim: channels must be <= the model's {model.channels}, got {channels}")
    out = type(model)(SCFNetConfig(**{**cfg, "width_mult": width_mult, "channels": channels}))
    out.name, out.input_size = model.name, model.input_size
    src, dst = model.backbone, out.backbone
    if any(d.use_residual != s.use_residual or isinstance(d.expand, nn.Identity) != isinstance(s.expand, nn.Identity)
           for s, d in zip(src.blocks, dst.blocks)):
        raise ValueError(f"slim: width_mult {width_mult} changes the encoder's topology (expand / residual) "
                         f"from {cfg['width_mult']}")
    for a, b in zip(src.modules(), dst.modules()):
        if isinstance(a, nn.Conv2d) and (b.out_channels > a.out_channels or b.in_channels > a.in_channels):
            raise ValueError(f"slim: width_mult {width_mult} is wider than the model's {cfg['width_mult']}")
    # the blocks' output streams: a residual block adds into its input's stream
    stream, importance = [0], [_gamma(src.stem[1])]
    for blk in src.blocks:
        if blk.use_residual:
            importance[stream[-1]] = importance[stream[-1]] + _gamma(blk.project[1])
            stream.append(stream[-1])
        else:
            importance.append(_gamma(blk.project[1]))
            stream.append(len(importance) - 1)
    widths = [dst.stem[0].out_channels] + [blk.project[0].out_channels for blk in dst.blocks]
    keep = {sid: _top(importance[sid], widths[i]) for i, sid in enumerate(stream)}
    _take_conv(dst.stem[0], src.stem[0], keep[stream[0]], None)
    _take_bn(dst.stem[1], src.stem[1], keep[stream[0]])
    taps = []
    for i, (s, d) in enumerate(zip(src.blocks, dst.blocks), start=1):
        cin, cout = keep[stream[i - 1]], keep[stream[i]]
        hidden = cin if isinstance(s.expand, nn.Identity) else _top(_gamma(s.depthwise[1]), d.depthwise[0].out_channels)
        if not isinstance(s.expand, nn.Identity):
            _take_conv(d.expand[0], s.expand[0], hidden, cin)
            _take_bn(d.expand[1], s.expand[1], hidden)
        _take_conv(d.depthwise[0], s.depthwise[0], hidden, None)
        _take_bn(d.depthwise[1], s.depthwise[1], hidden)
        if not isinstance(s.se, nn.Identity):
            se = _top(s.se.fc1.weight.detach()[:, hidden].abs().sum(dim=(1, 2, 3)).float(), d.se.fc1.out_channels)
            _take_conv(d.se.fc1, s.se.fc1, se, hidden)
            _take_conv(d.se.fc2, s.se.fc2, hidden, se)
        _take_conv(d.project[0], s.project[0], cout, hidden)
        _take_bn(d.project[1], s.project[1], cout)
        if i in TAP_AFTER:
            taps.append(cout)
    # the decoder: one shared selection of the width-c space
    bns = [m for part in (model.mapping, model.context, model.scfm4, model.scfm3, model.scfm2)
           for m in part.modules() if isinstance(m, nn.BatchNorm2d)]
    dec = _top(sum(_gamma(bn) for bn in bns), channels)
    for s, d, cols in zip(model.mapping, out.mapping, taps):
        _take_conv(d[0], s[0], dec, cols)
        _take_bn(d[1], s[1], dec)
    for part in ("context", "scfm4", "scfm3", "scfm2"):
        for s, d in zip(getattr(model, part).modules(), getattr(out, part).modules()):
            if isinstance(s, nn.Conv2d):
                _take_conv(d, s, dec, dec)
            elif isinstance(s, nn.BatchNorm2d):
                _take_bn(d, s, dec)
    for s, d in zip(model.heads, out.heads):
        _take_conv(d, s, torch.arange(1), dec)
    return out.train(model.training)


# --- registered variants -------------------------------------------------------------------------------

def _build(name: str, defaults: SCFNetConfig, overrides: dict) -> SCFNet:
    return SCFNet(config_with_overrides(defaults, overrides, name))


@register_model
def scfnet_m3(**kwargs) -> SCFNet:
    """Student: MobileNetV3-Large x0.5 encoder, c=16 (~0.79 M params, ~0.24 GMACs at 352)."""
    return _build("scfnet_m3", SCFNetConfig("mobilenetv3_large", 0.5, 16), kwargs)


@register_model
def scfnet_r18(**kwargs) -> SCFNet:
    """Light teacher: ResNet-18 encoder, c=64 (cheap enough to train on CPU)."""
    return _build("scfnet_r18", SCFNetConfig("resnet18", 1.0, 64), kwargs)


@register_model
def scfnet_r34(**kwargs) -> SCFNet:
    """Teacher: ResNet-34 encoder, c=64."""
    return _build("scfnet_r34", SCFNetConfig("resnet34", 1.0, 64), kwargs)


@register_model
def scfnet_r50(**kwargs) -> SCFNet:
    """Teacher of the paper: ResNet-50 encoder, c=64 (~26 M params)."""
    return _build("scfnet_r50", SCFNetConfig("resnet50", 1.0, 64), kwargs)
