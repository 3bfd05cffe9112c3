"""The labelling job's stages called directly, without Ray: load_images, TeacherLabeler,
write_label_shards, the shard readers, the config and the CLI wiring. Real images, a real saved teacher."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster import label as LB
from cluster import labels as L
from cluster import catalog, storage, tracking
from cluster.label import plan as label_plan
from cluster.label import stages as label_stages
from cluster.teachers import build_teacher, weights_hash
from kd import schema as S
from kd.config import ConfigError
from kd.imageio import decode_image, resize
from models import create_model, save_weights

SIZE = 64


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(0)
    m = create_model("scfnet_m3").eval()
    with torch.no_grad():
        m.heads[0].weight.mul_(40.0)  # probabilities that span (0, 1)
    path = tmp_path_factory.mktemp("teacher") / "m3.pt"
    save_weights(m, path)
    return path


@pytest.fixture(scope="module")
def other_teacher_file(tmp_path_factory):
    """A second, different teacher: an ensemble of the two disagrees."""
    torch.manual_seed(1)
    m = create_model("scfnet_m3").eval()
    with torch.no_grad():
        m.heads[0].weight.mul_(40.0)
    path = tmp_path_factory.mktemp("teacher2") / "m3b.pt"
    save_weights(m, path)
    return path


@pytest.fixture
def image_dir(tmp_path, shared_data):
    d = tmp_path / "in"
    d.mkdir()
    for p in sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:3]:
        shutil.copy(p, d / p.name)
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.png").write_bytes(b"not an image at all\n" * 4)
    real = sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[3].read_bytes()
    (d / "half.jpg").write_bytes(real[: len(real) // 2])
    return d


def _manifest_batch(keys):
    return {S.ID: np.array([S.stable_id(k) for k in keys], dtype=object), S.KEY: np.array(keys, dtype=object),
            S.SEQUENCE: np.array([""] * len(keys), dtype=object), S.FRAME: np.full(len(keys), -1, np.int32)}


def test_load_images_decodes_and_rejects(image_dir):
    keys = sorted(p.name for p in image_dir.iterdir()) + ["missing.jpg"]
    out = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    reasons = dict(zip(out[S.KEY], out[S.REASON]))
    assert reasons["empty.jpg"] == "empty"
    assert reasons["notes.png"] == "not_an_image"
    assert reasons["half.jpg"] == "truncated"
    assert reasons["missing.jpg"] == "read_error"
    assert out[S.IMAGE].shape == (len(keys), SIZE, SIZE, 3) and out[S.IMAGE].dtype == np.uint8
    for i, k in enumerate(keys):
        if reasons[k] == "":
            with Image.open(image_dir / k) as im:
                assert (out[S.ORIG_H][i], out[S.ORIG_W][i]) == (im.height, im.width)
            expected = resize(decode_image((image_dir / k).read_bytes(), max_side=SIZE), (SIZE, SIZE))
            np.testing.assert_array_equal(out[S.IMAGE][i], expected)
        else:
            assert out[S.DETAIL][i] != ""
            assert not out[S.IMAGE][i].any()
    assert sum(r == "" for r in reasons.values()) == 3


def test_teacher_labeler_called_directly(image_dir, teacher_file):
    keys = sorted(p.name for p in image_dir.iterdir())
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    spec = f"scfnet_m3:{teacher_file}"
    labeler = LB.TeacherLabeler([spec], teacher_size=SIZE, device="cpu", threads=1, backend="eager")
    out = labeler(batch)
    assert S.IMAGE not in out
    ok = out[S.REASON] == ""
    assert ok.sum() == 3
    probs = build_teacher(spec, input_size=SIZE, device="cpu").predict(batch[S.IMAGE][ok])
    assert probs.min() < 0.1 and probs.max() > 0.9
    np.testing.assert_array_equal(out[S.LABEL][ok], np.round(probs * 255).astype(np.uint8))
    np.testing.assert_allclose(out[S.CONF_MEAN][ok], np.abs(2 * probs - 1).mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(out[S.CONF_FRAC][ok], ((probs < 0.1) | (probs > 0.9)).mean((1, 2)), atol=1e-6)
    np.testing.assert_allclose(out[S.FG_FRAC][ok], (probs > 0.5).mean((1, 2)), atol=1e-6)
    assert not out[S.LABEL][~ok].any() and np.isnan(out[S.CONF_MEAN][~ok]).all()
    assert set(out[S.TEACHER]) == {"scfnet_m3"}
    assert set(out[S.WEIGHTS_HASH]) == {weights_hash(teacher_file.read_bytes())}
    assert list(out[S.ID]) == list(batch[S.ID]) and list(out[S.REASON]) == list(batch[S.REASON])
    # decode placement "actor": the labeler reads and decodes manifest rows itself, with the same result
    inline = LB.TeacherLabeler([spec], teacher_size=SIZE, device="cpu", threads=1, backend="eager",
                               decode={"input_uri": str(image_dir), "s3": None, "size": SIZE})
    out2 = inline(_manifest_batch(keys))
    np.testing.assert_array_equal(out2[S.LABEL], out[S.LABEL])
    assert list(out2[S.REASON]) == list(out[S.REASON])
    with pytest.raises(ValueError, match="no 'image' column"):
        labeler(_manifest_batch(keys))


def test_weights_teachers_label_through_the_predictors_backend(image_dir, teacher_file, other_teacher_file,
                                                               monkeypatch, tmp_path):
    """A weights file labels through ONNX Runtime on a CPU by default (the engine of ``sodkd predict``), one
    export per weights file in the export cache; the labels are the eager ones within one grey level, and the
    rows name the same teacher and weights hash whichever backend ran it. Ensembles convert each member."""
    from cluster.teachers import OnnxTeacher
    monkeypatch.setenv("SODKD_CACHE", str(tmp_path / "cache"))
    keys = sorted(p.name for p in image_dir.iterdir())
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    ok = batch[S.REASON] == ""
    specs = [f"scfnet_m3:{teacher_file}", f"scfnet_m3:{other_teacher_file}"]
    by = {}
    for backend in ("eager", "auto", "pt2"):
        labeler = LB.TeacherLabeler(specs, teacher_size=SIZE, device="cpu", threads=1, backend=backend)
        kinds = {type(m).__name__ for m in labeler.teacher.members}
        assert kinds == {"eager": {"EagerTeacher"}, "auto": {"OnnxTeacher"}, "pt2": {"ExportTeacher"}}[backend]
        by[backend] = labeler(batch)
    assert len(list((tmp_path / "cache" / "exports").glob("*.onnx"))) == 2
    assert len(list((tmp_path / "cache" / "exports").glob("*.pt2"))) == 2
    for backend in ("auto", "pt2"):
        diff = np.abs(by[backend][S.LABEL][ok].astype(int) - by["eager"][S.LABEL][ok].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, backend
        np.testing.assert_allclose(by[backend][S.DISAGREEMENT][ok], by["eager"][S.DISAGREEMENT][ok], atol=1e-4)
        assert list(by[backend][S.TEACHER]) == list(by["eager"][S.TEACHER])
        assert list(by[backend][S.WEIGHTS_HASH]) == list(by["eager"][S.WEIGHTS_HASH])
    # an exported file is already in its own runtime: the backend does not touch it
    onnx_file = next((tmp_path / "cache" / "exports").glob("*.onnx"))
    same = LB.TeacherLabeler([str(onnx_file)], device="cpu", threads=1, backend="eager")
    assert isinstance(same.teacher, OnnxTeacher)
    with pytest.raises(ValueError, match="backend: expected one of"):
        LB.TeacherLabeler(specs[:1], teacher_size=SIZE, device="cpu", backend="tensorrt")


def test_teacher_labeler_label_size_and_tta(image_dir, teacher_file):
    keys = sorted(p.name for p in image_dir.iterdir() if p.suffix == ".jpg")
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    out = LB.TeacherLabeler([f"scfnet_m3:{teacher_file}"], backend="eager", teacher_size=SIZE, label_size=32,
                            tta="hflip",
                            device="cpu")(batch)
    ok = out[S.REASON] == ""
    assert out[S.LABEL].shape == (len(keys), 32, 32)
    assert set(out[S.TTA]) == {"hflip"}
    ref = build_teacher(f"scfnet_m3:{teacher_file}", tta="hflip", input_size=SIZE).predict(batch[S.IMAGE][ok])
    # the label is the antialiased bilinear downscale of the probabilities (as PIL does it), quantised
    down = np.stack([np.asarray(Image.fromarray(p, "F").resize((32, 32), Image.BILINEAR)) for p in ref])
    err = np.abs(out[S.LABEL][ok].astype(np.float32) / 255 - down).max()
    assert err <= 0.5 / 255 + 1e-3, f"max error {err * 255:.2f}/255"


def test_views_average_to_probs_and_give_the_disagreement(image_dir, teacher_file, other_teacher_file):
    keys = sorted(p.name for p in image_dir.iterdir())
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    ok = batch[S.REASON] == ""
    a, b = f"scfnet_m3:{teacher_file}", f"scfnet_m3:{other_teacher_file}"
    for specs, tta, n_views in (([a, b], "none", 2), ([a], "hflip", 2), ([a, b], "hflip", 4)):
        teacher = build_teacher(specs, tta=tta, input_size=SIZE, device="cpu")
        with torch.inference_mode():
            x = teacher.to_input(batch[S.IMAGE][ok])
            views, p = teacher.views(x), teacher.probs(x)
        assert len(views) == n_views and all(v.shape == p.shape for v in views)
        torch.testing.assert_close(torch.stack(views).mean(0), p)
        out = LB.TeacherLabeler(specs, backend="eager", tta=tta, teacher_size=SIZE, device="cpu", threads=1)(batch)
        dis = out[S.DISAGREEMENT]
        assert dis.dtype == np.float32 and np.isfinite(dis[ok]).all() and (dis[ok] > 0).all(), (specs, tta, dis)
        assert np.isnan(dis[~ok]).all()   # rejects: no prediction
        expected = torch.stack([(v - p).abs().mean((1, 2)) for v in views]).mean(0).numpy()
        np.testing.assert_allclose(dis[ok], expected, rtol=1e-5, atol=1e-7)
        # the labels are what probs() gives, unchanged by computing the views in the same pass
        np.testing.assert_array_equal(out[S.LABEL][ok], (p * 255).round().to(torch.uint8).numpy())
    single = build_teacher(a, input_size=SIZE, device="cpu")
    with torch.inference_mode():
        x = single.to_input(batch[S.IMAGE][ok])
        views = single.views(x)
        assert len(views) == 1
        torch.testing.assert_close(views[0], single.probs(x))
    out = LB.TeacherLabeler([a], backend="eager", teacher_size=SIZE, device="cpu", threads=1)(batch)
    assert np.isnan(out[S.DISAGREEMENT]).all()


def _old_shard(table):
    """``table`` as a shard written before the disagreement column existed."""
    return table.drop_columns([S.DISAGREEMENT])


def test_shards_without_disagreement_still_read(tmp_path, image_dir, teacher_file, other_teacher_file):
    keys = sorted(p.name for p in image_dir.iterdir() if p.suffix == ".jpg")
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    labelled = LB.TeacherLabeler([f"scfnet_m3:{teacher_file}", f"scfnet_m3:{other_teacher_file}"],
                                 teacher_size=SIZE, device="cpu")(batch)
    out = tmp_path / "out"
    LB.write_label_shards(labelled, output_uri=str(out), s3=None)
    new = L.read_labels(str(out))
    fs = pafs.LocalFileSystem()
    first = new.slice(0, 1)                      # an old shard (no column) for the first image, one for the rest
    old_only = tmp_path / "old"
    L.write_shard(fs, str(old_only), S.LABELS_DIR, _old_shard(first))
    assert S.DISAGREEMENT not in pq.read_schema(L.shard_paths(fs, str(old_only))[0]).names
    t = L.read_labels(str(old_only))
    assert t.schema == L.LABEL_SCHEMA and np.isnan(t.column(S.DISAGREEMENT).to_numpy()).all()
    t = L.read_labels(str(old_only), columns=[S.KEY, S.DISAGREEMENT])
    assert t.column_names == [S.ID, S.KEY, S.DISAGREEMENT] and np.isnan(t.column(S.DISAGREEMENT)[0].as_py())
    L.write_shard(fs, str(old_only), S.LABELS_DIR, new.slice(1))
    both = L.read_labels(str(old_only), columns=[S.KEY, S.CONF_MEAN, S.DISAGREEMENT])
    assert both.num_rows == new.num_rows == 3
    dis = dict(zip(both.column(S.KEY).to_pylist(), both.column(S.DISAGREEMENT).to_numpy()))
    assert np.isnan(dis[first.column(S.KEY)[0].as_py()]) and sum(np.isfinite(v) for v in dis.values()) == 2
    assert L.read_labels(str(old_only)).schema == L.LABEL_SCHEMA
    rows = L.read_label_rows(fs, str(old_only), [first.column(S.ID)[0].as_py()], [S.LABEL_PNG, S.DISAGREEMENT])
    assert rows.num_rows == 1 and rows.column(S.LABEL_PNG)[0].as_py() == first.column(S.LABEL_PNG)[0].as_py()


def test_review_list_worst_first(tmp_path, image_dir, teacher_file, other_teacher_file):
    import csv
    keys = sorted(p.name for p in image_dir.iterdir())
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    ens = LB.TeacherLabeler([f"scfnet_m3:{teacher_file}", f"scfnet_m3:{other_teacher_file}"],
                            teacher_size=SIZE, device="cpu")(batch)
    out = tmp_path / "out"
    cfg = LB.LabelConfig(input=str(image_dir), output=str(out), teachers=(f"scfnet_m3:{teacher_file}",))
    assert LB.write_review(cfg) is None          # nothing labelled yet: no list
    LB.write_label_shards(ens, output_uri=str(out), s3=None)
    review = LB.write_review(cfg)
    with open(out / S.REVIEW_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(LB.REVIEW_COLUMNS) and review.uri == str(out / S.REVIEW_FILE)
    ok = ens[S.REASON] == ""
    assert len(rows) == review.total == ok.sum()
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    by_key = dict(zip(ens[S.KEY], ens[S.DISAGREEMENT]))
    assert all(np.isclose(float(r["score"]), by_key[r["key"]], rtol=1e-5) for r in rows)
    assert all(float(r["score"]) == float(r["disagreement"]) for r in rows)
    # an image labelled by a single teacher (no disagreement) is scored 1 - conf_mean; top keeps the worst
    shutil.copy(image_dir / keys[0], image_dir / "copy.jpg")
    single = LB.TeacherLabeler([f"scfnet_m3:{teacher_file}"], backend="eager", teacher_size=SIZE, device="cpu")(
        LB.load_images(_manifest_batch(["copy.jpg"]), input_uri=str(image_dir), s3=None, size=SIZE))
    LB.write_label_shards(single, output_uri=str(out), s3=None)
    full = LB.write_review(dataclasses.replace(cfg, review=LB.ReviewConfig(top=None)))
    assert len(full.rows) == full.total == ok.sum() + 1
    copy = next(r for r in full.rows if r["key"] == "copy.jpg")
    assert np.isnan(copy["disagreement"]) and np.isclose(copy["score"], 1 - single[S.CONF_MEAN][0], rtol=1e-5)
    review = LB.write_review(dataclasses.replace(cfg, review=LB.ReviewConfig(top=2)))
    with open(out / S.REVIEW_FILE, newline="") as f:
        top = list(csv.DictReader(f))
    assert [r["key"] for r in top] == [r["key"] for r in review.rows] == [r["key"] for r in full.rows[:2]]
    assert review.total == full.total and "worst" in review.line()
    fig = LB.review_figure(cfg, review.rows)
    assert fig is not None and len([a for a in fig.axes if a.images]) == 4
    import matplotlib.pyplot as plt
    plt.close(fig)
    assert not list(out.glob(".*"))              # the atomic write left no temporary


def test_write_shards_and_read_back(tmp_path, image_dir, teacher_file):
    keys = sorted(p.name for p in image_dir.iterdir())
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    labelled = LB.TeacherLabeler([f"scfnet_m3:{teacher_file}"], backend="eager", teacher_size=SIZE, device="cpu")(batch)
    out_dir = tmp_path / "out"
    counts = LB.write_label_shards(labelled, output_uri=str(out_dir), s3=None)
    assert (counts["labelled"][0], counts["rejected"][0]) == (3, 3)
    table = L.read_labels(str(out_dir))
    assert table.schema == L.LABEL_SCHEMA
    rows = {r[S.KEY]: r for r in table.to_pylist()}
    ok = labelled[S.REASON] == ""
    for i in np.flatnonzero(ok):
        row = rows[labelled[S.KEY][i]]
        assert row[S.ID] == S.stable_id(row[S.KEY])
        np.testing.assert_allclose(L.decode_label(row), labelled[S.LABEL][i] / 255.0, atol=1e-7)
        assert (row[S.LABEL_H], row[S.LABEL_W]) == (SIZE, SIZE)
    rejects = L.read_rejects(str(out_dir)).to_pylist()
    assert {r[S.KEY]: r[S.REASON] for r in rejects} == {"empty.jpg": "empty", "notes.png": "not_an_image",
                                                        "half.jpg": "truncated"}
    fs = pafs.LocalFileSystem()
    assert L.done_ids(fs, str(out_dir)) == {S.stable_id(k) for k in keys}
    # the labels/ folder itself is accepted too
    assert L.read_labels(str(out_dir / "labels")).num_rows == 3
    # ...and so is a job output that happens to be named "labels" (it holds labels/ and rejects/ itself)
    named = tmp_path / "labels"
    LB.write_label_shards(labelled, output_uri=str(named), s3=None)
    assert L.read_labels(str(named)).num_rows == 3 and L.read_rejects(str(named)).num_rows == 3


def test_readers_dedupe_and_ignore_temporaries(tmp_path):
    fs = pafs.LocalFileSystem()
    root = str(tmp_path)
    batch = {S.ID: np.array(["a", "b"], dtype=object), S.KEY: np.array(["x/a.jpg", "x/b.jpg"], dtype=object),
             S.SEQUENCE: np.array(["", ""], dtype=object), S.FRAME: np.array([-1, -1], np.int32),
             S.REASON: np.array(["empty", "corrupt"], dtype=object),
             S.DETAIL: np.array(["zero bytes", "bad"], dtype=object)}
    t = label_stages._reject_table(batch, np.arange(2))
    p1 = L.write_shard(fs, root, S.REJECTS_DIR, t)
    L.write_shard(fs, root, S.REJECTS_DIR, t.slice(1, 1))   # a retried task wrote "b" again
    assert pq.read_table(p1).num_rows == 2
    assert L.read_rejects(root).num_rows == 2 and sorted(L.read_rejects(root).column(S.ID).to_pylist()) == ["a", "b"]
    # a writer killed between write and rename leaves a hidden temporary: ignored, then cleaned up
    stale = tmp_path / S.REJECTS_DIR / ".part-x.parquet.tmp-1234"
    stale.write_bytes(b"PAR1 half a shard")
    (tmp_path / S.REJECTS_DIR / "part-foreign.parquet").write_bytes(b"garbage")  # unreadable: skipped
    assert L.read_ids(fs, root, S.REJECTS_DIR) == {"a", "b"}
    assert L.remove_stale_temporaries(fs, root) == 1 and not stale.exists()
    assert L.read_labels(root).num_rows == 0


def test_decode_label_checks_shape():
    from kd.imageio import encode_png
    png = encode_png(np.full((4, 6), 255, np.uint8))
    assert L.decode_label(png).shape == (4, 6) and L.decode_label(png).max() == 1.0
    with pytest.raises(ValueError, match="the row says"):
        L.decode_label({S.LABEL_PNG: png, S.LABEL_H: 6, S.LABEL_W: 4, S.ID: "x"})


def test_manifest_layouts(tmp_path, shared_data):
    davis = shared_data / "davis2016-dev"
    seqs = sorted(p.name for p in davis.iterdir() if p.is_dir())[:2]
    for s in seqs:
        for sub in ("images", "masks"):
            (tmp_path / "v" / s / sub).mkdir(parents=True)
            for p in sorted((davis / s / sub).iterdir())[:2]:
                shutil.copy(p, tmp_path / "v" / s / sub / p.name)
    cfg = LB.LabelConfig(input=str(tmp_path / "v"), output=str(tmp_path / "o"), teachers=("x.onnx",))
    m = LB.build_manifest(cfg)
    assert m.layout == "video"
    assert [(i.sequence, i.frame) for i in m.items] == [(s, f) for s in seqs for f in (0, 1)]
    assert all("/images/" in i.key for i in m.items)
    import dataclasses
    m = LB.build_manifest(dataclasses.replace(cfg, layout="images"))
    assert m.layout == "images" and len(m.items) == 8 and all(i.frame == -1 for i in m.items)


def test_config_from_yaml_flags_and_overrides(tmp_path):
    from jobs import label_cmd
    p = argparse.ArgumentParser()
    label_cmd.add_arguments(p)
    args = p.parse_args(["--input", "s3://b/in", "--output", "s3://b/out", "--teacher", "scfnet_r50:w.pt",
                         "--teacher", "t.onnx", "pool.size=null", "pool.min_size=1", "pool.max_size=4",
                         "pool.num_gpus=1", "tta=hflip", "s3.endpoint_url=http://127.0.0.1:9000"])
    cfg = label_cmd.build_config(args)
    assert cfg.teachers == ("scfnet_r50:w.pt", "t.onnx") and cfg.tta == "hflip"
    assert (cfg.pool.size, cfg.pool.min_size, cfg.pool.max_size, cfg.pool.num_gpus) == (None, 1, 4, 1.0)
    assert cfg.s3.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.tracking.experiment == "sodkd-label"
    with pytest.raises(ConfigError, match="pool.batchsize: unknown key"):
        label_cmd.build_config(p.parse_args(["--input", "a", "--output", "b", "--teacher", "t.ts",
                                             "pool.batchsize=4"]))
    with pytest.raises(ConfigError, match="teachers: required key is missing"):
        label_cmd.build_config(p.parse_args(["--input", "a", "--output", "b"]))
    with pytest.raises(ConfigError, match="pool: give either size or min_size/max_size"):
        label_cmd.build_config(p.parse_args(["--input", "a", "--output", "b", "--teacher", "t.ts",
                                             "pool.max_size=3"]))
    with pytest.raises(ConfigError, match="tta: expected one of"):
        label_cmd.build_config(p.parse_args(["--input", "a", "--output", "b", "--teacher", "t.ts", "tta=vflip"]))
    assert cfg.review == LB.ReviewConfig(top=200, sheet=12)   # jobs/configs/label.yaml
    assert label_cmd.build_config(p.parse_args(["--input", "a", "--output", "b", "--teacher", "t.ts",
                                                "review.top=null"])).review.top is None
    with pytest.raises(ConfigError, match="review.top: must be >= 1"):
        label_cmd.build_config(p.parse_args(["--input", "a", "--output", "b", "--teacher", "t.ts", "review.top=0"]))


def test_decode_placement_auto_follows_the_pool():
    assert LB.DecodeConfig().resolved_placement(num_gpus=0) == "actor"
    assert LB.DecodeConfig().resolved_placement(num_gpus=1) == "tasks"
    assert LB.DecodeConfig(placement="tasks").resolved_placement(num_gpus=0) == "tasks"
    assert LB.DecodeConfig(placement="actor").resolved_placement(num_gpus=0.5) == "actor"


def test_label_command_is_registered():
    from jobs.cli import COMMANDS
    assert COMMANDS["label"][0] == "jobs.label_cmd"


def test_tracking_params_never_carry_credentials():
    flat = {"s3.endpoint_url": "http://user:hunter2@minio:9000", "aws_secret_access_key": "abc",
            "db.password": "pw", "api_token": "t", "pool.size": 2, "input": "s3://bucket/x"}
    clean = tracking.sanitize_params(flat)
    assert clean == {"s3.endpoint_url": "http://minio:9000", "pool.size": "2", "input": "s3://bucket/x"}
    assert "hunter2" not in str(clean)
    assert len(tracking.sanitize_params({"k": "x" * 10_000})["k"]) == tracking.MAX_PARAM_CHARS
    # keys MLflow would refuse (model.lr_mult patterns) are made safe, values kept
    assert tracking.sanitize_params({"model.lr_mult.scfm*": 0.1, "a-b/c d.e_f": 1}) == {
        "model.lr_mult.scfm_": "0.1", "a-b/c d.e_f": "1"}


# --- transient is not final (issue 13) ---------------------------------------------------------------------

CANARY = "canary-secret-13-do-not-log"


def _dead_endpoint() -> str:
    import socket
    with socket.socket() as s:   # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA13CANARY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


FAST = LB.RetryConfig(attempts=3, delay_s=0.01, max_delay_s=0.02)


def test_reads_that_fail_transiently_are_retried_then_deferred_never_rejected(aws_env, tmp_path):
    s3 = storage.S3Config(endpoint_url=_dead_endpoint(), request_attempts=1)
    keys = ["a.jpg", "sub/../b.jpg"]
    out = LB.load_images(_manifest_batch(keys), input_uri="s3://bkt/in", s3=s3, size=SIZE, retry=FAST)
    assert list(out[S.REASON]) == [S.DEFERRED] * 2
    assert list(out[S.RETRIES]) == [FAST.attempts - 1] * 2      # every round retried them, then gave up
    assert all("EndpointConnectionError" in d and CANARY not in d for d in out[S.DETAIL])
    # deferred rows are written nowhere: not done, the next run takes them again
    counts = LB.write_label_shards(out, output_uri=str(tmp_path / "o"), s3=None, retry=FAST)
    assert (counts["labelled"][0], counts["rejected"][0], counts["deferred"][0]) == (0, 0, 2)
    assert counts["retried"][0] == 2 * (FAST.attempts - 1)
    assert [k for k, _ in json.loads(counts["deferred_keys"][0])] == keys
    assert L.done_ids(pafs.LocalFileSystem(), str(tmp_path / "o")) == set()


def test_shard_writes_that_fail_transiently_defer_their_rows(aws_env, image_dir, teacher_file):
    keys = sorted(p.name for p in image_dir.iterdir())
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    labelled = LB.TeacherLabeler([f"scfnet_m3:{teacher_file}"], backend="eager", teacher_size=SIZE, device="cpu",
                                 threads=1)(batch)
    s3 = storage.S3Config(endpoint_url=_dead_endpoint(), request_attempts=1)
    counts = LB.write_label_shards(labelled, output_uri="s3://bkt/out", s3=s3, retry=FAST)
    # 3 labels + 3 rejects, neither shard could be written: all 6 deferred, none counted as done
    assert (counts["labelled"][0], counts["rejected"][0], counts["deferred"][0]) == (0, 0, 6)
    assert counts["retried"][0] == 2 * (FAST.attempts - 1) and counts["shards"][0] == ""
    assert json.loads(counts["reasons"][0]) == {}


def test_a_final_write_error_is_raised_not_deferred(image_dir, tmp_path):
    keys = ["empty.jpg"]
    batch = LB.load_images(_manifest_batch(keys), input_uri=str(image_dir), s3=None, size=SIZE)
    (tmp_path / "o").write_text("a file where the output folder should be")
    with pytest.raises(OSError) as err:
        LB.write_label_shards(batch, output_uri=str(tmp_path / "o"), s3=None, retry=FAST)
    assert not isinstance(err.value, storage.TransientError)


def test_nan_and_infinite_config_values_are_rejected_with_their_key():
    base = {"input": "a", "output": "b", "teachers": ["t.ts"]}
    for over, key in [("pool.num_cpus=.nan", "pool.num_cpus"), ("pool.num_gpus=.inf", "pool.num_gpus"),
                      ("decode.num_cpus=.nan", "decode.num_cpus"), ("write.num_cpus=-.inf", "write.num_cpus"),
                      ("retry.delay_s=.nan", "retry.delay_s"), ("retry.max_delay_s=.inf", "retry.max_delay_s"),
                      ("retry.attempts=0", "retry.attempts"), ("s3.request_attempts=0", "s3.request_attempts")]:
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: "):
            LB.load_label_config(base, [over])
    cfg = LB.load_label_config(base, ["retry.attempts=2", "retry.delay_s=0.1", "s3.request_attempts=5"])
    assert (cfg.retry.attempts, cfg.retry.delay_s, cfg.s3.request_attempts) == (2, 0.1, 5)


def test_an_id_collision_names_both_keys():
    class SameId(catalog.Item):
        @property
        def id(self) -> str:
            return "0123456789abcdef"

    cfg = LB.LabelConfig(input="in", output="out", teachers=("t.ts",))
    label_plan._check_ids(cfg, [catalog.Item("a.jpg", "in/a.jpg"), catalog.Item("b.jpg", "in/b.jpg")])
    with pytest.raises(ValueError, match=r"'a/\.\./b\.jpg' and 'b\.jpg' hash to the same id 0123456789abcdef"):
        label_plan._check_ids(cfg, [SameId("a/../b.jpg", "in/a/../b.jpg"), SameId("b.jpg", "in/b.jpg")])


def test_video_manifest_rejects_an_unreadable_video_and_counts_the_rest(tmp_path, shared_data):
    v = tmp_path / "v"
    (v / "seq" / "images").mkdir(parents=True)
    (v / "seq" / "masks").mkdir()
    for p in sorted((shared_data / "davis2016-dev" / "blackswan" / "images").glob("*.jpg"))[:2]:
        shutil.copy(p, v / "seq" / "images" / p.name)
    (v / "seq" / "masks" / "00000.png").write_bytes(b"\x89PNG not really")
    (v / "clip.mp4").write_bytes(b"not a video at all" * 10)
    (v / "notes.md").write_text("x")
    cfg = LB.LabelConfig(input=str(v), output=str(tmp_path / "o"), teachers=("x.onnx",), layout="video")
    m = LB.build_manifest(cfg)
    assert [i.key for i in m.items] == ["seq/images/00000.jpg", "seq/images/00001.jpg"]
    assert [(i.key, reason) for i, reason, _ in m.rejected] == [("clip.mp4", "video_file")]
    assert m.ignored == {"mask": 1, ".md": 1}
