"""Training augmentation, multi-scale batching and test-time preprocessing (KD-SCFNet recipe).

The recipe (Zhang et al., ECCV 2022): Gaussian blur with p=0.1, contrast U[0.5, 1.5) and brightness +-15,
a random crop of up to 1/8 of each side, horizontal flip p=0.5, vertical flip p=0.2; each batch resized to
one size drawn from 224..352 (multi-scale training); at test time resize to 352.

Images are numpy ``uint8`` ``H x W x 3`` (RGB). Any number of aligned ``H x W`` maps (ground-truth mask,
teacher soft label, trust map ...) follow the image through every *geometric* step (crop, flips) and skip
the photometric ones (blur, contrast, brightness). All randomness comes from a ``numpy.random.Generator``
passed in by the caller, so a seed reproduces a sample exactly.

Normalisation uses the model's mean and std in pixel units (0..255), e.g. SCFNet's RGB mean
(124.55, 118.90, 102.94) and std (56.77, 55.97, 57.50).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

TRAIN_SIZES: tuple[int, ...] = (224, 256, 288, 320, 352)
TEST_SIZE = 352


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training augmentation; defaults are the paper's.

    ``blur_sigma`` is the Gaussian standard deviation range in pixels (the paper names only the
    probability; ours). Contrast scales about the image's own mean grey so that contrast and brightness stay
    independent: ``out = (img - m) * c + m + b``, ``c ~ U[contrast)``, ``b ~ U[-brightness, brightness)``,
    applied with probability ``color_p``. The crop removes ``U{0..floor(crop_frac * side)}`` pixels from each
    of the four sides independently, with probability ``crop_p``.
    """

    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    color_p: float = 1.0
    contrast: tuple[float, float] = (0.5, 1.5)
    brightness: float = 15.0
    crop_p: float = 1.0
    crop_frac: float = 0.125
    hflip_p: float = 0.5
    vflip_p: float = 0.2

    def to_dict(self) -> dict:
        """The config section (``data.augment``) that builds this config again."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def __post_init__(self):
        for name in ("blur_p", "color_p", "crop_p", "hflip_p", "vflip_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: probability must lie in [0, 1], got {v}")
        for name in ("blur_sigma", "contrast"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"{name}: expected 0 <= low <= high, got ({lo}, {hi})")
        if self.brightness < 0:
            raise ValueError(f"brightness: must be >= 0, got {self.brightness}")
        if not 0.0 <= self.crop_frac < 0.5:
            raise ValueError(f"crop_frac: must lie in [0, 0.5), got {self.crop_frac}")


# The reference runs' recipe (benchmarks/reference_runs.py) and the demo's fine-tuning: no blur, no vertical flip,
# milder photometric jitter than the paper's. A student fine-tuned under another augmentation than it was
# trained with first loses accuracy while its batch-norm statistics move to the new input distribution.
MILD = AugmentConfig(blur_p=0.0, contrast=(0.8, 1.2), brightness=10.0, crop_frac=0.1, hflip_p=0.5, vflip_p=0.0)


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 HxWx3 array, got {desc}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} is empty: {image.shape}")


class Augmenter:
    """``Augmenter(cfg)(rng, image, *maps) -> (image, *maps)``: one random augmentation of an aligned sample.

    Order: blur -> contrast/brightness (image only) -> crop -> h-flip -> v-flip (image and every map). The
    same random numbers are drawn on every call whatever fires, so a sample's draws do not depend on the
    outcome of earlier coin flips. Maps keep their dtype; the image stays uint8.
    """

    def __init__(self, cfg: AugmentConfig = AugmentConfig()):
        self.cfg = cfg

    def __call__(self, rng: np.random.Generator, image: np.ndarray, *maps: np.ndarray) -> tuple[np.ndarray, ...]:
        _check_image(image)
        h, w = image.shape[:2]
        for i, m in enumerate(maps):
            if not isinstance(m, np.ndarray) or m.shape != (h, w):
                shape = m.shape if isinstance(m, np.ndarray) else type(m).__name__
                raise ValueError(f"map {i} must be an HxW array of the image's size {(h, w)}, got {shape}")
        c = self.cfg
        u = rng.random(5)  # blur, color, crop, hflip, vflip coins
        sigma = rng.uniform(*c.blur_sigma)
        alpha = rng.uniform(*c.contrast)
        beta = rng.uniform(-c.brightness, c.brightness)
        max_dy, max_dx = int(h * c.crop_frac), int(w * c.crop_frac)
        top, bottom = rng.integers(0, max_dy + 1, size=2)
        left, right = rng.integers(0, max_dx + 1, size=2)

        out = image
        if u[0] < c.blur_p and sigma > 0:
            out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=float(sigma))))
        if u[1] < c.color_p:
            f = out.astype(np.float32)
            grey = f.mean()
            out = np.clip((f - grey) * alpha + grey + beta, 0, 255).round().astype(np.uint8)
        arrays = [out, *maps]
        if u[2] < c.crop_p:
            arrays = [a[top:h - bottom, left:w - right] for a in arrays]
        if u[3] < c.hflip_p:
            arrays = [a[:, ::-1] for a in arrays]
        if u[4] < c.vflip_p:
            arrays = [a[::-1] for a in arrays]
        return tuple(np.ascontiguousarray(a) for a in arrays)


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    if m.shape != (3,) or s.shape != (3,):
        raise ValueError(f"mean and std must have 3 values (RGB), got {list(m)} and {list(s)}")
    if (s <= 0).any():
        raise ValueError(f"std must be > 0, got {list(s)}")
    if m.max() <= 1.0 and s.max() <= 1.0:
        raise ValueError(f"mean {list(m)} / std {list(s)} look like 0..1 units; pass them in pixel units "
                         "(0..255), e.g. mean (124.55, 118.90, 102.94)")
    return m, s


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _map_to_unit(m: np.ndarray, name: str) -> np.ndarray:
    """uint8 (0..255), bool or float maps in [0, 1] -> float32 in [0, 1]."""
    if m.dtype == np.uint8:
        return m.astype(np.float32) / 255.0
    if m.dtype == np.bool_:
        return m.astype(np.float32)
    if np.issubdtype(m.dtype, np.floating):
        f = m.astype(np.float32)
        if f.size and (f.min() < 0.0 or f.max() > 1.0):
            raise ValueError(f"{name}: float map values must lie in [0, 1], got [{f.min()}, {f.max()}]")
        return f
    raise ValueError(f"{name}: map dtype must be uint8, bool or float, got {m.dtype}")


def _resize_map(m: np.ndarray, size: int) -> np.ndarray:
    if m.shape == (size, size):
        return m
    return np.asarray(Image.fromarray(m, mode="F").resize((size, size), Image.BILINEAR)).clip(0.0, 1.0)


def _normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW array ``(x - mean) / std``."""
    f = (image.astype(np.float32) - mean) / std
    return f.transpose(2, 0, 1)


def multiscale_collate(samples: Sequence[Sequence[np.ndarray]], *, rng: np.random.Generator,
                       mean: Sequence[float], std: Sequence[float],
                       sizes: Sequence[int] = TRAIN_SIZES) -> tuple[torch.Tensor, ...]:
    """Stack augmented samples into one batch at a single random size ``S`` drawn from ``sizes``.

    Args:
        samples: ``[(image, *maps), ...]``, image uint8 HxWx3, maps HxW (uint8 0..255, bool or float in
            [0, 1]); sizes may differ between samples (random crops), every sample has the same map count.
        rng: draws ``S``.
        mean, std: RGB normalisation in pixel units.
        sizes: candidate square sizes; multi-scale training uses 224..352.
    Returns:
        ``(images, *maps)``: images ``B x 3 x S x S`` float32 normalised; each map ``B x 1 x S x S`` float32
        in [0, 1]. Images and maps are resized bilinearly.
    """
    if len(samples) == 0:
        raise ValueError("samples is empty")
    if len(sizes) == 0 or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"sizes must be positive ints, got {list(sizes)}")
    m, s = _check_stats(mean, std)
    n_maps = len(samples[0]) - 1
    size = int(sizes[int(rng.integers(len(sizes)))])
    # filled in numpy and wrapped once: torch.stack of many large tensors is slow on busy small CPUs
    images = np.empty((len(samples), 3, size, size), np.float32)
    maps = np.empty((n_maps, len(samples), 1, size, size), np.float32)
    for i, sample in enumerate(samples):
        if len(sample) - 1 != n_maps:
            raise ValueError(f"sample {i} has {len(sample) - 1} maps, sample 0 has {n_maps}")
        image, *rest = sample
        _check_image(image, f"sample {i} image")
        images[i] = _normalize(_resize_image(image, size), m, s)
        for j, mp in enumerate(rest):
            if mp.shape != image.shape[:2]:
                raise ValueError(f"sample {i} map {j} has shape {mp.shape}, its image {image.shape[:2]}")
            maps[j, i, 0] = _resize_map(_map_to_unit(mp, f"sample {i} map {j}"), size)
    return (torch.from_numpy(images), *(torch.from_numpy(mp) for mp in maps))


def preprocess(image: np.ndarray, size: int = TEST_SIZE, *, mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """Test-time input: resize a uint8 HxWx3 image to ``size x size`` (bilinear) and normalise.

    Returns a float32 ``3 x size x size`` tensor; stack or ``[None]`` it for a batch.
    """
    _check_image(image)
    m, s = _check_stats(mean, std)
    return torch.from_numpy(np.ascontiguousarray(_normalize(_resize_image(image, int(size)), m, s)))


def postprocess(prob: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """Test-time output: a probability map (``H x W``, ``1 x H x W`` or ``1 x 1 x H x W``) resized bilinearly
    back to the original ``(height, width)`` and stored as uint8 0..255 (the form SOD metrics read)."""
    p = prob.detach().float().cpu()
    while p.dim() > 2:
        if p.shape[0] != 1:
            raise ValueError(f"prob must hold one map, got shape {tuple(prob.shape)}")
        p = p[0]
    if p.dim() != 2:
        raise ValueError(f"prob must be a 2-D map, got shape {tuple(prob.shape)}")
    h, w = int(size_hw[0]), int(size_hw[1])
    if tuple(p.shape) != (h, w):
        p = torch.nn.functional.interpolate(p[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return (p.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
