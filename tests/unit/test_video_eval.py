"""kd/video_eval.py: temporal stability closed forms, per-sequence evaluation on real DAVIS masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from kd.video_eval import VideoEvaluator, gt_change_fraction, predict_frames, temporal_stability
from models import create_model

torch.set_num_threads(1)


def _masks(shared_data, seq: str, n: int) -> list[np.ndarray]:
    paths = sorted((shared_data / "davis2016-dev" / seq / "masks").glob("*.png"))[:n]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


def test_temporal_stability_closed_form():
    gt = np.zeros((10, 10), np.uint8)
    moved = gt.copy()
    moved[:5] = 255                          # 50% of the pixels change: this pair is not "stable"
    preds = [np.full((10, 10), v, np.uint8) for v in (0, 51, 102, 102)]
    gts = [gt, gt, moved, moved]
    flicker, pairs = temporal_stability(preds, gts)
    # stable pairs: (0,1) change 51/255 = 0.2, (2,3) change 0 -> mean 0.1
    assert pairs == 2 and flicker == pytest.approx(0.1)
    # One flipped pixel of 100 is exactly 1%: not below the threshold.
    one = gt.copy()
    one[0, 0] = 255
    assert gt_change_fraction(gt, one) == pytest.approx(0.01)
    assert temporal_stability(preds[:2], [gt, one]) [1] == 0
    assert math.isnan(temporal_stability(preds[:2], [gt, moved])[0])
    # Predictions of another size are resized to the mask.
    small = [np.full((5, 5), v, np.uint8) for v in (0, 255)]
    assert temporal_stability(small, [gt, gt]) == (pytest.approx(1.0), 1)


def test_evaluator_on_real_masks_per_sequence_and_overall(shared_data):
    ev = VideoEvaluator()
    a, b = _masks(shared_data, "blackswan", 6), _masks(shared_data, "car-shadow", 4)
    perfect = ev.add_sequence("blackswan", a, a)
    assert perfect["mae"] == pytest.approx(0.0, abs=1e-9) and perfect["sm"] > 0.99 and perfect["fm_max"] > 0.99
    # A prediction shifted by 20 pixels is worse, and its shift is the same in every frame.
    shifted = [np.roll(m, 20, axis=1) for m in b]
    worse = ev.add_sequence("car-shadow", shifted, b)
    assert worse["mae"] > 0.01 and worse["sm"] < perfect["sm"]
    res = ev.results()
    assert set(res["sequences"]) == {"blackswan", "car-shadow"}
    assert res["overall"]["frames"] == 10
    # overall pools frames (6 vs 4), sequence_mean weighs sequences equally.
    assert res["overall"]["mae"] == pytest.approx((6 * 0.0 + 4 * worse["mae"]) / 10, rel=1e-6)
    assert res["sequence_mean"]["mae"] == pytest.approx(worse["mae"] / 2, rel=1e-6)
    with pytest.raises(ValueError, match="already added"):
        ev.add_sequence("blackswan", a, a)
    with pytest.raises(ValueError, match="no sequence"):
        VideoEvaluator().results()


def test_predict_frames_streaming_equals_image_model_when_gates_are_closed(shared_data):
    torch.manual_seed(0)
    frames = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((shared_data / "davis2016-dev" / "dog" / "images").glob("*.jpg"))[0:60:25]]
    image = create_model("scfnet_m3")
    # BatchNorm statistics of the real frames (a random network's defaults give near-zero deep features).
    for m in image.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    image.train()
    with torch.no_grad():
        image(torch.stack([image.normalize(np.asarray(Image.fromarray(f).resize((96, 96))).transpose(2, 0, 1))
                           for f in frames]))
    video = create_model("video_scfnet_m3")
    video.init_from_image(image)
    a = predict_frames(image, frames, size=96)
    b = predict_frames(video, frames, size=96)
    assert len(a) == 3 and a[0].shape == frames[0].shape[:2] and a[0].dtype == np.uint8
    for x, y in zip(a, b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    # With the temporal gate open, a frame's map depends on the frames streamed before it: frame 0 (no
    # predecessor) is the same alone or in sequence, frame 2 is not.
    with torch.no_grad():
        video.temporal.gamma.fill_(5.0)
    c = predict_frames(video, frames, size=96)
    alone = [predict_frames(video, [f], size=96)[0] for f in (frames[0], frames[2])]
    assert np.array_equal(c[0], alone[0])
    assert np.abs(c[2].astype(int) - alone[1].astype(int)).max() > 1
