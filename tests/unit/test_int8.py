"""INT8 export (cluster.quantize, ``sodkd export --int8``): real ONNX Runtime static quantisation of a committed
KD student at a small size, calibrated on real ECSSD images from a folder or a real S3 endpoint (moto), scored
against fp32 eager on a small labelled set; refused when the MAE moves too much; run by the Predictor."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from cluster.predictor import Predictor
from cluster.quantize import calibration_inputs
from cluster.export import read_export_metadata
from jobs.cli import main
from jobs.export_cmd import export_int8
from kd.card import load_card
from kd.imageio import decode_image
from tests.conftest import copy_sample

REPO = Path(__file__).resolve().parents[2]
# the x0.5 / c = 48 KD file: at this test's 96 px and 4 calibration images the x1.0 reference student moves the MAE
# by +0.006, past the 0.005 limit (at its own 224 px and the default 64 images: +0.0009; RESULTS `int8-x1c24`)
SPEC = f"scfnet_m3:{REPO / 'weights' / 'kd-scfnet_m3-c48-from-csnet-L-x2.fp16.pt'}"
SIZE = 96
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, shared_data) -> Path:
    """Six ECSSD pairs (images/, masks/): the calibration and the evaluation set of these tests."""
    d = tmp_path_factory.mktemp("set")
    copy_sample(shared_data / "ecssd" / "images", d / "images", 6)
    copy_sample(shared_data / "ecssd" / "masks", d / "masks", 6)
    return d


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory, labelled):
    out = tmp_path_factory.mktemp("int8") / "m3.int8.onnx"
    rep = export_int8(SPEC, out, str(labelled), count=4, size=SIZE, eval_set=labelled, onnx_exporter="torchscript")
    return out, rep


def test_int8_export_keeps_the_mae_and_records_it(int8_file, labelled):
    out, rep = int8_file
    assert rep["precision"] == "int8" and rep["calibration_count"] == 4 and rep["eval_count"] == 6
    assert rep["calibration"] == str(labelled / "images")           # a labelled set's images, not its masks
    assert abs(rep["mae_change"]) <= 0.005 and not rep["refused_but_forced"]
    assert rep["mae_change"] != 0.0 and rep["max_map_diff_255"] > 0   # it is quantised: the maps moved a little
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops             # QDQ, the default layout
    meta = read_export_metadata(str(out))
    assert meta["precision"] == "int8" and meta["int8"]["calibration_count"] == 4 and meta["input_size"] == SIZE
    card = load_card(Path(rep["card"]).read_bytes())
    q = card.quantization
    assert q is not None and q.precision == "int8" and q.format == "qdq" and q.per_channel
    assert (q.calibration, q.calibration_count, q.eval_count) == (str(labelled / "images"), 4, 6)
    assert q.mae_change == pytest.approx(rep["mae_change"]) and q.mae == pytest.approx(rep["mae_int8"])
    assert not q.forced and "int8" in card.notes


def test_predictor_runs_the_int8_file_close_to_eager(int8_file, labelled):
    out, _ = int8_file
    pred = Predictor.load(out)
    assert pred.backend == "onnx" and pred.describe()["precision"] == "int8" and pred.size == SIZE
    images = [decode_image(p.read_bytes()) for p in sorted((labelled / "images").glob("*.jpg"))[:3]]
    ref = Predictor.load(SPEC, size=SIZE, backend="eager", fold_bn=False).predict(images)
    for m, r, im in zip(pred.predict(images), ref, images):
        assert m.shape == im.shape[:2]
        err = np.abs(m - r)
        assert err.mean() < 0.02 and err.max() > 1e-4, (err.mean(), err.max())   # close, and really INT8


def test_int8_is_refused_beyond_the_mae_limit_and_kept_with_force(tmp_path, labelled, capsys):
    dark = tmp_path / "dark"          # calibration on black frames: every real image saturates the input range
    dark.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 3 * i, np.uint8)).save(dark / f"{i}.png")
    out = tmp_path / "bad.onnx"
    common = ["export", "--model", SPEC, "--output", str(out), "--size", str(SIZE), "--int8", "--calibration",
              str(dark), "--calibration-count", "2", "--eval-set", str(labelled), "--onnx-exporter", "torchscript"]
    assert main(common) == 1
    err = capsys.readouterr().err
    assert "exceeds 0.005" in err and "not kept" in err
    assert not out.exists() and not Path(str(out) + ".card.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dark"]           # no temporary file left either
    assert main([*common, "--force"]) == 0
    report = json.loads(capsys.readouterr().out.split("\nint8 ok")[0])
    assert report["refused_but_forced"] and abs(report["mae_change"]) > 0.005
    card = load_card(Path(str(out) + ".card.yaml").read_bytes())
    assert card.quantization.forced and card.quantization.mae_change == pytest.approx(report["mae_change"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_calibration_images_from_an_s3_prefix_equal_the_local_ones(labelled, monkeypatch):
    from moto.server import ThreadedMotoServer

    from cluster.storage import S3Config, boto3_client
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3Config(endpoint_url=f"http://127.0.0.1:{port}")
        client = boto3_client(s3)
        client.create_bucket(Bucket="calib")
        for sub in ("images", "masks"):
            for p in sorted((labelled / sub).iterdir()):
                client.put_object(Bucket="calib", Key=f"set/{sub}/{p.name}", Body=p.read_bytes())
        remote = calibration_inputs("s3://calib/set", 3, SIZE, MEAN, STD, s3)
        local = calibration_inputs(str(labelled), 3, SIZE, MEAN, STD)
    finally:
        server.stop()
    assert remote.source == "s3://calib/set/images" and remote.keys == local.keys and len(remote.keys) == 3
    assert remote.inputs.shape == (3, 3, SIZE, SIZE) and remote.inputs.dtype == np.float32
    np.testing.assert_array_equal(remote.inputs, local.inputs)
    # spread over the sorted keys (first, middle, last of six), preprocessed as the predictor does it
    assert local.keys == [sorted(p.name for p in (labelled / "images").iterdir())[i] for i in (0, 2, 5)]
    rgb = decode_image((labelled / "images" / local.keys[0]).read_bytes())
    x0 = (np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.BILINEAR), np.float32) - MEAN) / STD
    np.testing.assert_allclose(local.inputs[0], x0.transpose(2, 0, 1), atol=1e-5)
