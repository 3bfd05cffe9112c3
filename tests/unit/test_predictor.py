"""The inference engine (cluster.predictor), BatchNorm folding, export cards and ``sodkd predict``'s output modes.

The model is a real ``scfnet_m3`` whose finest head is scaled up so its probabilities span (0, 1) (a parity test
on maps near 0.5 would pass for almost any pair of networks); images are real ECSSD images of their own sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cluster import teachers as T
from cluster.predictor import Predictor
from jobs.cli import main
from jobs.export_cmd import export_with_parity
from kd.card import load_card
from kd.imageio import decode_image
from models import save_weights
from models.fuse import count_batchnorm, fold_batchnorm

SIZE = 64


@pytest.fixture(scope="module")
def model():
    from tests.conftest import spread_student
    return spread_student(SIZE)


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, shared_data):
    d = tmp_path_factory.mktemp("predictor")
    save_weights(model, d / "m3.pt")
    images = d / "images"
    images.mkdir()
    for p in sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    return d


@pytest.fixture(scope="module")
def images(files) -> list[np.ndarray]:
    return [decode_image(p.read_bytes()) for p in sorted((files / "images").glob("*.jpg"))]


def test_fold_batchnorm_keeps_the_function_and_removes_every_bn(model):
    folded = fold_batchnorm(model)
    assert count_batchnorm(model) > 50 and count_batchnorm(folded) == 0
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        err = (folded.predict(x) - model.predict(x)).abs().max().item()
    assert err < 1e-5, err
    assert count_batchnorm(model) > 50          # the original is untouched


@pytest.mark.parametrize("backend", ["eager", "onnx", "pt2"])
def test_each_backend_gives_the_eager_maps(files, images, model, backend):
    pred = Predictor.load(files / "m3.pt", backend=backend, onnx_exporter="torchscript")
    assert (pred.backend, pred.name, pred.size) == (backend, "scfnet_m3", SIZE)
    maps = pred.predict(images)
    ref = Predictor.load(files / "m3.pt", backend="eager", fold_bn=False).predict(images)
    for m, r, im in zip(maps, ref, images):
        assert m.shape == im.shape[:2] and m.dtype == np.float32
        assert np.abs(m - r).max() < 1e-4, f"{backend}: max |p - p_eager| = {np.abs(m - r).max():.2e}"
    assert min(r.min() for r in ref) < 0.1 and max(r.max() for r in ref) > 0.9   # maps that span (0, 1)


def test_auto_runs_weights_on_cpu_through_a_cached_onnx_export(files, images, monkeypatch, tmp_path):
    from cluster.predictor import export_cache_dir
    monkeypatch.setenv("SODKD_CACHE", str(tmp_path / "cache"))
    pred = Predictor.load(files / "m3.pt")                      # auto, CPU: the fastest measured backend
    assert pred.backend == "onnx" and pred.name == "scfnet_m3" and pred.size == SIZE
    cached = sorted(export_cache_dir().iterdir())
    assert [p.suffix for p in cached] == [".onnx"] and cached[0].name.startswith(f"scfnet_m3-{SIZE}-")
    stamp = cached[0].stat().st_mtime_ns
    ref = Predictor.load(files / "m3.pt", backend="eager", fold_bn=False).predict(images)
    again = Predictor.load(files / "m3.pt")                     # the second load reuses the export
    assert sorted(export_cache_dir().iterdir()) == cached and cached[0].stat().st_mtime_ns == stamp
    for a, b, r in zip(pred.predict(images), again.predict(images), ref):
        assert np.abs(a - r).max() < 1e-4 and np.array_equal(a, b)
    assert pred.teacher.weights_hash == again.teacher.weights_hash == T.weights_hash((files / "m3.pt").read_bytes())
    Predictor.load(files / "m3.pt", size=2 * SIZE)               # another size is another file
    assert len(list(export_cache_dir().iterdir())) == 2


def test_an_unwritable_export_cache_falls_back_to_a_temporary_export(files, images, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("SODKD_CACHE", str(blocker))
    pred = Predictor.load(files / "m3.pt", backend="onnx")
    ref = Predictor.load(files / "m3.pt", backend="eager").predict(images[:1])[0]
    assert pred.backend == "onnx" and np.abs(pred.predict(images[:1])[0] - ref).max() < 1e-4
    assert blocker.read_text() == "a file where the cache folder would go"


def test_eager_predictor_equals_model_predict_at_the_working_size(files, images, model):
    from kd.augment import postprocess, preprocess
    pred = Predictor.load(f"scfnet_m3:{files / 'm3.pt'}")
    x = preprocess(images[0], SIZE, mean=model.mean, std=model.std)[None]
    with torch.no_grad():
        ref = postprocess(model.predict(x), images[0].shape[:2]).astype(int)
    assert np.abs(pred.predict_uint8(images[:1])[0].astype(int) - ref).max() <= 1


def test_exported_files_run_in_their_own_backend(files, images):
    out = files / "m3.onnx"
    export_with_parity(f"scfnet_m3:{files / 'm3.pt'}", out, "onnx", images=files / "images",
                       onnx_exporter="torchscript")
    pred = Predictor.load(out)
    assert pred.backend == "onnx" and pred.teacher.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="runs in its own backend"):
        Predictor.load(out, backend="pt2")
    with pytest.raises(ValueError, match="only the eager backend on a CUDA device"):
        Predictor.load(files / "m3.pt", precision="bf16", device="cpu")


def test_export_card_is_written_and_read_back(files, images):
    out = files / "card.pt2"
    rep = export_with_parity(f"scfnet_m3:{files / 'm3.pt'}", out, None, images=files / "images")
    card = load_card((files / "card.pt2.card.yaml").read_bytes())
    assert rep["card"] == str(files / "card.pt2.card.yaml")
    assert card.model == "scfnet_m3" and card.input.size == SIZE and card.input.free and card.input.multiple == 32
    assert card.input.scale == "0-255" and card.output.kind == "probabilities" and "parity" in card.notes
    via_card = T.load_teacher(f"{out}?card={files / 'card.pt2.card.yaml'}", device="cpu")
    assert isinstance(via_card, T.CardTeacher)
    x = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE))) for im in images])
    np.testing.assert_allclose(via_card.predict(x), T.load_teacher(str(out), device="cpu").predict(x), atol=1e-5)
    # the card frees the size: the dynamic graph runs at 96 through it, close to eager at 96
    at96 = T.load_teacher(f"{out}?card={files / 'card.pt2.card.yaml'}", device="cpu", input_size=96)
    eager96 = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", device="cpu", input_size=96)
    x96 = np.stack([np.asarray(Image.fromarray(im).resize((96, 96))) for im in images])
    assert np.abs(at96.predict(x96) - eager96.predict(x96)).max() < 1e-4


def test_predict_modes_cutout_alpha_is_the_mask(files, tmp_path):
    src = files / "images"
    outs = {}
    for mode in ("mask", "cutout", "overlay", "alpha"):
        assert main(["predict", "--weights", str(files / "m3.pt"), "--input", str(src), "--output",
                     str(tmp_path / mode), "--mode", mode, "--batch", "2", "--no-progress"]) == 0
        outs[mode] = {p.stem: np.asarray(Image.open(p)) for p in (tmp_path / mode).glob("*.png")}
    assert len(outs["mask"]) == 3
    for stem, mask in outs["mask"].items():
        rgb = decode_image((src / f"{stem}.jpg").read_bytes())
        cut = outs["cutout"][stem]
        assert mask.shape == rgb.shape[:2] and cut.shape == (*rgb.shape[:2], 4)
        np.testing.assert_array_equal(cut[..., 3], mask)
        np.testing.assert_array_equal(cut[..., :3], rgb)
        np.testing.assert_array_equal(outs["alpha"][stem], mask)      # soft matte = the soft mask
        ov = outs["overlay"][stem].astype(int)
        hot, cold = mask > 200, mask <= 4        # tint opacity 0.5 * 4 / 255: under 3 levels
        assert hot.any() and cold.any()
        assert (ov[hot][:, 0] - rgb[hot][:, 0].astype(int)).mean() > 20      # tinted red where salient
        assert np.abs(ov[cold] - rgb[cold].astype(int)).max() <= 3          # unchanged where not


def test_predict_threshold_formats_and_batch_sizes_agree(files, tmp_path):
    src = files / "images"
    common = ["predict", "--weights", str(files / "m3.pt"), "--input", str(src), "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "b1"), "--batch", "1"]) == 0
    assert main([*common, "--output", str(tmp_path / "b3"), "--batch", "3", "--format", "webp"]) == 0
    assert main([*common, "--output", str(tmp_path / "t"), "--threshold", "0.5"]) == 0
    for p in (tmp_path / "b1").glob("*.png"):
        soft = np.asarray(Image.open(p)).astype(int)
        webp = np.asarray(Image.open(tmp_path / "b3" / f"{p.stem}.webp").convert("L")).astype(int)
        assert np.abs(soft - webp).max() <= 1                 # lossless WebP, batching does not change maps
        binary = np.asarray(Image.open(tmp_path / "t" / p.name))
        assert set(np.unique(binary)) <= {0, 255}
        sure = (soft <= 126) | (soft >= 129)          # round(255 p) at 127 / 128 may lie either side of p = 0.5
        np.testing.assert_array_equal((binary == 255)[sure], (soft >= 128)[sure])
        assert sure.mean() > 0.99
    one = next(src.glob("*.jpg"))
    assert main(["predict", "--weights", str(files / "m3.pt"), "--input", str(one), "--output",
                 str(tmp_path / "one.jpg"), "--mode", "cutout"]) == 2           # JPEG has no alpha
    assert main(["predict", "--weights", str(files / "m3.pt"), "--input", str(one), "--output",
                 str(tmp_path / "one.jpg")]) == 0
    assert Image.open(tmp_path / "one.jpg").format == "JPEG"


def test_unreadable_inputs_are_listed_skipped_and_fail_the_exit_code(files, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for p in (files / "images").glob("*.jpg"):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rc = main(["predict", "--weights", str(files / "m3.pt"), "--input", str(src), "--output", str(tmp_path / "o"),
               "--no-progress", "--backend", "onnx"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 input(s) could not be read" in err and "broken.jpg" in err
    assert sorted(p.stem for p in (tmp_path / "o").glob("*.png")) == sorted(p.stem for p in
                                                                           (files / "images").glob("*.jpg"))
