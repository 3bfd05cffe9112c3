"""kd.views: synthetic views are real pixels of their sources, sized and seeded as configured."""

from __future__ import annotations

import numpy as np
import pytest

from kd.views import ViewConfig, paste_view, synthesize, zoom_view


def coded(h: int, w: int, tag: int) -> np.ndarray:
    """An image whose pixels say where they came from: R = row, G = column, B = which image."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(h)[:, None]
    img[..., 1] = np.arange(w)[None, :]
    img[..., 2] = tag
    return img


def test_zoom_is_a_crop_of_the_configured_area():
    rng = np.random.default_rng(3)
    src = coded(200, 240, 7)
    cfg = ViewConfig(zoom_area=(0.3, 0.5))
    for _ in range(20):
        v = zoom_view(src, rng, cfg)
        h, w = v.shape[:2]
        assert 0.25 <= h * w / (200 * 240) <= 0.55       # rounding and clipping at the borders
        y0, x0 = int(v[0, 0, 0]), int(v[0, 0, 1])
        np.testing.assert_array_equal(v, src[y0:y0 + h, x0:x0 + w])


def disc(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    """A uint8 object map: a disc of radius r at (cy, cx)."""
    yy, xx = np.mgrid[:h, :w]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, 255, 0).astype(np.uint8)


def test_paste_blends_the_object_of_b_onto_a():
    rng = np.random.default_rng(5)
    a, b = coded(180, 220, 1), coded(150, 160, 2)
    alpha = disc(150, 160, 60, 90, 30)             # b's object: a disc, its box 61 x 61
    for _ in range(20):
        v = paste_view(a, b, alpha, rng, ViewConfig(paste_area=(0.1, 0.2)))
        assert v.shape == a.shape
        changed = np.any(v != a, axis=2)
        ys, xs = np.nonzero(changed)
        bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert abs(bh - bw) <= 2                       # the disc keeps its aspect
        assert 0.07 <= bh * bw / (180 * 220) <= 0.23   # its box covers the configured share of a
        # inside: b's object only (pure b at the centre); the disc's outside corners stay a
        cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
        assert v[cy, cx, 2] == 2
        assert 0.6 <= changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() <= 0.9   # pi / 4 of the box
        assert v[ys.min(), xs.min(), 2] == 1 and v[ys.max(), xs.max(), 2] == 1


def test_paste_of_a_soft_map_leaves_its_faint_halo_behind():
    a, b = np.zeros((100, 100, 3), np.uint8), np.full((100, 100, 3), 200, np.uint8)
    alpha = np.full((100, 100), 0.25, np.float32)    # a faint halo everywhere ...
    alpha[40:60, 40:60] = 1.0                         # ... around one clear object
    v = paste_view(a, b, alpha, np.random.default_rng(0), ViewConfig(paste_area=(0.2, 0.2), alpha_cut=0.3))
    assert (v > 0).any(axis=2).sum() == pytest.approx(0.2 * 100 * 100, rel=0.1)   # only the object's box
    assert v.max() == 200


def test_paste_without_an_object_is_an_error():
    with pytest.raises(ValueError, match="no object"):
        paste_view(coded(50, 50, 1), coded(50, 50, 2), np.zeros((50, 50), np.uint8), np.random.default_rng(0))


def test_synthesize_is_seeded_and_mixes_kinds():
    pool = [coded(100 + 10 * i, 120, i) for i in range(5)]
    alphas = [disc(100 + 10 * i, 120, 50, 60, 20) if i != 3 else None for i in range(5)]   # 3: no object
    a = list(synthesize(len(pool), 40, pool.__getitem__, alphas.__getitem__, seed=11))
    b = list(synthesize(len(pool), 40, pool.__getitem__, alphas.__getitem__, seed=11))
    c = list(synthesize(len(pool), 40, pool.__getitem__, alphas.__getitem__, seed=12))
    assert [(k, s) for k, s, _ in a] == [(k, s) for k, s, _ in b]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(a, b))
    assert [s for _, s, _ in a] != [s for _, s, _ in c]
    kinds = [k for k, _, _ in a]
    assert 10 <= kinds.count("paste") <= 30
    for kind, src, view in a:
        assert len(src) == (2 if kind == "paste" else 1)
        if kind == "paste":
            assert src[0] != src[1] and src[1] != 3
            assert view.shape == pool[src[0]].shape
        else:
            assert set(np.unique(view[..., 2])) == {src[0]}


def test_without_object_maps_only_zooms():
    pool = [coded(60, 60, i) for i in range(3)]
    assert {k for k, _, _ in synthesize(3, 20, pool.__getitem__, seed=1)} == {"zoom"}


@pytest.mark.parametrize("bad", [dict(zoom_area=(0.0, 0.5)), dict(paste_area=(0.5, 0.2)),
                                 dict(aspect=(1.2, 1.5)), dict(paste_p=1.5), dict(alpha_cut=0.5)])
def test_bad_config_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ViewConfig(**bad)


def test_a_pool_of_one_cannot_paste():
    with pytest.raises(ValueError, match="too small"):
        next(synthesize(1, 3, lambda i: coded(50, 50, 0), lambda i: disc(50, 50, 25, 25, 10)))
