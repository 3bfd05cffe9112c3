"""kd.augment: geometry stays aligned between image and maps, ranges, seeding, batching."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from kd.augment import (TRAIN_SIZES, AugmentConfig, Augmenter, multiscale_collate, postprocess,
                        preprocess)

MEAN = (124.55, 118.90, 102.94)
STD = (56.77, 55.97, 57.50)
GEOMETRY_ONLY = AugmentConfig(blur_p=0.0, color_p=0.0)


@pytest.fixture(scope="module")
def real_pair(shared_data):
    """One DUTS-TR image and its mask (uint8 HxWx3, HxW)."""
    stem = sorted(p.stem for p in (shared_data / "duts-tr" / "images").glob("*.jpg"))[0]
    image = np.asarray(Image.open(shared_data / "duts-tr" / "images" / f"{stem}.jpg").convert("RGB"))
    mask = np.asarray(Image.open(shared_data / "duts-tr" / "masks" / f"{stem}.png").convert("L"))
    assert image.shape[:2] == mask.shape
    return image, mask


def coded_sample(h=40, w=48):
    """An image whose red channel carries a per-pixel code, a uint8 mask with the same code, and a float map
    holding each pixel's unique index ``(y * w + x) / (h * w)``, so any misalignment shows."""
    yy, xx = np.mgrid[0:h, 0:w]
    code = ((yy * 7 + xx * 13) % 251).astype(np.uint8)
    image = np.stack([code, 255 - code, np.full_like(code, 9)], axis=-1)
    index = ((yy * w + xx) / (h * w)).astype(np.float32)
    return image, code.copy(), index


def test_crop_and_flips_move_image_and_every_map_together():
    h, w = 40, 48
    image, code, index = coded_sample(h, w)
    aug = Augmenter(GEOMETRY_ONLY)
    shapes, hflips, vflips = set(), 0, 0
    n = 60
    for seed in range(n):
        img2, code2, index2 = aug(np.random.default_rng(seed), image, code, index)
        src = np.rint(index2.astype(np.float64) * h * w).astype(int)
        ys, xs = src // w, src % w
        assert np.array_equal(code2, code[ys, xs]), f"seed {seed}: mask not moved like the index map"
        assert np.array_equal(img2[..., 0], code[ys, xs]), f"seed {seed}: image not moved like the maps"
        assert np.array_equal(img2, image[ys, xs]), f"seed {seed}: image pixels altered by geometry-only aug"
        assert code2.dtype == np.uint8 and index2.dtype == np.float32
        # the crop is at most 1/8 per side: 40 -> 30..40, 48 -> 36..48, and stays a contiguous window
        assert 30 <= img2.shape[0] <= 40 and 36 <= img2.shape[1] <= 48, img2.shape
        assert ys.min() <= 5 and ys.max() >= 34 and xs.min() <= 6 and xs.max() >= 41, (ys.min(), xs.min())
        hflips += int(xs[0, 0] > xs[0, -1])
        vflips += int(ys[0, 0] > ys[-1, 0])
        shapes.add(img2.shape)
    assert len(shapes) > 10, f"crop seems not to vary: {shapes}"
    assert 0 < vflips < hflips < n, (hflips, vflips)


def test_flip_and_blur_rates_follow_the_config():
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0] = 255  # a marked corner tells which flips happened
    aug = Augmenter(AugmentConfig(blur_p=0.0, color_p=0.0, crop_p=0.0))
    rng = np.random.default_rng(0)
    n, h, v = 2000, 0, 0
    for _ in range(n):
        (out,) = aug(rng, image)
        r, c = np.argwhere(out[..., 0] == 255)[0]
        h += int(c == 3)
        v += int(r == 3)
    assert abs(h / n - 0.5) < 0.04 and abs(v / n - 0.2) < 0.03, (h / n, v / n)

    blur_aug = Augmenter(AugmentConfig(color_p=0.0, crop_p=0.0, hflip_p=0.0, vflip_p=0.0))
    big = np.zeros((9, 9, 3), np.uint8)
    big[4, 4] = 255
    blurred = sum(int(blur_aug(rng, big)[0][4, 4, 0] < 255) for _ in range(n))
    assert abs(blurred / n - 0.1) < 0.025, blurred / n


def test_photometric_changes_touch_the_image_only_and_stay_in_range(real_pair):
    image, mask = real_pair
    aug = Augmenter(AugmentConfig(crop_p=0.0, hflip_p=0.0, vflip_p=0.0, blur_p=1.0))
    img2, mask2 = aug(np.random.default_rng(5), image, mask)
    assert img2.dtype == np.uint8 and img2.shape == image.shape
    assert not np.array_equal(img2, image), "blur + contrast + brightness left the image unchanged"
    assert np.array_equal(mask2, mask), "a photometric step altered the mask"

    # brightness only: the mean moves by at most 15 grey levels and does move for some seed
    bright = Augmenter(AugmentConfig(blur_p=0.0, contrast=(1.0, 1.0), crop_p=0.0, hflip_p=0.0, vflip_p=0.0))
    shifts = [bright(np.random.default_rng(s), image)[0].astype(float).mean() - image.mean() for s in range(20)]
    assert max(abs(x) for x in shifts) <= 15.5 and max(abs(x) for x in shifts) > 5, shifts

    # contrast 0.5 halves the spread about the mean
    low = Augmenter(AugmentConfig(blur_p=0.0, contrast=(0.5, 0.5), brightness=0.0, crop_p=0.0,
                                  hflip_p=0.0, vflip_p=0.0))
    std_ratio = low(np.random.default_rng(0), image)[0].astype(float).std() / image.astype(float).std()
    assert abs(std_ratio - 0.5) < 0.01, std_ratio


def test_same_seed_same_sample_other_seed_differs(real_pair):
    image, mask = real_pair
    aug = Augmenter()
    a = aug(np.random.default_rng(123), image, mask)
    b = aug(np.random.default_rng(123), image, mask)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    outs = [aug(np.random.default_rng(s), image, mask)[0] for s in range(5)]
    assert any(o.shape != outs[0].shape or not np.array_equal(o, outs[0]) for o in outs[1:])


def test_bad_inputs_are_named():
    image, mask, _ = coded_sample()
    aug = Augmenter()
    with pytest.raises(ValueError, match=r"map 1 must be an HxW array of the image's size \(40, 48\)"):
        aug(np.random.default_rng(0), image, mask, mask[:-1])
    with pytest.raises(ValueError, match="image must be a uint8 HxWx3 array"):
        aug(np.random.default_rng(0), image.astype(np.float32), mask)
    with pytest.raises(ValueError, match="hflip_p"):
        AugmentConfig(hflip_p=1.5)
    with pytest.raises(ValueError, match="crop_frac"):
        AugmentConfig(crop_frac=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        AugmentConfig().blur_p = 0.5  # type: ignore[misc]


def test_multiscale_collate_shapes_ranges_and_normalisation(real_pair):
    image, mask = real_pair
    aug = Augmenter()
    rng = np.random.default_rng(7)
    soft = mask.astype(np.float32) / 255.0 * 0.8
    samples = [aug(rng, image, mask, soft) for _ in range(3)]
    assert len({s[0].shape for s in samples}) > 1, "crops should give the samples different sizes"
    images, masks, softs = multiscale_collate(samples, rng=np.random.default_rng(1), mean=MEAN, std=STD)
    size = images.shape[-1]
    assert size in TRAIN_SIZES
    assert images.shape == (3, 3, size, size) and images.dtype == torch.float32
    assert masks.shape == (3, 1, size, size) and softs.shape == (3, 1, size, size)
    assert 0.0 <= masks.min() and masks.max() <= 1.0 and masks.max() > 0.99
    assert softs.max() <= 0.8 + 1e-6
    # an image that is the mean colour everywhere normalises to zero
    flat = np.broadcast_to(np.round(MEAN).astype(np.uint8), (10, 12, 3)).copy()
    (z,) = multiscale_collate([(flat,)], rng=np.random.default_rng(0), mean=np.round(MEAN), std=STD)
    assert z.abs().max().item() < 1e-6


def test_multiscale_collate_size_is_seeded_and_covers_the_choices():
    image, mask, _ = coded_sample()
    pick = [multiscale_collate([(image, mask)], rng=np.random.default_rng(s), mean=MEAN, std=STD)[0].shape[-1]
            for s in range(40)]
    again = [multiscale_collate([(image, mask)], rng=np.random.default_rng(s), mean=MEAN, std=STD)[0].shape[-1]
             for s in range(40)]
    assert pick == again
    assert set(pick) == set(TRAIN_SIZES), set(pick)
    with pytest.raises(ValueError, match="sample 1 has 0 maps, sample 0 has 1"):
        multiscale_collate([(image, mask), (image,)], rng=np.random.default_rng(0), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="0..1 units"):
        multiscale_collate([(image,)], rng=np.random.default_rng(0), mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match=r"sample 0 map 0: float map values must lie in \[0, 1\]"):
        multiscale_collate([(image, mask.astype(np.float32))], rng=np.random.default_rng(0), mean=MEAN, std=STD)


def test_preprocess_and_postprocess_round_trip(real_pair):
    image, mask = real_pair
    x = preprocess(image, mean=MEAN, std=STD)
    assert x.shape == (3, 352, 352) and x.dtype == torch.float32
    # the channel means of the normalised input match the image's, up to resampling
    expected = (image.reshape(-1, 3).astype(float).mean(0) - np.array(MEAN)) / np.array(STD)
    assert np.allclose(x.mean(dim=(1, 2)).numpy(), expected, atol=0.02), (x.mean(dim=(1, 2)), expected)
    prob = torch.from_numpy(np.array(Image.fromarray(mask).resize((352, 352), Image.BILINEAR))).float() / 255
    back = postprocess(prob[None, None], mask.shape)
    assert back.shape == mask.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - mask.astype(int)).mean() < 3.0


def test_augment_config_loads_from_plain_data_strictly():
    from kd.config import ConfigError, load_config

    cfg = load_config(AugmentConfig, {"hflip_p": 0.25, "contrast": [0.8, 1.2]}, ["vflip_p=0"])
    assert cfg == AugmentConfig(hflip_p=0.25, contrast=(0.8, 1.2), vflip_p=0.0)
    with pytest.raises(ConfigError, match="blur_prob: unknown key"):
        load_config(AugmentConfig, {"blur_prob": 0.1})


def test_augment_config_to_dict_builds_the_same_config_and_mild_has_no_vertical_flip():
    from cluster.training.sections import load_train_config
    from kd.augment import MILD
    cfg = load_train_config({"data": {"augment": MILD.to_dict(), "paired": [{"uri": "/nowhere"}]}})
    assert cfg.data.augment == MILD
    assert MILD.vflip_p == 0.0 and MILD.blur_p == 0.0 and MILD != AugmentConfig()
    assert AugmentConfig(**{**MILD.to_dict(), "contrast": tuple(MILD.contrast),
                            "blur_sigma": tuple(MILD.blur_sigma)}) == MILD
