"""Teacher cards: validation, running files sodkd did not write, and the first-batch sanity check (no Ray).

The foreign files are a small real network exported by plain ``torch.onnx.export`` / ``torch.export`` with
no sodkd metadata and a preprocessing of their own (BGR, 0-255 values, their own mean/std, logits in the
second output); the public CSNet-L-x2 teacher of ``../shared/teachers`` is checked against a direct
onnxruntime run with its README's preprocessing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cluster import export
from cluster import teachers as T
from kd.card import CardCheckError, load_card
from kd.config import ConfigError
from kd.imageio import decode_image, resize

SIZE = 64
MEAN_BGR = (100.0, 110.0, 120.0)
STD_BGR = (50.0, 55.0, 60.0)


class Foreign(nn.Module):
    """A third-party-style model: BGR 0..255 input normalised inside-out, outputs (features, logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 3, padding=1)
        with torch.no_grad():
            self.head.weight.mul_(8.0)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return f.mean((2, 3)), self.head(f)


CARD = {
    "model": "foreign", "licence": "test-only",
    "input": {"size": SIZE, "free": True, "multiple": 8, "channels": "BGR", "scale": "0-255",
              "mean": list(MEAN_BGR), "std": list(STD_BGR)},
    "output": {"index": 1, "kind": "logits"},
}


def reference(images: np.ndarray) -> np.ndarray:
    """What the card says, done by hand: BGR, (x - mean) / std, run, sigmoid of output 1."""
    model = Foreign().eval()
    x = images[..., ::-1].astype(np.float32)
    x = (x - np.array(MEAN_BGR, np.float32)) / np.array(STD_BGR, np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))[1]
    return torch.sigmoid(y)[:, 0].numpy()


@pytest.fixture(scope="module")
def images(shared_data) -> np.ndarray:
    paths = sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:3]
    return np.stack([resize(decode_image(p.read_bytes()), (SIZE, SIZE)) for p in paths])


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign")
    model = Foreign().eval()
    x = torch.zeros(2, 3, SIZE, SIZE)
    torch.onnx.export(model, (x,), d / "f.onnx", input_names=["pixels"], output_names=["feat", "logits"],
                      dynamic_axes={"pixels": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("n")}})
    torch.export.save(ep, d / "f.pt2")
    return d


def write_card(path, card=CARD, **changes):
    data = yaml.safe_load(yaml.safe_dump(card))
    for dotted, value in changes.items():
        node = data
        *head, last = dotted.split("__")
        for h in head:
            node = node[h]
        node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


def test_card_validation_names_the_dotted_key(tmp_path):
    assert load_card(CARD).input.channels == "BGR"
    with pytest.raises(ConfigError, match=r"input\.colour: unknown key"):
        load_card({"input": {"colour": "RGB"}})
    with pytest.raises(ConfigError, match=r"output\.kind: expected one of"):
        load_card({"output": {"kind": "softmax"}})
    with pytest.raises(ConfigError, match=r"input\.size: expected int"):
        load_card({"input": {"size": "big"}})
    with pytest.raises(ConfigError, match=r"input\.mean"):
        load_card({"input": {"scale": "0-1", "mean": [120, 110, 100]}})
    bad = write_card(tmp_path / "bad.card.yaml", output__index="one")
    with pytest.raises(ConfigError, match=r"bad\.card\.yaml: output\.index: expected int"):
        load_card(bad.read_bytes(), where=str(bad))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_card_beside_the_file_runs_the_foreign_model_as_described(foreign, images, tmp_path, fmt):
    shutil.copy(foreign / f"f.{fmt}", tmp_path / f"f.{fmt}")
    write_card(tmp_path / f"f.{fmt}.card.yaml")
    t = T.load_teacher(str(tmp_path / f"f.{fmt}"), device="cpu", threads=1)
    assert t.input_size == SIZE and t.id.startswith(f"{'export' if fmt == 'pt2' else fmt}:foreign")
    np.testing.assert_allclose(t.predict(images), reference(images), atol=2e-5)


def test_card_named_in_the_spec_and_free_sizes(foreign, images, tmp_path):
    card = write_card(tmp_path / "my-card.yaml")
    t = T.load_teacher(f"{foreign / 'f.onnx'}?card={card}", device="cpu", input_size=96)
    assert t.input_size == 96
    with pytest.raises(T.TeacherSpecError, match="not a multiple of 8"):
        T.load_teacher(f"{foreign / 'f.onnx'}?card={card}", device="cpu", input_size=100)
    fixed = write_card(tmp_path / "fixed.yaml", input__free=False)
    with pytest.raises(T.TeacherSpecError, match="fixes the input at 64"):
        T.load_teacher(f"{foreign / 'f.onnx'}?card={fixed}", device="cpu", input_size=96)


def test_a_foreign_file_without_card_is_refused_with_what_to_write(foreign):
    with pytest.raises(T.TeacherSpecError, match=r"f\.onnx\.card\.yaml"):
        T.load_teacher(str(foreign / "f.onnx"), device="cpu")


@pytest.mark.parametrize("changes, words", [
    ({"output__index": 0}, "not N x C x H x W"),                       # the feature output
    ({"output__index": 3}, "output.index 3 does not exist"),
    ({"output__kind": "probabilities"}, "looks like logits"),
    ({"output__channel": 2}, "output.channel 2 does not exist"),
])
def test_first_batch_check_says_what_looks_wrong(foreign, images, tmp_path, changes, words):
    card = write_card(tmp_path / "c.yaml", **changes)
    t = T.load_teacher(f"{foreign / 'f.onnx'}?card={card}", device="cpu")
    with pytest.raises(CardCheckError, match=words):
        t.predict(images)


def test_constant_maps_are_caught(tmp_path, images):
    class Flat(nn.Module):
        def forward(self, x):
            return x[:, :1] * 0.0 + 3.0
    torch.onnx.export(Flat(), (torch.zeros(1, 3, SIZE, SIZE),), tmp_path / "flat.onnx", input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    card = write_card(tmp_path / "flat.onnx.card.yaml", output__index=0)
    t = T.load_teacher(str(tmp_path / "flat.onnx"), device="cpu")
    with pytest.raises(CardCheckError, match="one value"):
        t.predict(images)
    assert card.exists()


def test_probabilities_output_that_is_not_logits(tmp_path, images):
    class Probs(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x[:, :1] - x[:, 1:2])
    torch.onnx.export(Probs(), (torch.zeros(1, 3, SIZE, SIZE),), tmp_path / "p.onnx", input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    write_card(tmp_path / "p.onnx.card.yaml", output__index=0, output__kind="logits")
    with pytest.raises(CardCheckError, match="looks like probabilities"):
        T.load_teacher(str(tmp_path / "p.onnx"), device="cpu").predict(images)


def test_csnet_with_its_card_equals_a_direct_onnxruntime_run(shared_data, images):
    import onnxruntime as ort
    from PIL import Image
    onnx_path = shared_data.parent / "teachers" / "csnet-L-x2.onnx"
    card = Path(__file__).resolve().parents[2] / "jobs" / "cards" / "csnet-L.card.yaml"
    t = T.load_teacher(f"{onnx_path}?card={card}", device="cpu", threads=1)
    assert t.input_size == 224 and t.id == "onnx:csnet-L-x2"
    paths = sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:2]
    ims = np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BILINEAR)) for p in paths])
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = ((ims / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(0, 3, 1, 2).astype(np.float32)
    ref = 1.0 / (1.0 + np.exp(-s.run(None, {"image": x})[0][:, 0]))
    np.testing.assert_allclose(t.predict(ims), ref, atol=1e-5)


def test_csnet_card_with_a_wrong_value_scale_is_caught_on_the_first_batch(shared_data, images, tmp_path):
    card = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "cards" / "csnet-L.card.yaml").read_text())
    card["input"]["scale"] = "0-255"   # mean/std left in 0-1 units: what a hurried user writes
    wrong = write_card(tmp_path / "wrong.yaml", card)
    t = T.load_teacher(f"{shared_data.parent / 'teachers' / 'csnet-L-x2.onnx'}?card={wrong}", device="cpu")
    with pytest.raises(CardCheckError, match=r"saturated.*input\.scale"):
        t.predict(np.stack([resize(im, (224, 224)) for im in images]))


def test_sodkd_exported_files_keep_working_without_a_card(tmp_path):
    from models import create_model
    m = create_model("scfnet_m3").eval()
    export.export_teacher(m, tmp_path / "m3.onnx", "onnx", input_size=SIZE, onnx_exporter="torchscript")
    t = T.load_teacher(str(tmp_path / "m3.onnx"), device="cpu")
    assert isinstance(t, T.OnnxTeacher) and t.input_size == SIZE


def test_label_cli_attaches_cards_to_the_model_files_in_order():
    from jobs.label_cmd import with_cards
    teachers = ["scfnet_r18:w.pt", "a.onnx", "b.pt2"]
    assert with_cards(teachers, ["c.yaml"]) == ["scfnet_r18:w.pt", "a.onnx?card=c.yaml", "b.pt2?card=c.yaml"]
    assert with_cards(teachers, ["1.yaml", "2.yaml"]) == ["scfnet_r18:w.pt", "a.onnx?card=1.yaml",
                                                          "b.pt2?card=2.yaml"]
    with pytest.raises(SystemExit, match="3 --card for 2 model file"):
        with_cards(teachers, ["1", "2", "3"])
    assert T.parse_teacher_spec("a.onnx?card=c.yaml").card == "c.yaml"
    with pytest.raises(T.TeacherSpecError, match="describes a model file"):
        T.parse_teacher_spec("scfnet_m3:w.pt?card=c.yaml")
