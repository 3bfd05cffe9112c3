"""Synthetic views of an unlabeled pool: more images for a teacher to label when the pool is small.

A distilled student's one advantage over the same student trained on masks is that it can learn from any image
the teacher has seen. When the pool is small, new *images* can be made from it, and the teacher labels them like
any other (``sodkd label``); the student then matches the teacher's function on a wider set of inputs (the
"function matching" reading of distillation, Beyer et al., CVPR 2022). Masks cannot follow: whether a region is
salient depends on the whole image, so only a teacher can say what is salient in a composite.

Two kinds of view, both from real pixels only:

* ``zoom``: a crop covering ``U[zoom_area)`` of the image's area, aspect ratio log-uniform in ``aspect``: a new
  framing, where the object may be cut, larger, or absent.
* ``paste``: the object of image B cut out along a soft map of it (``alpha``: the teacher's own label of B, so
  no mask is needed) and blended onto image A at a random place and scale (its box covers ``U[paste_area)`` of
  A's area): a second object, with its own outline, on a foreign background. A rectangle pasted instead would
  teach the student that boxes are objects: the teacher labels a pasted rectangle as one.

Everything is drawn from a seeded ``numpy.random.Generator``: the same seed and sources give the same views.
Measured once (benchmarks/RESULTS.md, ``reference-runs-8``): 4,000 views beside an 8,475-image pool gave a better
ECSSD MAE and a worse DUTS-TR hold-out MAE than the pool alone, so the defaults are a starting point, not a tuned
recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

__all__ = ["ViewConfig", "zoom_view", "paste_view", "synthesize"]


@dataclass(frozen=True)
class ViewConfig:
    """How views are drawn. ``paste_p`` is the share of ``paste`` views (the rest are ``zoom``); ``alpha_cut``
    is where an object map starts to count as object (box) and where its matte starts (see :func:`paste_view`)."""

    zoom_area: tuple[float, float] = (0.25, 0.6)
    paste_area: tuple[float, float] = (0.15, 0.4)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    paste_p: float = 0.5
    alpha_cut: float = 0.3

    def __post_init__(self):
        for name in ("zoom_area", "paste_area"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name}: need 0 < low <= high <= 1, got {(lo, hi)}")
        if not 0.0 < self.aspect[0] <= 1.0 <= self.aspect[1]:
            raise ValueError(f"aspect: need low <= 1 <= high, got {self.aspect}")
        if not 0.0 <= self.alpha_cut < 0.5:
            raise ValueError(f"alpha_cut: need 0 <= alpha_cut < 0.5, got {self.alpha_cut}")
        if not 0.0 <= self.paste_p <= 1.0:
            raise ValueError(f"paste_p: a probability in [0, 1], got {self.paste_p}")


def _box(h: int, w: int, area: float, ratio: float) -> tuple[int, int]:
    """A (height, width) of about ``area * h * w`` pixels and width/height ``ratio``, clipped to the image."""
    bw = int(round(math.sqrt(area * h * w * ratio)))
    bh = int(round(math.sqrt(area * h * w / ratio)))
    return max(1, min(h, bh)), max(1, min(w, bw))


def _ratio(rng: np.random.Generator, aspect: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]))))


def zoom_view(img: np.ndarray, rng: np.random.Generator, cfg: ViewConfig = ViewConfig()) -> np.ndarray:
    """A random crop of ``img`` (``H x W x 3`` uint8) covering ``U[cfg.zoom_area)`` of its area."""
    h, w = img.shape[:2]
    bh, bw = _box(h, w, rng.uniform(*cfg.zoom_area), _ratio(rng, cfg.aspect))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    return np.ascontiguousarray(img[y:y + bh, x:x + bw])


def _unit(alpha: np.ndarray) -> np.ndarray:
    """A map as float32 in [0, 1] (uint8 maps are 0-255)."""
    alpha = np.asarray(alpha)
    return alpha.astype(np.float32) / 255.0 if alpha.dtype == np.uint8 else alpha.astype(np.float32)


def _object_box(alpha: np.ndarray, cut: float) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the pixels of ``alpha`` above ``cut``, or None when there are none."""
    ys, xs = np.nonzero(alpha > cut)
    if ys.size == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def paste_view(a: np.ndarray, b: np.ndarray, alpha: np.ndarray, rng: np.random.Generator,
               cfg: ViewConfig = ViewConfig()) -> np.ndarray:
    """``a`` with the object of ``b`` blended onto it: ``out = a (1 - m) + b m`` inside the pasted box.

    ``alpha`` (float in [0, 1], or uint8 0-255; resized to ``b`` if its size differs) marks ``b``'s object; its
    box (pixels above ``cfg.alpha_cut``) is scaled, aspect kept, to cover ``U[cfg.paste_area)`` of ``a``'s area
    (clipped to fit), and lands at a uniform position. The matte ``m`` is ``alpha`` stretched so that
    ``alpha_cut`` maps to 0 and ``1 - alpha_cut`` to 1: a soft map's faint halo does not carry ``b``'s background
    along.
    """
    alpha = _unit(alpha)
    if alpha.shape != b.shape[:2]:
        alpha = np.asarray(Image.fromarray(alpha).resize((b.shape[1], b.shape[0]), Image.BILINEAR))
    box = _object_box(alpha, cfg.alpha_cut)
    if box is None:
        raise ValueError(f"paste_view: alpha has no pixel above {cfg.alpha_cut} (no object to cut out)")
    y0, y1, x0, x1 = box
    h, w = a.shape[:2]
    s = math.sqrt(rng.uniform(*cfg.paste_area) * h * w / ((y1 - y0) * (x1 - x0)))
    s = min(s, h / (y1 - y0), w / (x1 - x0))
    bh, bw = max(1, min(h, round((y1 - y0) * s))), max(1, min(w, round((x1 - x0) * s)))
    obj = np.asarray(Image.fromarray(b[y0:y1, x0:x1]).resize((bw, bh), Image.BILINEAR), np.float32)
    m = np.asarray(Image.fromarray(alpha[y0:y1, x0:x1]).resize((bw, bh), Image.BILINEAR), np.float32)
    m = np.clip((m - cfg.alpha_cut) / (1.0 - 2.0 * cfg.alpha_cut), 0.0, 1.0)[..., None]
    yd, xd = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    out = a.copy()
    region = out[yd:yd + bh, xd:xd + bw].astype(np.float32)
    out[yd:yd + bh, xd:xd + bw] = np.clip(region * (1.0 - m) + obj * m + 0.5, 0, 255).astype(np.uint8)
    return out


def synthesize(n: int, count: int, load: Callable[[int], np.ndarray | None],
               load_alpha: Callable[[int], np.ndarray | None] | None = None, seed: int = 0,
               cfg: ViewConfig = ViewConfig(), tries: int = 20) -> Iterator[tuple[str, Sequence[int], np.ndarray]]:
    """``count`` views of a pool of ``n`` images; ``load(i)`` returns image ``i`` as ``H x W x 3`` uint8, or None
    when it cannot be read (it is then not drawn again by this view; the caller records why).

    ``load_alpha(j)`` gives image ``j``'s object map for ``paste`` views (e.g. its teacher label), or None when
    ``j`` has no usable object (it is then not drawn as B). Without ``load_alpha`` only ``zoom`` views are made.
    Each view redraws its sources up to ``tries`` times. Yields ``(kind, source indices, view)``; a paste's
    indices are (A, B), A != B.
    """
    paste_p = cfg.paste_p if load_alpha is not None else 0.0
    if n < 1 or (n < 2 and paste_p > 0):
        raise ValueError(f"synthesize: a pool of {n} image(s) is too small (paste views need two)")
    rng = np.random.default_rng(seed)
    for _ in range(count):
        kind = "paste" if rng.random() < paste_p else "zoom"
        for _ in range(tries):
            if kind == "paste":
                i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
                alpha = load_alpha(j)
                if alpha is None or _object_box(_unit(alpha), cfg.alpha_cut) is None:
                    continue
                a, b = load(i), load(j)
                if a is None or b is None:
                    continue
                yield kind, (i, j), paste_view(a, b, alpha, rng, cfg)
            else:
                i = int(rng.integers(0, n))
                a = load(i)
                if a is None:
                    continue
                yield kind, (i,), zoom_view(a, rng, cfg)
            break
        else:
            what = "a readable image with a usable object map" if kind == "paste" else "a readable image"
            raise ValueError(f"synthesize: no {what} in {tries} draws")
