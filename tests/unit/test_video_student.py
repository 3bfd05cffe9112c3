"""models/video_student.py: clip forward and streaming agree, the temporal window is K frames, no recurrence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models import count_params, create_model, list_models
from models.video_student import VideoSCFNet

torch.set_num_threads(1)

T, K, SIZE = 5, 2, 64


@pytest.fixture(scope="module")
def real_clip(shared_data) -> torch.Tensor:
    """Five consecutive real DAVIS frames (blackswan), 64x64, uint8 (1, T, 3, 64, 64)."""
    paths = sorted((shared_data / "davis2016-dev" / "blackswan" / "images").glob("*.jpg"))[:T]
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).unsqueeze(0).contiguous()


def _video_model(clip: torch.Tensor, seed: int = 0) -> VideoSCFNet:
    """A video student whose temporal and guidance gates are non-zero (at init they are 0 and hide bugs).

    BatchNorm statistics are those of the real clip itself (cumulative average), so eval-mode features have a
    realistic scale instead of the near-zero ones a random network gives with default running statistics.
    """
    torch.manual_seed(seed)
    model = create_model("video_scfnet_m3")
    with torch.no_grad():
        model.temporal.gamma.normal_(0, 1.0)
        model.temporal.offset_embed.normal_(0, 1.0)
        for g in (model.guide2, model.guide3, model.guide4):
            g.alpha.normal_(0, 1.0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(model.normalize(clip.flatten(0, 1)).unflatten(0, clip.shape[:2]))
    return model.eval()


def test_registered_with_config_and_small_overhead():
    assert "video_scfnet_m3" in list_models()
    model = create_model("video_scfnet_m3")
    assert model.config["memory_frames"] == 2 and model.config["channels"] == 16
    image = create_model("scfnet_m3")
    extra = count_params(model) - count_params(image)
    assert 0 < extra < 0.01 * count_params(image), extra
    with pytest.raises(ValueError, match="memory_frames"):
        create_model("video_scfnet_m3", memory_frames=-1)


def test_clip_forward_and_streaming_agree_on_every_frame(real_clip):
    model = _video_model(real_clip)
    x = model.normalize(real_clip.flatten(0, 1)).unflatten(0, (1, T))
    with torch.no_grad():
        clip_outs = model(x)
        assert [tuple(o.shape) for o in clip_outs] == [(1, T, 1, SIZE, SIZE)] * 4
        stream = model.streamer()
        for t in range(T):
            step_outs = stream.step(x[0, t])
            assert len(stream) == min(t + 1, K + 1)
            for i in range(4):
                torch.testing.assert_close(step_outs[i], clip_outs[i][:, t], rtol=1e-4, atol=1e-4,
                                           msg=f"frame {t}, output {i}")
        # The last frame, also through predict().
        stream.reset()
        for t in range(T):
            prob = stream.predict(x[0, t])
        torch.testing.assert_close(prob, torch.sigmoid(clip_outs[0][:, -1]), rtol=1e-4, atol=1e-4)


def test_temporal_window_is_k_frames_without_recurrence(real_clip):
    model = _video_model(real_clip)
    x = model.normalize(real_clip.flatten(0, 1)).unflatten(0, (1, T))
    with torch.no_grad():
        base = model(x)[0][:, -1]
        # Changing frame T-2 (inside the window of the last frame) changes the last frame's map ...
        near = x.clone()
        near[:, T - 2] = near[:, 0].flip(-1)
        assert (model(near)[0][:, -1] - base).abs().max() > 1e-3
        # ... changing frame T-1-K-1 (outside it) does not: no state is carried along the clip.
        far = x.clone()
        far[:, T - 1 - K - 1] = far[:, 0].flip(-1)
        torch.testing.assert_close(model(far)[0][:, -1], base)


def test_image_batch_is_a_one_frame_clip(real_clip):
    model = _video_model(real_clip)
    frames = model.normalize(real_clip[0, :2])
    with torch.no_grad():
        outs = model(frames)
        as_clips = model(frames.unsqueeze(1))
    assert [tuple(o.shape) for o in outs] == [(2, 1, SIZE, SIZE)] * 4
    for o, c in zip(outs, as_clips):
        torch.testing.assert_close(o, c[:, 0])
    torch.testing.assert_close(model.predict(frames), torch.sigmoid(outs[0]))


def test_initialised_from_the_image_student_it_starts_as_the_image_student(real_clip):
    torch.manual_seed(1)
    image = create_model("scfnet_m3").train()
    with torch.no_grad():
        image(torch.randn(4, 3, SIZE, SIZE))
    image.eval()
    video = create_model("video_scfnet_m3")
    missing = video.init_from_image(image.state_dict())
    assert missing and all(k.startswith(("temporal.", "guide")) for k in missing)
    video.eval()
    x = image.normalize(real_clip.flatten(0, 1))
    with torch.no_grad():
        expected = image(x)
        got = video(x.unflatten(0, (1, T)))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g[0], e, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="do not fit"):
        video.init_from_image(create_model("scfnet_r18").state_dict())


def test_features_and_gradients_reach_the_temporal_parts(real_clip):
    model = _video_model(real_clip).train()
    x = model.normalize(real_clip.flatten(0, 1)).unflatten(0, (1, T))
    outs, feats = model(x, return_features=True)
    assert feats["f5"].shape == feats["f5t"].shape == (1, T, 16, 2, 2)
    # Frame 0 only sees itself; later frames mix in their predecessors.
    assert not torch.allclose(feats["f5t"][:, 1:], feats["f5"][:, 1:])
    (outs[0].sigmoid().diff(dim=1).abs().mean() + outs[0].mean()).backward()
    for name in ("temporal.query.weight", "temporal.key.weight", "temporal.gamma", "temporal.offset_embed",
                 "guide2.alpha"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_inputs_name_the_shape():
    model = create_model("video_scfnet_m3").eval()
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        model(torch.zeros(1, 2, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.zeros(1, 2, 4, 32, 32))
    stream = model.streamer()
    with torch.no_grad():
        stream.step(torch.zeros(2, 3, 32, 32))
        with pytest.raises(ValueError, match="batch size changed"):
            stream.step(torch.zeros(1, 3, 32, 32))
