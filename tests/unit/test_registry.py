"""The MLflow registry without pickle (cluster.registry): a real sqlite store in tmp_path, the ONNX flavour with
the card, and ``models:/NAME/VERSION`` / ``models:/NAME/latest`` accepted wherever a model spec is taken."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.predictor import Predictor
from cluster.registry import log_onnx_model, resolve
from cluster.export import export_teacher
from cluster.teachers import TeacherSpecError, build_teacher, parse_teacher_spec
from kd.card import load_card
from kd.imageio import decode_image
from models import create_model, save_weights

SIZE = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory, shared_data):
    """A sqlite MLflow store with ``tiny`` registered twice (v1, v2 = other weights) in the ONNX flavour."""
    import mlflow
    d = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("reg", artifact_location=str(d / "artifacts"))
    models, records = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model("scfnet_m3").train()
        with torch.no_grad():
            m(torch.randn(4, 3, SIZE, SIZE))
            m.heads[0].weight.mul_(40.0)          # maps that span (0, 1)
        m.input_size = SIZE
        m.eval()
        save_weights(m, d / f"w{seed}.pt")
        onnx_path = d / f"tiny{seed}.onnx"
        meta = export_teacher(m, onnx_path, "onnx", onnx_exporter="torchscript")
        with warnings.catch_warnings(record=True) as caught, mlflow.start_run(experiment_id=exp):
            warnings.simplefilter("always")
            handler = _Collect()
            logging.getLogger("mlflow").addHandler(handler)
            try:
                info = log_onnx_model(m, onnx_path, meta, registered_model_name="tiny",
                                      pip_requirements=["onnxruntime", "numpy"])
            finally:
                logging.getLogger("mlflow").removeHandler(handler)
        records.append([str(w.message) for w in caught] + handler.messages)
        models.append(m)
        assert str(info.registered_model_version) == str(seed + 1)
    images = [decode_image(p.read_bytes()) for p in sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:2]]
    yield {"uri": uri, "dir": d, "models": models, "records": records, "images": images}
    mlflow.set_tracking_uri(before)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_logging_warns_of_no_pickle_and_mlflow_loads_the_protobuf(store):
    import mlflow
    import onnxruntime as ort
    for msgs in store["records"]:
        assert not [m for m in msgs if "pickle" in m.lower()], msgs
    proto = mlflow.onnx.load_model("models:/tiny/1")         # the ONNX flavour: a protobuf, nothing unpickled
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = store["models"][0].predict(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], ref, atol=1e-4)


@pytest.mark.parametrize("version, seed", [("1", 0), ("latest", 1)])
def test_registry_uri_runs_through_the_predictor_like_eager(store, version, seed):
    pred = Predictor.load(f"models:/tiny/{version}")
    assert pred.backend == "onnx" and pred.size == SIZE and pred.describe()["source"] == f"models:/tiny/{version}"
    ref = Predictor.load(store["dir"] / f"w{seed}.pt", backend="eager", fold_bn=False).predict(store["images"])
    other = Predictor.load(store["dir"] / f"w{1 - seed}.pt", backend="eager").predict(store["images"])
    for m, r, o, im in zip(pred.predict(store["images"]), ref, other, store["images"]):
        assert m.shape == im.shape[:2]
        assert np.abs(m - r).max() < 1e-4
        assert np.abs(m - o).max() > 1e-2          # the version asked for, not the other one
    assert min(r.min() for r in ref) < 0.1 and max(r.max() for r in ref) > 0.9


def test_registry_uri_as_a_teacher_spec_with_its_card(store, tmp_path):
    assert parse_teacher_spec("models:/tiny/1").kind == "mlflow"
    local = resolve("models:/tiny/1", tmp_path)
    assert local.endswith(".onnx") and Path(local).is_relative_to(tmp_path)
    card = load_card(Path(local + ".card.yaml").read_bytes())       # the card logged with it, beside the file
    assert card.model == "scfnet_m3" and card.input.size == SIZE and "max_abs_diff" in card.notes
    t = build_teacher("models:/tiny/1", device="cpu")
    x = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE))) for im in store["images"]])
    eager = build_teacher(f"scfnet_m3:{store['dir'] / 'w0.pt'}", device="cpu", precision="fp32")
    assert np.abs(t.predict(x) - eager.predict(x)).max() < 1e-4


def test_pickled_and_missing_registry_models_are_refused(store):
    import mlflow
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("reg").experiment_id):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(store["models"][0], name="model", registered_model_name="pickled",
                                     serialization_format="pickle", pip_requirements=["torch"])
    with pytest.raises(TeacherSpecError, match="does not unpickle"):
        Predictor.load("models:/pickled/1")
    with pytest.raises(TeacherSpecError, match="cannot download it from the MLflow registry"):
        build_teacher("models:/nope/3", device="cpu")
    with pytest.raises(TeacherSpecError, match="expected models:/NAME/VERSION"):
        parse_teacher_spec("models:/")
