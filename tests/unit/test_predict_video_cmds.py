"""``sodkd predict`` (image, folder, video file -> mask video) and ``sodkd eval-video`` on real DAVIS frames."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from kd.videoio import read_frames, video_info, write_video
from models import create_model, load_weights, save_weights

torch.set_num_threads(1)
SIZE = 64


def _calibrated(name: str, frames: list[np.ndarray]):
    """A model whose BatchNorm statistics come from real frames (so its maps are not flat)."""
    torch.manual_seed(0)
    model = create_model(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    x = torch.stack([model.normalize(np.asarray(Image.fromarray(f).resize((SIZE, SIZE))).transpose(2, 0, 1))
                     for f in frames])
    with torch.no_grad():
        model(x)
    if hasattr(model, "temporal"):
        with torch.no_grad():
            model.temporal.gamma.fill_(2.0)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("predict")
    src = shared_data / "davis2016-dev"
    data = root / "davis"
    for seq in ("blackswan", "car-shadow"):
        for kind, ext in (("images", "jpg"), ("masks", "png")):
            (data / seq / kind).mkdir(parents=True)
            for p in sorted((src / seq / kind).glob(f"*.{ext}"))[:4]:
                shutil.copy(p, data / seq / kind / p.name)
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((data / "blackswan" / "images").glob("*.jpg"))]
    image_w, video_w = root / "image.pt", root / "video.pt"
    save_weights(_calibrated("scfnet_m3", frames), image_w)
    save_weights(_calibrated("video_scfnet_m3", frames), video_w)
    clip = root / "blackswan.mp4"
    write_video(clip, frames, fps=10)
    return {"root": root, "data": data, "frames": frames, "image": image_w, "video": video_w, "clip": clip}


def test_predict_video_file_writes_a_mask_video_equal_to_streaming(setup, tmp_path, capsys):
    out = tmp_path / "masks.mkv"
    rc = main(["predict", "--weights", str(setup["video"]), "--input", str(setup["clip"]), "--output", str(out),
               "--size", str(SIZE), "--codec", "ffv1"])
    assert rc == 0
    assert "4 frames (streaming)" in capsys.readouterr().out
    masks = read_frames(out)
    assert len(masks) == 4 and masks[0].shape == (270, 480, 3)
    assert video_info(out).fps == 10.0
    # The lossless mask video holds exactly what streaming the decoded frames gives.
    from kd.video_eval import predict_frames

    expected = predict_frames(load_weights(setup["video"]), read_frames(setup["clip"]), size=SIZE)
    for m, e in zip(masks, expected):
        np.testing.assert_array_equal(m[..., 0], e)
    assert masks[0][..., 0].std() > 1     # not a flat map


def test_predict_image_and_folder(setup, tmp_path):
    one = setup["data"] / "blackswan" / "images" / "00000.jpg"
    assert main(["predict", "--weights", str(setup["image"]), "--input", str(one), "--output",
                 str(tmp_path / "single"), "--size", str(SIZE)]) == 0
    m = np.asarray(Image.open(tmp_path / "single" / "00000.png"))
    assert m.shape == (270, 480) and m.dtype == np.uint8
    assert main(["predict", "--weights", str(setup["video"]), "--input", str(setup["data"]), "--output",
                 str(tmp_path / "folder"), "--size", str(SIZE)]) == 0
    written = sorted(p.relative_to(tmp_path / "folder").as_posix() for p in (tmp_path / "folder").rglob("*.png"))
    assert len(written) == 16 and "car-shadow/masks/00003.png" in written
    assert "blackswan/images/00002.png" in written


def test_predict_errors_name_the_input(setup, tmp_path):
    assert main(["predict", "--weights", str(setup["image"]), "--input", str(tmp_path / "nope.mp4"),
                 "--output", str(tmp_path / "o.mp4")]) == 2
    assert main(["predict", "--weights", str(setup["image"]), "--input", str(setup["clip"]),
                 "--output", str(tmp_path / "o.png")]) == 2


def test_eval_video_compares_models_per_sequence(setup, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval-video", "--weights", str(setup["image"]), str(setup["video"]), "--data", str(setup["data"]),
               "--size", str(SIZE), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "blackswan" in text and "overall" in text and "flicker" in text
    res = json.loads(out.read_text())
    assert set(res) == {str(setup["image"]), str(setup["video"])}
    for r in res.values():
        assert set(r["sequences"]) == {"blackswan", "car-shadow"}
        assert r["overall"]["frames"] == 8
        for key in ("sm", "fm_max", "mae"):
            assert 0.0 <= r["overall"][key] <= 1.0
        assert r["sequences"]["blackswan"]["stable_pairs"] >= 1
    image_r, video_r = res[str(setup["image"])], res[str(setup["video"])]
    assert image_r["model"] == "scfnet_m3" and video_r["model"] == "video_scfnet_m3"
    assert image_r["overall"]["mae"] != video_r["overall"]["mae"]


def test_predict_model_spec_registered_and_exported_agree(setup, tmp_path):
    """``--model MODEL:WEIGHTS`` equals ``--weights``; an exported ONNX file gives the same maps."""
    from cluster.export import export_teacher

    one = setup["data"] / "blackswan" / "images" / "00001.jpg"
    assert main(["predict", "--model", f"scfnet_m3:{setup['image']}", "--input", str(one),
                 "--output", str(tmp_path / "spec"), "--size", str(SIZE)]) == 0
    assert main(["predict", "--weights", str(setup["image"]), "--input", str(one),
                 "--output", str(tmp_path / "w"), "--size", str(SIZE)]) == 0
    a = np.asarray(Image.open(tmp_path / "spec" / "00001.png")).astype(int)
    np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "w" / "00001.png")))
    ts = tmp_path / "m3.onnx"
    export_teacher(load_weights(setup["image"]), ts, "onnx", input_size=SIZE, onnx_exporter="torchscript")
    assert main(["predict", "--model", str(ts), "--input", str(one), "--output", str(tmp_path / "ts")]) == 0
    b = np.asarray(Image.open(tmp_path / "ts" / "00001.png")).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2 and a.std() > 1
    assert main(["predict", "--model", f"scfnet_r18:{setup['image']}", "--input", str(one),
                 "--output", str(tmp_path / "bad")]) == 2     # the file holds scfnet_m3
