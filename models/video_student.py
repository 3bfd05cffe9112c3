"""The video student: SCFNet-M3 plus a saliency-guidance embedding and an inter-frame feature encoder.

After "Fast video salient object detection via spatiotemporal knowledge distillation" (Tang, Li, Zou,
arXiv 2010.10027). Only its abstract is public: a light per-frame network, no optical flow, no RNN, a
*saliency-guidance feature embedding* and an *inter-frame feature encoding*. Everything below that the abstract
does not state is our choice, marked "(ours)".

Read top to bottom, for the current frame ``t`` of a clip:

1. **Encoder** (shared with the image student, :meth:`SCFNet.encode`): ``[f2, f3, f4, f5]`` of width ``c`` at
   strides 4, 8, 16, 32. Every frame goes through the encoder exactly once.
2. **Inter-frame feature encoder** (:class:`InterFrameEncoder`, ours): light cross-frame attention at stride 32
   (11 x 11 positions at 352 x 352). Queries come from the current frame's ``f5``; keys and values from the
   ``f5`` of the current frame and of its ``K = memory_frames`` predecessors (causal, so streaming sees the same
   inputs as a clip)::

       q = Wq f5_t                     k_j = Wk f5_{t-j} + e_j     v_j = Wv f5_{t-j}      j = 0..min(K, t)
       a = softmax_{(j, p)}(q . k_j[p] / sqrt(d))                  (over all positions p of all frames j)
       f5'_t = f5_t + gamma * Wo(sum_{j,p} a_{j,p} v_j[p])

   ``e_j`` is a learned embedding of the frame offset ``j`` and ``gamma`` a per-channel gate, both initialised to
   0, so a video student initialised from image-student weights starts out computing exactly the image
   student's maps. The keys and values depend only on their own frame's *raw* ``f5`` (never on ``f5'``): there is
   no recurrence over the clip, and a streaming step re-uses the cached ``(k, v)`` of previous frames.
3. **Saliency-guidance feature embedding** (:class:`SaliencyGuidance`): the coarse saliency map ``g = sigmoid(
   head5(f5'_t))`` (the deepest side output, itself distilled) re-weights every fused decoder feature::

       d <- d * (1 + alpha * up(g))          alpha: per-channel, initialised to 0 (ours)

   applied to the outputs of the three SCFMs: ``d4 = G(SCFM(f4, f5', f5'))``, ``d3 = G(SCFM(f3, d4, f5'))``,
   ``d2 = G(SCFM(f2, d3, f5'))``.
4. **Heads**: as SCFNet, on ``[d2, d3, d4, f5']``, upsampled to the input size.

Output contract: the side outputs keep the input's leading dimensions. A clip ``(B, T, 3, H, W)`` gives four
logits of shape ``(B, T, 1, H, W)`` (finest first); a plain image batch ``(N, 3, H, W)`` is a clip with ``T = 1``
and gives four ``(N, 1, H, W)`` logits, exactly like an image model (so ``predict``, the registry tests and the
MAC counter work unchanged).

Streaming: ``stream = model.streamer(); outs = stream.step(frame)`` keeps the last ``K`` frames' keys and values;
each step costs one encoder pass plus the (small) attention. ``forward`` on a clip and stepping through it give the
same maps (up to float rounding) for every frame.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from .registry import config_with_overrides, register_model
from .scfnet import SCFNet, SCFNetConfig, upsample_like

__all__ = ["VideoSCFNet", "VideoSCFNetConfig", "InterFrameEncoder", "SaliencyGuidance", "VideoStreamer"]


@dataclass(frozen=True)
class VideoSCFNetConfig(SCFNetConfig):
    """Architecture of the video student (every field is a ``create_model`` keyword).

    Attributes (besides :class:`SCFNetConfig`'s):
        memory_frames: ``K``, how many previous frames the inter-frame encoder attends to (ours: 2).
        attn_dim: width ``d`` of queries and keys (ours: 16 = the student's ``c``).
        guidance: apply the saliency-guidance embedding (turn off for ablations).
    """

    memory_frames: int = 2
    attn_dim: int = 16
    guidance: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.memory_frames, int) and self.memory_frames >= 0):
            raise ValueError(f"memory_frames: must be an int >= 0, got {self.memory_frames!r}")
        if not (isinstance(self.attn_dim, int) and self.attn_dim > 0):
            raise ValueError(f"attn_dim: must be a positive int, got {self.attn_dim!r}")
        if not isinstance(self.guidance, bool):
            raise ValueError(f"guidance: must be a bool, got {self.guidance!r}")


class InterFrameEncoder(nn.Module):
    """Cross-frame attention of the current frame's stride-32 feature over its ``K`` predecessors'.

    ``memory(f5)`` turns one frame's raw feature ``(N, c, h, w)`` into its cached ``(k, v)``; ``forward(f5_t,
    mem)`` with ``mem = [(k_t, v_t), (k_{t-1}, v_{t-1}), ...]`` (current frame first) returns ``f5'_t``; see the
    module docstring for the formula.
    """

    def __init__(self, channels: int, attn_dim: int, memory_frames: int):
        super().__init__()
        self.memory_frames = memory_frames
        self.scale = 1.0 / math.sqrt(attn_dim)
        self.query = nn.Conv2d(channels, attn_dim, 1)
        self.key = nn.Conv2d(channels, attn_dim, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.offset_embed = nn.Parameter(torch.zeros(memory_frames + 1, attn_dim))
        self.gamma = nn.Parameter(torch.zeros(channels))

    def memory(self, f5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, c, h, w) -> keys (N, d, h*w) and values (N, c, h*w) of that frame (no offset yet)."""
        return self.key(f5).flatten(2), self.value(f5).flatten(2)

    def forward(self, f5: torch.Tensor, mem: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if not 1 <= len(mem) <= self.memory_frames + 1:
            raise ValueError(f"InterFrameEncoder: expected 1..{self.memory_frames + 1} memory frames, got {len(mem)}")
        n, c, h, w = f5.shape
        q = self.query(f5).flatten(2).transpose(1, 2)                                   # (N, hw, d)
        keys = torch.cat([k + self.offset_embed[j].view(1, -1, 1) for j, (k, _) in enumerate(mem)], dim=2)
        values = torch.cat([v for _, v in mem], dim=2)                                  # (N, c, M*hw)
        attn = torch.softmax(torch.bmm(q, keys) * self.scale, dim=-1)                   # (N, hw, M*hw)
        read = torch.bmm(values, attn.transpose(1, 2)).view(n, c, h, w)
        return f5 + self.gamma.view(1, -1, 1, 1) * self.out(read)


class SaliencyGuidance(nn.Module):
    """``d * (1 + alpha * up(g))``: a coarse saliency map ``g`` in [0, 1] re-weights a fused feature ``d``."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))

    def forward(self, d: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return d * (1.0 + self.alpha.view(1, -1, 1, 1) * upsample_like(guide, d))


class VideoSCFNet(SCFNet):
    """SCFNet encoder + inter-frame encoder + saliency guidance (see the module docstring).

    Parameter names of the image student are kept (``backbone``, ``mapping``, ``context``, ``scfm*``, ``heads``),
    so :meth:`init_from_image` loads an ``scfnet_m3`` state dict directly.
    """

    def __init__(self, config: VideoSCFNetConfig | None = None):
        config = config or VideoSCFNetConfig()
        super().__init__(config)
        self.config = dataclasses.asdict(config)
        c = config.channels
        self.memory_frames = config.memory_frames
        self.temporal = InterFrameEncoder(c, config.attn_dim, config.memory_frames)
        self.guide4 = SaliencyGuidance(c) if config.guidance else None
        self.guide3 = SaliencyGuidance(c) if config.guidance else None
        self.guide2 = SaliencyGuidance(c) if config.guidance else None

    # --- initialisation -----------------------------------------------------------------------------

    def init_from_image(self, state: dict[str, torch.Tensor] | SCFNet) -> list[str]:
        """Copy an image student's weights (a state dict or an ``SCFNet``) into the shared parts.

        Returns the names of this model's parameters that were not in ``state`` (the new temporal and
        guidance parts). Keys of ``state`` this model does not have, or with another shape, are an error.
        """
        if isinstance(state, nn.Module):
            state = state.state_dict()
        own = self.state_dict()
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"init_from_image: {len(bad)} keys do not fit {self.name!r}, e.g. {bad[:3]}")
        missing = self.load_state_dict(state, strict=False).missing_keys
        return list(missing)

    # --- the per-frame pieces -----------------------------------------------------------------------

    def _decode_frame(self, feats: list[torch.Tensor], f5t: torch.Tensor) -> list[torch.Tensor]:
        """``[f2, f3, f4, _]`` and the temporally encoded ``f5'`` -> ``[d2, d3, d4, f5']``."""
        f2, f3, f4, _ = feats
        guide = torch.sigmoid(self.heads[3](f5t)) if self.guide4 is not None else None

        def g(module: SaliencyGuidance | None, d: torch.Tensor) -> torch.Tensor:
            return d if module is None else module(d, guide)

        d4 = g(self.guide4, self.scfm4(f4, f5t, f5t))
        d3 = g(self.guide3, self.scfm3(f3, d4, f5t))
        d2 = g(self.guide2, self.scfm2(f2, d3, f5t))
        return [d2, d3, d4, f5t]

    def _check_frames(self, x: torch.Tensor, what: str) -> None:
        if x.shape[-3] != 3:
            raise ValueError(f"{self.name}: expected {what} with 3 channels, got {tuple(x.shape)}")

    # --- clips --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """A clip (B, T, 3, H, W) or an image batch (N, 3, H, W) -> four logit maps, finest first.

        Shapes of the outputs: (B, T, 1, H, W) for a clip, (N, 1, H, W) for an image batch (a clip of T = 1).
        Frame ``t`` attends to frames ``max(0, t-K) .. t`` of the same clip.

        With ``return_features`` also returns ``{"f5": raw stride-32 features, "f5t": after the inter-frame
        encoder}``, each with the input's leading dimensions and ``(c, H/32, W/32)`` after them; the temporal
        relation loss and the feature hint read ``f5t``.
        """
        if x.ndim == 4:
            self._check_frames(x, "an image batch (N, 3, H, W)")
            outs, feats = self._forward_clip(x.unsqueeze(1))
            outs = [o.squeeze(1) for o in outs]
            feats = {k: v.squeeze(1) for k, v in feats.items()}
        elif x.ndim == 5:
            self._check_frames(x, "a clip (B, T, 3, H, W)")
            outs, feats = self._forward_clip(x)
        else:
            raise ValueError(f"{self.name}: expected a clip (B, T, 3, H, W) or images (N, 3, H, W), "
                             f"got {tuple(x.shape)}")
        return (outs, feats) if return_features else outs

    def _forward_clip(self, clip: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        b, t, _, h, w = clip.shape
        feats = self.encode(clip.flatten(0, 1))                             # one encoder pass per frame
        per_frame = [f.unflatten(0, (b, t)) for f in feats]                 # (B, T, c, h_i, w_i)
        f5 = per_frame[3]
        k, v = self.temporal.memory(f5.flatten(0, 1))
        k, v = k.unflatten(0, (b, t)), v.unflatten(0, (b, t))
        f5t = torch.stack([
            self.temporal(f5[:, i], [(k[:, j], v[:, j]) for j in range(i, max(-1, i - self.memory_frames - 1), -1)])
            for i in range(t)], dim=1)
        decoded = self._decode_frame([f.flatten(0, 1) for f in per_frame], f5t.flatten(0, 1))
        outs = [o.unflatten(0, (b, t)) for o in self.side_outputs(decoded, (h, w))]
        return outs, {"f5": f5, "f5t": f5t}

    # --- streaming ----------------------------------------------------------------------------------

    def streamer(self) -> "VideoStreamer":
        """A fresh streaming state over this model (see :class:`VideoStreamer`)."""
        return VideoStreamer(self)


class VideoStreamer:
    """Frame-by-frame inference that keeps the last ``K`` frames' keys and values.

    ``step(frame)`` takes a normalised frame (3, H, W) or (B, 3, H, W) (B independent streams) and returns the
    four logit maps (B, 1, H, W) of that frame, identical to what ``forward`` gives for it as the last frame of a
    clip holding its predecessors. Call ``reset()`` at a cut. The model's mode is not changed: call
    ``model.eval()`` (and use ``torch.inference_mode()``) for inference.
    """

    def __init__(self, model: VideoSCFNet):
        self.model = model
        self._mem: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=model.memory_frames + 1)

    def __len__(self) -> int:
        return len(self._mem)

    def reset(self) -> None:
        self._mem.clear()

    def step(self, frame: torch.Tensor) -> list[torch.Tensor]:
        if frame.ndim == 3:
            frame = frame.unsqueeze(0)
        if frame.ndim != 4 or frame.shape[1] != 3:
            raise ValueError(f"step: expected a frame (3, H, W) or (B, 3, H, W), got {tuple(frame.shape)}")
        if self._mem and self._mem[0][0].shape[0] != frame.shape[0]:
            raise ValueError(f"step: batch size changed from {self._mem[0][0].shape[0]} to {frame.shape[0]}; "
                             "call reset() first")
        m = self.model
        feats = m.encode(frame)
        self._mem.appendleft(m.temporal.memory(feats[3]))
        f5t = m.temporal(feats[3], list(self._mem))
        return m.side_outputs(m._decode_frame(feats, f5t), frame.shape[-2:])

    def predict(self, frame: torch.Tensor) -> torch.Tensor:
        """Saliency probabilities (B, 1, H, W) of the frame: ``sigmoid`` of the finest output of :meth:`step`."""
        return torch.sigmoid(self.step(frame)[0])


# --- registered variants -------------------------------------------------------------------------------

@register_model
def video_scfnet_m3(**kwargs) -> VideoSCFNet:
    """Video student: scfnet_m3 + inter-frame attention (K=2, stride 32) + saliency guidance."""
    defaults = VideoSCFNetConfig("mobilenetv3_large", 0.5, 16, 5, memory_frames=2, attn_dim=16)
    return VideoSCFNet(config_with_overrides(defaults, kwargs, "video_scfnet_m3"))
