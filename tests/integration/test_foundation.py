"""Foundation-model pseudo labels end to end on real images, offline.

Tiny random-weight BLIP, GroundingDINO and SAM (``tests/foundation_tiny.py``) run through the real labelling
job (``sodkd label`` with ``teachers: [foundation]``): real Ray Data, one ``ActorPoolStrategy`` pool per
stage with fractional CPUs, real images from ../shared/data, shards on disk, an MLflow sqlite store. Then
the DEDecoder student trains a few steps on those shards with the composite loss (`sodkd train-fm`). The labels are noise
(random weights); what is checked is the plumbing: shapes, ids, confidence ranges, columns, params.
"""

from __future__ import annotations

import io
import shutil

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from cluster import foundation as fm
from cluster.training.foundation import load_samples
from cluster.label import foundation as fm_stages
from cluster.label import load_label_config, run_labelling
from cluster.labels import read_labels, read_rejects
from foundation_tiny import build_tiny_foundation   # tests/foundation_tiny.py (tests/ is on sys.path)
from kd import schema as S
from kd.config import load_config
from models import create_model, load_weights

pytestmark = pytest.mark.integration

N_IMAGES = 5
IMAGE_SIZE = 96
POOLS = {"captioner": 1, "detector": 1, "segmenter": 2}


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return build_tiny_foundation(tmp_path_factory.mktemp("tiny-foundation"))


@pytest.fixture(scope="module")
def images(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("images")
    src = sorted((shared_data / "unlabeled" / "imagenet-1k").glob("*.jpg"))[:N_IMAGES]
    for p in src:
        shutil.copy(p, d / p.name)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def _foundation_block(tiny_models, **detector) -> dict:
    res = lambda n: {"pool_size": n, "num_cpus": 0.25, "batch_size": 2, "torch_threads": 1}  # noqa: E731
    return {
        "image_size": IMAGE_SIZE, "local_files_only": True,
        "captioner": {"model": tiny_models["captioner"], "max_new_tokens": 6, "resources": res(POOLS["captioner"])},
        "detector": {"model": tiny_models["detector"], "box_threshold": 0.0, "max_boxes": 2,
                     "resources": res(POOLS["detector"]), **detector},
        # the tiny SAM's logits are of order 1, so SAM's default offset (1.0) would call every mask unstable
        "segmenter": {"model": tiny_models["segmenter"], "stability_offset": 0.1,
                      "resources": res(POOLS["segmenter"])},
    }


@pytest.fixture(scope="module")
def labelled(ray_local, tiny_models, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("fm-labels")
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    cfg = load_label_config({
        "input": str(images), "output": str(out), "teachers": ["foundation"], "layout": "images",
        "label_size": 64, "progress": False, "decode": {"num_cpus": 0.25, "batch_size": 4},
        "write": {"num_cpus": 0.25, "shard_rows": 4},
        "foundation": _foundation_block(tiny_models),
        "tracking": {"uri": f"sqlite:///{db}", "experiment": "fm-test"},
    })
    summary = run_labelling(cfg, samples=2)
    return {"cfg": cfg, "out": out, "summary": summary, "db": db}


def test_pipeline_writes_masks_confidences_captions_and_boxes(labelled, images):
    summary, out = labelled["summary"], labelled["out"]
    assert summary.labelled == N_IMAGES and summary.rejected == 1
    assert summary.teacher.startswith("foundation(blip=")
    table = read_labels(str(out))
    keys = sorted(p.name for p in images.glob("*.jpg") if p.name != "broken.jpg")
    assert sorted(table.column(S.KEY).to_pylist()) == keys
    for row in table.to_pylist():
        assert row[S.ID] == S.stable_id(row[S.KEY])
        label = np.asarray(Image.open(io.BytesIO(row[S.LABEL_PNG])))
        conf = np.asarray(Image.open(io.BytesIO(row[S.CONF_PNG])))
        assert label.shape == conf.shape == (64, 64) and label.dtype == conf.dtype == np.uint8
        assert (row[S.LABEL_H], row[S.LABEL_W]) == (64, 64)
        assert conf.max() > 0, "confidence map is all zero"          # the tiny models do produce trust
        assert 0.0 <= row[S.CONF_MEAN] <= 1.0 and 0.0 <= row[S.FG_FRAC] <= 1.0
        assert isinstance(row[S.CAPTION], str) and row[S.CAPTION].strip()
        boxes = np.asarray(row[S.BOXES], np.float32).reshape(-1, 4)
        assert 1 <= len(boxes) <= 2 and len(row[S.BOX_SCORES]) == len(row[S.MASK_SCORES]) == len(boxes)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= row[S.ORIG_W] + 1e-3).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= row[S.ORIG_H] + 1e-3).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert all(0.0 <= s <= 1.0 for s in row[S.BOX_SCORES] + row[S.MASK_SCORES])
        # the confidence never exceeds the quality of the best object (c = q_k |2p - 1| <= max q)
        assert conf.max() <= round(255 * max(row[S.MASK_SCORES])) + 1
        assert len(row[S.WEIGHTS_HASH]) == 16 and row[S.TEACHER] == summary.teacher
    rejects = read_rejects(str(out)).to_pylist()
    assert [(r[S.KEY], r[S.REASON]) for r in rejects] == [("broken.jpg", "not_an_image")]


def test_each_stage_pool_is_configurable_and_recorded_in_mlflow(labelled):
    runs = mlflow.MlflowClient(tracking_uri=f"sqlite:///{labelled['db']}").search_runs(
        [mlflow.MlflowClient(tracking_uri=f"sqlite:///{labelled['db']}").get_experiment_by_name("fm-test")
         .experiment_id])
    params = runs[0].data.params
    for stage, size in POOLS.items():
        assert params[f"foundation.{stage}.resources.pool_size"] == str(size)
        assert params[f"foundation.{stage}.resources.num_cpus"] == "0.25"
    assert params["teachers"] == "['foundation']"
    assert runs[0].data.metrics["label/labelled"] == N_IMAGES


def test_rerun_labels_nothing_and_no_detection_becomes_a_reject(labelled, tiny_models, images, tmp_path):
    again = run_labelling(labelled["cfg"], samples=0)
    assert again.labelled == 0 and again.skipped_done == N_IMAGES + 1
    # a threshold no random box reaches: every decodable image is rejected as "no_detection"
    cfg = load_label_config({
        "input": str(images), "output": str(tmp_path / "none"), "teachers": ["foundation"], "layout": "images",
        "label_size": 32, "progress": False, "limit": 2, "tracking": {"enabled": False},
        "foundation": _foundation_block(tiny_models, box_threshold=1.0)})
    s = run_labelling(cfg, samples=0)
    assert s.labelled == 0 and s.reasons.get("no_detection", 0) >= 1


def test_dedecoder_trains_on_the_pseudo_label_shards(labelled, images, shared_data, tmp_path, capsys):
    """`sodkd train-fm` on the Ray Train core (in-process worker): the composite loss moves every part of the
    DEDecoder, the run is in MLflow with the fm weights and loss parts, validation scores it, weights load."""
    from jobs.cli import main

    db = tmp_path / "train.db"
    val = tmp_path / "val"
    for sub, pattern in (("images", "*.jpg"), ("masks", "*.png")):
        (val / sub).mkdir(parents=True)
        for f in sorted((shared_data / "ecssd" / sub).glob(pattern))[:3]:
            shutil.copy(f, val / sub / f.name)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in create_model("dedecoder_m3").state_dict().items()}
    rc = main(["train-fm", "--images", str(images), "--labels", str(labelled["out"]), "--val", str(val),
               "--name", "fm-test", "--storage", str(tmp_path / "runs"), "optim.epochs=2", "optim.batch_size=2",
               "optim.warmup_epochs=0", "optim.lr=0.05", "data.load_size=64", "data.sizes=[64]", "val.size=64",
               "data.decode_cpus=0.25", "scaling.num_workers=0", "scaling.torch_threads=1",
               "fm.conf_threshold=0.05", "fm.w_edge=0.5", "mlflow.log_every=1", "mlflow.onnx=false",
               f"mlflow.uri=sqlite:///{db}", "output.fp16=false", f"output.dir={tmp_path / 'out'}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"{N_IMAGES} rows, 2 steps/epoch" in printed      # the broken image has no label, so no row
    weights = tmp_path / "out" / "fm-test.pt"
    assert f"weights {weights}" in printed
    trained = load_weights(str(weights))
    after = trained.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert any(k.startswith("edge_head") for k in changed) and any(k.startswith("backbone") for k in changed)
    assert any(".up.offset" in k for k in changed), "DySample offsets did not learn"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs(client.get_experiment_by_name("sodkd-fm").experiment_id)
    params = run.data.params
    assert params["mode"] == "foundation" and params["model.name"] == "dedecoder_m3"
    assert params["fm.conf_threshold"] == "0.05" and params["fm.w_edge"] == "0.5"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, S.TRAIN_LOSS)]
    assert steps == [1, 2, 3, 4]
    for part in ("train/sal", "train/edge", "train/trusted_frac"):
        hist = client.get_metric_history(run.info.run_id, part)
        assert len(hist) == 4 and all(np.isfinite(m.value) for m in hist), part
    assert 0.0 <= run.data.metrics[S.VAL_MAE] <= 1.0


def _teacher_shard(labelled, tmp_path, n: int = 2):
    """Teacher labels for ``n`` of the images (written as a SOD labelling run would), in another order."""
    import pyarrow as pa

    from cluster import labels as L
    from kd.imageio import encode_png

    fm_rows = sorted(read_labels(str(labelled["out"])).to_pylist(), key=lambda r: r[S.ID])
    teacher_rows = fm_rows[:n][::-1]  # the join must go by id
    t_map = np.zeros((32, 32), np.uint8)
    t_map[8:24, 8:24] = 255                      # a different size from the 64 px foundation labels
    table = pa.table({
        S.ID: [r[S.ID] for r in teacher_rows], S.KEY: [r[S.KEY] for r in teacher_rows],
        S.SEQUENCE: [""] * n, S.FRAME: [-1] * n, S.ORIG_H: [r[S.ORIG_H] for r in teacher_rows],
        S.ORIG_W: [r[S.ORIG_W] for r in teacher_rows], S.TEACHER: ["scfnet_r50"] * n,
        S.WEIGHTS_HASH: ["0" * 16] * n, S.TTA: ["none"] * n, S.LABEL_H: [32] * n, S.LABEL_W: [32] * n,
        S.LABEL_PNG: [encode_png(t_map)] * n, S.CONF_MEAN: [1.0] * n, S.CONF_FRAC: [1.0] * n,
        S.FG_FRAC: [0.25] * n, S.DISAGREEMENT: [float("nan")] * n}, schema=L.LABEL_SCHEMA)
    L.write_shard(pa.fs.LocalFileSystem(), str(tmp_path / "teacher"), S.LABELS_DIR, table)
    return tmp_path / "teacher", {r[S.ID] for r in teacher_rows}, t_map


def test_fusion_with_sod_teacher_labels_joins_by_id(labelled, images, tmp_path):
    """Teacher labels for some of the images, fused per pixel; the training pipeline's join gives the same maps."""
    from cluster.catalog import image_folder
    from cluster.training.data import join_labels
    from kd.pseudo_labels import fuse_with_teacher

    teacher_dir, with_teacher, t_map = _teacher_shard(labelled, tmp_path)
    plain = {s.id: s for s in load_samples(str(labelled["out"]), str(images))}
    fused = {s.id: s for s in load_samples(str(labelled["out"]), str(images), teacher_labels=str(teacher_dir))}
    assert plain.keys() == fused.keys() and len(plain) == N_IMAGES
    assert all(s.image.shape == (64, 64, 3) and s.target.shape == s.conf.shape == (64, 64) for s in plain.values())
    for i in plain:
        if i not in with_teacher:
            assert np.array_equal(plain[i].target, fused[i].target) and np.array_equal(plain[i].conf, fused[i].conf)
            continue
        t = np.asarray(Image.fromarray(t_map).resize((64, 64), Image.BILINEAR), np.float32) / 255.0
        y, c = fuse_with_teacher(torch.from_numpy(plain[i].target), torch.from_numpy(plain[i].conf),
                                 torch.from_numpy(t))
        np.testing.assert_allclose(fused[i].target, y.numpy(), atol=1e-6)
        np.testing.assert_allclose(fused[i].conf, c.numpy(), atol=1e-6)
        assert not np.array_equal(fused[i].target, plain[i].target)

    # the Ray Data join of the training core (one batch of shard rows) gives the same maps, as uint8
    rows = read_labels(str(labelled["out"]), columns=[S.LABEL_PNG, S.CONF_PNG])
    teacher = read_labels(str(teacher_dir), columns=[S.LABEL_PNG])
    out = join_labels({c: np.asarray(rows.column(c).to_pylist(), dtype=object) for c in rows.column_names},
                      paths_by_id={it.id: it.path for it in image_folder(str(images)).items},
                      root_uri=str(images), s3=None, size=64, foundation=True,
                      teacher_pngs=dict(zip(teacher.column(S.ID).to_pylist(), teacher.column(S.LABEL_PNG).to_pylist())))
    assert len(out[S.ID]) == N_IMAGES and out[S.CONF].shape == out[S.TARGET].shape == (N_IMAGES, 64, 64)
    for j, i in enumerate(out[S.ID]):
        np.testing.assert_allclose(out[S.TARGET][j] / 255.0, fused[i].target, atol=0.6 / 255)
        np.testing.assert_allclose(out[S.CONF][j] / 255.0, fused[i].conf, atol=0.6 / 255)


def test_sod_label_output_is_refused_for_foundation_training(tmp_path, images):
    import pyarrow as pa

    from cluster import labels as L
    from cluster.training.data import build_train_dataset
    from cluster.training.sections import load_train_config
    table = L.LABEL_SCHEMA.empty_table()
    L.write_shard(pa.fs.LocalFileSystem(), str(tmp_path / "sod"), S.LABELS_DIR, table)
    with pytest.raises(ValueError, match="conf_png"):
        load_samples(str(tmp_path / "sod"), str(images))
    cfg = load_train_config("jobs/configs/train_fm.yaml",
                            [f"data.unlabeled=[{{uri: {images}, labels: {tmp_path / 'sod'}}}]"])
    with pytest.raises(ValueError, match=f"{tmp_path / 'sod'}: label shards have no 'conf_png' column"):
        build_train_dataset(cfg)


def test_stages_run_in_process_with_a_fixed_prompt(tiny_models, shared_data):
    """Without Ray: the three callables in sequence (the captioner replaced by a fixed prompt)."""
    from kd.imageio import decode_image
    paths = sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:2]
    imgs = [decode_image(p.read_bytes()) for p in paths]
    batch = {S.ID: np.array([S.stable_id(p.name) for p in paths], dtype=object),
             S.KEY: np.array([p.name for p in paths], dtype=object),
             S.IMAGE: fm_stages._object_array(imgs),
             S.ORIG_H: np.array([i.shape[0] for i in imgs]), S.ORIG_W: np.array([i.shape[1] for i in imgs]),
             S.REASON: np.array(["", "truncated"], dtype=object)}
    cfg = load_config(fm.FoundationConfig, {**_foundation_block(tiny_models),
                                            "captioner": {"fixed_prompt": "a bird"}})
    out = fm_stages.label_batch_locally(batch, cfg, label_size=48)
    assert list(out[S.CAPTION]) == ["a bird", ""]
    assert out[S.LABEL].shape == out[S.CONF].shape == (2, 48, 48)
    assert out[S.LABEL][1].max() == 0 and out[S.REASON][1] == "truncated"   # a reject passes untouched
    assert len(out[S.BOXES][0]) in (4, 8) and len(out[S.BOXES][1]) == 0
    assert S.IMAGE not in out and "prompt='a bird'" in out[S.TEACHER][0]
