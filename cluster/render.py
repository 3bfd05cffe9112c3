"""How a saliency map becomes the picture a user asked for: a mask, a cutout, an overlay or an alpha matte.

Shared by ``sodkd predict`` (files on disk) and ``sodkd serve`` (HTTP responses, :mod:`cluster.serve`), so both
write exactly the same pixels: :class:`Render` turns an RGB image and its (H, W) probability map into the output
image and encodes it (PNG, JPEG or lossless WebP). No Ray.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MODES", "FORMATS", "MEDIA_TYPES", "TINT", "TINT_OPACITY", "Render"]

MODES = ("mask", "cutout", "overlay", "alpha")
FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
TINT = np.array([255.0, 0.0, 0.0])      # overlay colour (RGB) ...
TINT_OPACITY = 0.5                      # ... and its opacity where the mask is 255


@dataclass(frozen=True)
class Render:
    """How a probability map becomes the output image: ``--mode``, ``--threshold``, ``--format``."""

    mode: str = "mask"
    threshold: float | None = None
    format: str = "png"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold: a probability in [0, 1], got {self.threshold}")
        if self.format not in FORMATS:
            raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.mode == "cutout" and self.format == "jpg":
            raise ValueError("--mode cutout: JPEG has no alpha channel; write png or webp")

    @property
    def suffix(self) -> str:
        return FORMATS[self.format]

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    def mask(self, prob: np.ndarray) -> np.ndarray:
        """(H, W) probabilities -> uint8 mask: ``round(255 p)``, or 0 / 255 at ``threshold``."""
        from cluster.predictor import to_uint8
        if self.threshold is None:
            return to_uint8(prob)
        return np.where(prob >= self.threshold, 255, 0).astype(np.uint8)

    def __call__(self, rgb: np.ndarray, prob: np.ndarray) -> np.ndarray:
        """The image of ``--mode`` for one input (uint8 H x W, H x W x 3 or H x W x 4)."""
        from cluster.predictor import to_uint8
        if self.mode == "alpha":
            return to_uint8(prob)
        m = self.mask(prob)
        if self.mode == "mask":
            return m
        if self.mode == "cutout":
            return np.dstack([rgb, m])
        a = (TINT_OPACITY / 255.0) * m[..., None].astype(np.float32)
        return (rgb.astype(np.float32) * (1.0 - a) + TINT * a).round().clip(0, 255).astype(np.uint8)

    def _save(self, image: np.ndarray, target) -> None:
        from PIL import Image

        img = Image.fromarray(image)
        if self.format == "jpg":
            img.save(target, "JPEG", quality=95)
        elif self.format == "webp":
            img.save(target, "WEBP", lossless=True)
        else:
            img.save(target, "PNG")

    def encode(self, image: np.ndarray) -> bytes:
        """The output image (from :meth:`__call__`) as the bytes of a file of :attr:`format`."""
        buf = io.BytesIO()
        self._save(image, buf)
        return buf.getvalue()

    def write(self, path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._save(image, path)
