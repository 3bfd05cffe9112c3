"""Decoding images robustly into RGB uint8, with a reason when it cannot be done.

Real buckets hold CMYK JPEGs, 16-bit PNGs, palette and grayscale images, alpha channels, truncated files and
things that are not images at all. :func:`decode_image` converts every decodable kind to RGB uint8 and raises
:class:`ImageDecodeError` with a short machine-readable reason otherwise, so a pipeline can record the key
and the reason in a rejects table and go on.

Images are decoded as a viewer shows them: the EXIF orientation tag is applied (a portrait photo stored
sideways comes out upright, :func:`oriented_size` gives its displayed height and width), and an animated
GIF, PNG or WebP gives its first frame.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, ImageOps

MAX_PIXELS = 100_000_000   # larger images are decoded at reduced size via draft() or rejected
_ORIENTATION = 0x0112      # EXIF tag; values 5..8 swap width and height


class ImageDecodeError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (65535.0 if hi > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo + 1e-12) * 255.0).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (a no-op for orientation 1 or unreadable EXIF)."""
    if _orientation(img) == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unusable
        return img


def oriented_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the encoded image as displayed (EXIF orientation applied), from its header."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        return (w, h) if _orientation(img) >= 5 else (h, w)


def decode_image(data: bytes, max_side: int | None = None) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 RGB, upright (EXIF orientation applied), the first frame of an animation.
    ``max_side`` lets JPEG decode at reduced size (fast path)."""
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("too_large", str(e)) from e
    except Exception as e:
        raise ImageDecodeError("not_an_image", type(e).__name__) from e
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError("empty", f"size {w}x{h}")
    if max_side and img.format == "JPEG" and max(w, h) > 2 * max_side:
        img.draft("RGB", (max_side, max_side))
    elif w * h > MAX_PIXELS:
        raise ImageDecodeError("too_large", f"{w}x{h} pixels")
    try:
        img.load()
        rgb = _to_rgb(_upright(img))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncated" in str(e).lower() or "image file is" in str(e).lower() else "corrupt"
        raise ImageDecodeError(reason, str(e)) from e
    return np.asarray(rgb, dtype=np.uint8)


def decode_mask(data: bytes) -> np.ndarray:
    """Encoded mask -> HxW uint8 (RGB masks with equal channels read as grayscale)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise ImageDecodeError("corrupt", str(e)) from e
    return np.asarray(img.convert("L"), dtype=np.uint8)


def encode_png(gray: np.ndarray) -> bytes:
    """HxW uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def resize(arr: np.ndarray, size: tuple[int, int], resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize HxW or HxWx3 uint8 to ``size`` = (height, width)."""
    h, w = size
    if arr.shape[0] == h and arr.shape[1] == w:
        return arr
    return np.asarray(Image.fromarray(arr).resize((w, h), resample))
