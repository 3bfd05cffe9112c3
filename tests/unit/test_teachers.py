"""Teacher specs, loading, export, and eager / TorchScript / ONNX parity (no Ray).

The teacher is a real ``scfnet_m3`` saved with ``save_weights``; its finest head is scaled up so the
probabilities span (0, 1) instead of sitting near 0.5 as a freshly initialised net's do -- otherwise a
parity test at 1/255 would pass for almost any pair of networks. Exports run at 64 px to stay quick.
"""

from __future__ import annotations

import warnings

import numpy as np

import pytest
import torch

from cluster import export
from cluster import teachers as T
from kd.config import ConfigError
from kd.imageio import decode_image, resize
from models import create_model, save_weights

SIZE = 64


@pytest.fixture(scope="module")
def real_images(shared_data) -> np.ndarray:
    paths = sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:4]
    return np.stack([resize(decode_image(p.read_bytes()), (SIZE, SIZE)) for p in paths])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("scfnet_m3").eval()
    with torch.no_grad():
        m.heads[0].weight.mul_(40.0)   # spread the probabilities over (0, 1)
    return m


def write_legacy_torchscript(model, path, size):
    """A ``.ts`` file as earlier sodkd releases wrote them (traced, BN folded, metadata as an extra file):
    sodkd itself no longer writes TorchScript, but must keep reading these."""
    import json
    from models.fuse import fold_batchnorm
    meta = {"format": T.EXPORT_FORMAT, "format_version": 1, "model": model.name,
            "config": json.loads(json.dumps(getattr(model, "config", {}))), "mean": [float(v) for v in model.mean],
            "std": [float(v) for v in model.std], "input_size": size, "dynamic_hw": False, "size_multiple": size,
            "bn_folded": True}
    head = export._ProbsHead(fold_batchnorm(model).float()).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(head, torch.zeros(2, 3, size, size), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={f"{T.METADATA_KEY}.json": json.dumps(meta)})


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("teachers")
    save_weights(model, d / "m3.pt")
    torch.save(model.state_dict(), d / "bare.pt")
    write_legacy_torchscript(model, d / "m3.ts", SIZE)
    export.export_teacher(model, d / "m3.onnx", "onnx", input_size=SIZE, extra_meta={"note": "unit test"})
    export.export_teacher(model, d / "m3_legacy.onnx", "onnx", input_size=SIZE, onnx_exporter="torchscript")
    return d


def test_parse_specs():
    s = T.parse_teacher_spec("scfnet_r50:/ckpt/teacher.pt")
    assert (s.kind, s.model, s.path) == ("registered", "scfnet_r50", "/ckpt/teacher.pt")
    s = T.parse_teacher_spec("scfnet_r18:s3://bucket/teachers/r18.pt")
    assert (s.kind, s.model, s.path) == ("registered", "scfnet_r18", "s3://bucket/teachers/r18.pt")
    assert T.parse_teacher_spec("s3://bucket/t.onnx").kind == "onnx"
    assert T.parse_teacher_spec("/x/t.ts").kind == "torchscript"
    assert T.parse_teacher_spec("t.TorchScript").kind == "torchscript"
    assert T.parse_teacher_spec("file:///x/t.onnx").kind == "onnx"


@pytest.mark.parametrize("spec, words", [
    ("", "empty"),
    ("weights.bin", "expected a sodkd weights file"),
    ("scfnet_r99:w.pt", "unknown model 'scfnet_r99'"),
    ("scfnet_r50:t.onnx", "give the file alone"),
])
def test_bad_specs_name_the_spec(spec, words):
    with pytest.raises(T.TeacherSpecError, match=words):
        T.parse_teacher_spec(spec)


def test_a_bare_weights_file_names_its_model(files, real_images):
    """``w.pt`` alone (as ``sodkd predict --weights`` takes it) is the model its header names; a bare state dict
    has no header and needs ``MODEL:``, which the error says."""
    s = T.parse_teacher_spec(str(files / "m3.pt"))
    assert (s.kind, s.model) == ("registered", None)
    bare, named = T.load_teacher(str(files / "m3.pt"), device="cpu"), T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}",
                                                                                     device="cpu")
    assert (bare.id, bare.weights_hash) == (named.id, named.weights_hash) == ("scfnet_m3", named.weights_hash)
    np.testing.assert_array_equal(bare.predict(real_images), named.predict(real_images))
    with pytest.raises(T.TeacherSpecError, match=r"give MODEL:.*bare\.pt"):
        T.load_teacher(str(files / "bare.pt"), device="cpu")
    T.load_teacher(f"scfnet_m3:{files / 'bare.pt'}", device="cpu")       # with the name it loads


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(T.TeacherSpecError, match="file not found"):
        T.load_teacher(f"scfnet_m3:{tmp_path / 'nope.pt'}")


def test_weights_of_another_model_are_refused(files):
    with pytest.raises(T.TeacherSpecError, match="scfnet_r18"):
        T.load_teacher(f"scfnet_r18:{files / 'm3.pt'}")


def test_export_metadata_round_trip(files, model):
    for name in ("m3.ts", "m3.onnx"):
        meta = export.read_export_metadata(str(files / name))
        assert meta["model"] == "scfnet_m3" and meta["input_size"] == SIZE
        assert meta["mean"] == list(model.mean) and meta["std"] == list(model.std)
        assert meta["config"] == model.config
    assert export.read_export_metadata(str(files / "m3.onnx"))["note"] == "unit test"


def test_teacher_declares_preprocessing_and_hash(files, model):
    t = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", input_size=SIZE)
    assert (t.id, t.input_size, t.mean, t.std) == ("scfnet_m3", SIZE, model.mean, model.std)
    assert t.weights_hash == T.weights_hash((files / "m3.pt").read_bytes())
    assert len(t.weights_hash) == 16
    ts = T.load_teacher(str(files / "m3.ts"))
    assert ts.id == "torchscript:scfnet_m3" and ts.input_size == SIZE
    assert ts.weights_hash == T.weights_hash((files / "m3.ts").read_bytes()) != t.weights_hash


def test_exported_size_is_fixed(files):
    with pytest.raises(T.TeacherSpecError, match="exported at input size 64"):
        T.load_teacher(str(files / "m3.onnx"), input_size=96)


def test_eager_matches_model_predict(files, model, real_images):
    t = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", input_size=SIZE)
    probs = t.predict(real_images)
    x = model.normalize(torch.from_numpy(real_images).permute(0, 3, 1, 2))
    with torch.no_grad():
        ref = model.predict(x)[:, 0].numpy()
    assert probs.shape == (len(real_images), SIZE, SIZE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    assert probs.min() < 0.1 and probs.max() > 0.9, "the parity tests need probabilities that span (0, 1)"
    bare = T.load_teacher(f"scfnet_m3:{files / 'bare.pt'}", input_size=SIZE)  # a bare state dict loads too
    np.testing.assert_allclose(bare.predict(real_images), probs, atol=1e-6)


@pytest.mark.parametrize("name", ["m3.ts", "m3.onnx", "m3_legacy.onnx"])
def test_torchscript_and_onnx_match_eager(files, real_images, name):
    eager = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", input_size=SIZE).predict(real_images)
    other = T.load_teacher(str(files / name)).predict(real_images)
    err = np.abs(other - eager).max()
    assert err < 1e-4, f"{name}: max |p - p_eager| = {err:.2e}"
    labels_eager = np.round(eager * 255).astype(np.int16)
    labels_other = np.round(other * 255).astype(np.int16)
    assert np.abs(labels_other - labels_eager).max() <= 1


def test_onnx_runs_on_cpu_provider_here(files):
    t = T.load_teacher(str(files / "m3.onnx"), threads=1)
    assert t.providers[-1] == "CPUExecutionProvider"
    assert t.id == "onnx:scfnet_m3"


def test_ensemble_is_the_mean_of_members(files, real_images):
    a = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", input_size=SIZE)
    torch.manual_seed(1)
    other = create_model("scfnet_m3")
    save_weights(other, files / "other.pt")
    b = T.load_teacher(f"scfnet_m3:{files / 'other.pt'}", input_size=SIZE)
    e = T.build_teacher([f"scfnet_m3:{files / 'm3.pt'}", f"scfnet_m3:{files / 'other.pt'}"], input_size=SIZE)
    assert isinstance(e, T.Ensemble)
    assert e.id == "ensemble(scfnet_m3,scfnet_m3)"
    assert e.weights_hash not in (a.weights_hash, b.weights_hash)
    np.testing.assert_allclose(e.predict(real_images), (a.predict(real_images) + b.predict(real_images)) / 2,
                               atol=1e-6)


def test_weighted_and_logit_ensembles(files, real_images):
    torch.manual_seed(2)
    save_weights(create_model("scfnet_m3"), files / "third.pt")
    specs = [f"scfnet_m3:{files / 'm3.pt'}", f"scfnet_m3:{files / 'third.pt'}"]
    a, b = (T.load_teacher(s, input_size=SIZE) for s in specs)
    pa, pb = a.predict(real_images), b.predict(real_images)
    mean = T.build_teacher(specs, input_size=SIZE)
    # a weighted probability mean: the weights are normalised
    w = T.build_teacher(specs, input_size=SIZE, ensemble=T.EnsembleConfig(weights=(3, 1)))
    np.testing.assert_allclose(w.predict(real_images), 0.75 * pa + 0.25 * pb, atol=1e-6)
    assert w.id == "ensemble[mean;0.75,0.25](scfnet_m3,scfnet_m3)" and w.weights_hash != mean.weights_hash
    # equal weights are the plain mean, under the plain mean's id and hash
    same = T.build_teacher(specs, input_size=SIZE, ensemble=T.EnsembleConfig(weights=(2, 2)))
    assert (same.id, same.weights_hash) == (mean.id, mean.weights_hash)
    # a second-round teacher: the weighted mean of the members' flip-averaged maps in logit space
    co = T.build_teacher(specs, tta="hflip", input_size=SIZE,
                         ensemble=T.EnsembleConfig(combine="logit", weights=(0.8, 0.2)))
    flipped = np.ascontiguousarray(real_images[:, :, ::-1])

    def flip_mean(t):
        return (t.predict(real_images) + t.predict(flipped)[:, :, ::-1]) / 2

    def logit(p):
        p = np.clip(p.astype(np.float64), 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    expected = 1 / (1 + np.exp(-(0.8 * logit(flip_mean(a)) + 0.2 * logit(flip_mean(b)))))
    got = co.predict(real_images)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, (flip_mean(a) + flip_mean(b)) / 2, atol=1e-3)   # not the probability mean
    assert co.id == "ensemble[logit;0.8,0.2](scfnet_m3,scfnet_m3)"
    assert co.describe()["ensemble"] == {"combine": "logit", "weights": [0.8, 0.2]}
    assert len(co.predict_views(real_images)[1]) == 4    # two members x two flips: the disagreement's views
    with pytest.raises(ConfigError, match=r"ensemble\.weights: 3 weight\(s\) for 2 teacher spec\(s\)"):
        T.build_teacher(specs, input_size=SIZE, ensemble=T.EnsembleConfig(weights=(1, 1, 1)))
    with pytest.raises(ConfigError, match=r"ensemble\.weights: need finite weights >= 0"):
        T.EnsembleConfig(weights=(1.0, float("nan")))


def test_ensemble_members_at_different_sizes(files, real_images):
    # a 96-px member resizes its input up and its output back to the ensemble's 64 px
    e = T.build_teacher([f"scfnet_m3:{files / 'm3.pt'}", str(files / "m3.ts")], input_size=SIZE)
    e.members[0] = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", input_size=96)
    p = e.predict(real_images)
    assert p.shape == (len(real_images), SIZE, SIZE)
    assert np.isfinite(p).all() and 0 <= p.min() and p.max() <= 1


def test_hflip_tta(files, real_images):
    plain = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", input_size=SIZE)
    tta = T.build_teacher(f"scfnet_m3:{files / 'm3.pt'}", tta="hflip", input_size=SIZE)
    assert isinstance(tta, T.HFlipTTA) and tta.id == plain.id and tta.weights_hash == plain.weights_hash
    p = plain.predict(real_images)
    p_flip = plain.predict(np.ascontiguousarray(real_images[:, :, ::-1]))[:, :, ::-1]
    np.testing.assert_allclose(tta.predict(real_images), (p + p_flip) / 2, atol=1e-5)
    # TTA output is mirror-symmetric in the sense t(flip x) = flip t(x)
    np.testing.assert_allclose(tta.predict(np.ascontiguousarray(real_images[:, :, ::-1])),
                               tta.predict(real_images)[:, :, ::-1], atol=1e-5)


def test_bad_input_is_refused(files):
    t = T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", input_size=SIZE)
    with pytest.raises(ValueError, match="expected uint8 images"):
        t.predict(np.zeros((1, SIZE, SIZE, 3), np.float32))


def test_fp16_needs_cuda(files):
    with pytest.raises(ValueError, match="CUDA"):
        T.load_teacher(f"scfnet_m3:{files / 'm3.pt'}", device="cpu", precision="fp16")


def test_file_without_metadata_is_refused(tmp_path, model):
    with warnings.catch_warnings():      # a legacy file, written here only to be read back
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(export._ProbsHead(model).eval(), torch.zeros(1, 3, SIZE, SIZE), check_trace=False)
        torch.jit.save(traced, tmp_path / "plain.ts")
    with pytest.raises(T.TeacherSpecError, match="no sodkd teacher metadata"):
        T.load_teacher(str(tmp_path / "plain.ts"))
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(T.TeacherSpecError, match="not a loadable ONNX model"):
        T.load_teacher(str(tmp_path / "junk.onnx"))
