"""The training core end to end: real Ray (one private local instance for the module), Ray Train in-process,
with 2 gloo workers and with DeepSpeed ZeRO-2 on CPU, a real S3 endpoint (moto's ThreadedMotoServer) for run
storage, a real MLflow sqlite store, and real images from ../shared/data (a handful, at 64-80 px, 2 steps an
epoch) so the file stays within a few minutes on two shared cores.

What could break and is checked: the per-step learning rate and loss reach MLflow once per step (rank 0
only), validation metrics and the picture panel per epoch, the registered model and its ONNX export, a
resubmitted run continuing from its last epoch in the same MLflow run (in-process and on S3 with workers), a
worker killed mid-run and the run finishing from its last checkpoint, offline labels joined to their images
by id (not by order) and online labels made by the teacher actor pool inside the training pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from cluster import labels as L
from cluster.storage import S3Config, boto3_client
from cluster.teachers import build_teacher
from cluster.tracking import RUN_NAME_TAG
from cluster.training.data import build_train_dataset
from cluster.training.launch import run_training
from cluster.training.sections import load_train_config
from kd import schema as S
from kd.imageio import decode_image, decode_mask, encode_png, resize
from kd.schedule import WarmupCosine
from models import create_model, load_weights, read_metadata, save_weights
from tests.integration.conftest import environ

pytestmark = pytest.mark.integration

LOAD = 80           # decode size
SIZES = [64, 80]    # multi-scale batch sizes
VAL = 64            # validation size
BUCKET = "sodkd-train-test"


@pytest.fixture(scope="module")
def s3_endpoint(s3_endpoint):
    """The shared S3 endpoint (tests/integration/conftest.py) with this module's bucket."""
    boto3_client(S3Config(endpoint_url=s3_endpoint)).create_bucket(Bucket=BUCKET)
    return s3_endpoint


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    import ray

    from cluster.raylocal import start_private_ray
    with environ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}, restore=("RAY_API_SERVER_ADDRESS",)):
        start_private_ray(4, log_to_driver=False)   # 4 logical CPUs: 2 workers + decode tasks + teacher actors
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data) -> dict[str, Path]:
    """8 DUTS-TR pairs, 4 ECSSD pairs (validation), 6 + 4 ImageNet images (two unlabeled folders)."""
    root = tmp_path_factory.mktemp("data")

    def put(src: Path, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst / src.name)

    for name, n in (("duts-tr", 8), ("ecssd", 4)):
        for p in sorted((shared_data / name / "images").glob("*.jpg"))[:n]:
            put(p, root / name / "images")
            put(shared_data / name / "masks" / f"{p.stem}.png", root / name / "masks")
    imagenet = sorted((shared_data / "unlabeled" / "imagenet-1k").iterdir())
    for p in imagenet[:6]:
        put(p, root / "unl_a")
    for p in imagenet[10:14]:
        put(p, root / "unl_b")
    return {"duts": root / "duts-tr", "ecssd": root / "ecssd", "unl_a": root / "unl_a", "unl_b": root / "unl_b"}


def _config(data: dict, tmp: Path, name: str, **over) -> dict:
    cfg = {
        "mode": "supervised",
        "model": {"name": "scfnet_m3"},
        "data": {"paired": [{"uri": str(data["duts"])}], "load_size": LOAD, "sizes": SIZES,
                 "decode_batch": 4, "decode_cpus": 0.25},
        "val": {"uri": str(data["ecssd"]), "size": VAL, "panel": 2, "batch_size": 4},
        "optim": {"epochs": 2, "batch_size": 4, "warmup_epochs": 1},
        "scaling": {"num_workers": 0},
        "run": {"name": name, "storage": str(tmp / "runs")},
        "mlflow": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "train-test", "log_every": 1,
                   "registered_model": None, "onnx": False},
        "output": {"dir": str(tmp / "out")},
    }
    for dotted, value in over.items():
        node = cfg
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def _runs(client: mlflow.MlflowClient, name: str):
    exp = client.get_experiment_by_name("train-test")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_in_process_run_records_mlflow_and_resumes(ray_cluster, data, tmp_path):
    """num_workers=0: the loop runs in this process; everything MLflow should hold is there; resubmitting with
    more epochs continues the same run from the last epoch."""
    cfg = load_train_config(_config(data, tmp_path, "fs-inproc", **{
        "mlflow.registered_model": "tiny-fs", "mlflow.onnx": True, "mlflow.onnx_exporter": "torchscript"}))
    out = run_training(cfg)
    assert (out.rows, out.steps_per_epoch, out.resumed_from) == (8, 2, [])
    assert out.metrics["epoch"] == 2 and np.isfinite(out.metrics[S.TRAIN_LOSS])
    runs_dir = tmp_path / "runs" / "fs-inproc"
    assert sorted(p.name for p in runs_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint_epoch=0002"]

    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.uri)
    runs = _runs(client, "fs-inproc")
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_id == out.mlflow_run_id
    params = run.data.params
    assert params["mode"] == "supervised" and params["optim.lr"] == "0.064" and params["model.name"] == "scfnet_m3"
    assert params["data.paired"].startswith("[{") and str(data["duts"]) in params["data.paired"]
    # one train/loss and train/lr point per optimizer step; lr follows the warm-up + cosine schedule
    sched = WarmupCosine(total_steps=4, warmup_steps=2, lr_peak=0.064, lr_start=6.4e-4, lr_final=6.4e-4)
    lrs = _history(client, run.info.run_id, S.TRAIN_LR)
    assert [s for s, _ in lrs] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in lrs], [sched(s - 1) for s in range(1, 5)], rtol=1e-6)
    assert [s for s, _ in _history(client, run.info.run_id, S.TRAIN_LOSS)] == [1, 2, 3, 4]
    for key in (S.VAL_MAE, S.VAL_SM, S.VAL_MAXF, S.VAL_EM):
        hist = _history(client, run.info.run_id, key)
        assert [s for s, _ in hist] == [2, 4], key
        assert all(0.0 <= v <= 1.0 for _, v in hist), key
    # artifacts: a panel per epoch (image | prediction | mask, 2 rows), the model and its ONNX export
    art = Path(run.info.artifact_uri.removeprefix("file://"))
    for epoch in (1, 2):
        panel = np.asarray(Image.open(art / "panels" / f"epoch_{epoch:03d}.png"))
        assert panel.shape == (2 * 128 + 2, 3 * 128 + 2 * 2, 3)
    assert (art / "onnx" / "fs-inproc.onnx").stat().st_size > 100_000
    versions = client.search_model_versions("name='tiny-fs'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run.info.run_id)] and out.model_version == "1"
    # registered in the ONNX flavour (BN-folded export + card, nothing pickled); models:/ runs as a model spec
    import onnxruntime as ort

    from cluster.predictor import Predictor
    logged = mlflow.onnx.load_model("models:/tiny-fs/1")
    final = load_weights(out.weights[0]).eval()
    x = torch.randn(1, 3, 64, 64)
    sess = ort.InferenceSession(logged.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], final.predict(x).numpy(), atol=1e-4)
    assert Predictor.load("models:/tiny-fs/latest").backend == "onnx"
    meta = read_metadata(out.weights[0])
    assert meta["best_epoch"] in (1, 2) and meta["mlflow_run_id"] == run.info.run_id
    assert read_metadata(out.weights[1])["dtype"] == "float16"
    assert meta["input_size"] == max(SIZES) and final.input_size == max(SIZES)   # the size to run it at

    # resubmit the same name with one more epoch: continues at epoch 3, step 5, in the same MLflow run
    cfg3 = load_train_config(_config(data, tmp_path, "fs-inproc", **{"optim.epochs": 3}))
    out3 = run_training(cfg3)
    assert out3.resumed_from == [2] and out3.metrics["epoch"] == 3 and out3.metrics["step"] == 6
    assert out3.mlflow_run_id == run.info.run_id and len(_runs(client, "fs-inproc")) == 1
    assert [s for s, _ in _history(client, run.info.run_id, S.TRAIN_LOSS)] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run.info.run_id).data.tags["changed.optim.epochs"] == "3"
    assert sorted(p.name for p in runs_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint_epoch=0003"]


def _teacher_spec(tmp: Path) -> str:
    torch.manual_seed(7)
    path = tmp / "teacher.pt"
    save_weights(create_model("scfnet_m3"), path)
    return f"scfnet_m3:{path}"


def _write_labels(data: dict, spec: str, out: Path) -> dict[str, np.ndarray]:
    """Label shards for all but the first image of unl_a, in shuffled order over two shards, plus one label
    whose id matches no image. Returns id -> uint8 label (48 x 48)."""
    teacher = build_teacher(spec, device="cpu", precision="fp32", input_size=64)
    paths = sorted(data["unl_a"].iterdir())[1:]
    keys = [p.name for p in paths] + ["not-here.jpg"]
    images = np.stack([resize(decode_image(p.read_bytes()), (64, 64)) for p in paths] + [np.zeros((64, 64, 3), np.uint8)])
    probs = teacher.predict(images)
    labels = [resize((p * 255 + 0.5).astype(np.uint8), (48, 48)) for p in probs]
    rows = [{S.ID: S.stable_id(k), S.KEY: k, S.SEQUENCE: "", S.FRAME: -1, S.ORIG_H: 64, S.ORIG_W: 64,
             S.TEACHER: teacher.id, S.WEIGHTS_HASH: teacher.weights_hash, S.TTA: "none", S.LABEL_H: 48,
             S.LABEL_W: 48, S.LABEL_PNG: encode_png(lab), S.CONF_MEAN: 0.5, S.CONF_FRAC: 0.5, S.FG_FRAC: 0.5}
            for k, lab in zip(keys, labels)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    fs = pafs.LocalFileSystem()
    for part in (order[:3], order[3:]):
        L.write_shard(fs, str(out), S.LABELS_DIR, pa.Table.from_pylist([rows[i] for i in part], schema=L.LABEL_SCHEMA))
    return {S.stable_id(k): lab for k, lab in zip(keys, labels)}


def test_distill_data_joins_offline_labels_by_id_and_labels_online(ray_cluster, data, tmp_path):
    spec = _teacher_spec(tmp_path)
    labels = _write_labels(data, spec, tmp_path / "label-out")
    cfg = load_train_config(_config(data, tmp_path, "kd-inproc", **{
        "mode": "distill",
        "data.paired": [{"uri": str(data["duts"]), "limit": 4}],
        "data.unlabeled": [{"uri": str(data["unl_a"]), "labels": str(tmp_path / "label-out")},
                           {"uri": str(data["unl_b"])}],
        "data.teacher": {"teachers": [spec], "teacher_size": 64, "pool": {"num_cpus": 0.25, "batch_size": 2}},
        "optim.epochs": 1, "optim.batch_size": 6, "mlflow.enabled": False}))
    td = build_train_dataset(cfg)
    # 6 images in unl_a, 5 with a label (the stray label is dropped), 4 online, 4 pairs
    assert td.counts == {"paired": 4, "offline": 5, "online": 4} and td.rows == 13
    rows = td.dataset.take_all()
    assert len(rows) == 13
    by_id = {r[S.ID]: r for r in rows}
    for id_, lab in labels.items():
        if id_ == S.stable_id("not-here.jpg"):
            assert id_ not in by_id
            continue
        r = by_id[id_]
        assert r[S.SOFT] and np.array_equal(r[S.TARGET], resize(lab, (LOAD, LOAD)))
    teacher = build_teacher(spec, device="cpu", precision="fp32", input_size=64)
    online = [r for r in rows if r[S.ID] in {S.stable_id(p.name) for p in data["unl_b"].iterdir()}]
    assert len(online) == 4
    for r in online:
        expected = teacher.predict(r[S.IMAGE][None])[0]   # the teacher resizes to 64 px and back to 80
        assert r[S.SOFT] and np.abs(r[S.TARGET].astype(float) - expected * 255).max() <= 1.0
    pairs = [r for r in rows if not r[S.SOFT]]
    assert len(pairs) == 4
    for r in pairs:
        stem = next(p.stem for p in (data["duts"] / "images").iterdir() if S.stable_id(f"images/{p.name}") == r[S.ID])
        mask = decode_mask((data["duts"] / "masks" / f"{stem}.png").read_bytes())
        assert np.array_equal(r[S.TARGET], resize(mask, (LOAD, LOAD)))
    out = run_training(cfg)   # the mixed pipeline (pairs + offline + online teacher pool) trains
    assert out.rows == 13 and out.steps_per_epoch == 2 and np.isfinite(out.metrics[S.TRAIN_LOSS])


def test_cached_rows_come_in_a_new_block_order_every_epoch(ray_cluster, data, tmp_path):
    """Sources in their stored order (one folder after another) would give each stretch of an epoch one source
    only; the cached blocks are drawn in a fresh order per execution, the way Ray Train iterates epochs."""
    duts_ids = {S.stable_id(f"images/{p.name}") for p in (data["duts"] / "images").iterdir()}

    def epochs(**over) -> list[list[str]]:
        cfg = load_train_config(_config(data, tmp_path, "order", **{
            "data.paired": [{"uri": str(data["duts"])}, {"uri": str(data["ecssd"])}],
            "data.shuffle_block_rows": 1, "mlflow.enabled": False, **over}))
        it = build_train_dataset(cfg).dataset.streaming_split(1)[0]
        return [[r[S.ID] for r in it.iter_rows()] for _ in range(3)]

    shuffled = epochs()
    assert all(len(e) == 12 and sorted(e) == sorted(shuffled[0]) for e in shuffled)   # every row once per epoch
    assert len({tuple(e) for e in shuffled}) == 3                                      # a new order each epoch
    assert any(set(e[:8]) != duts_ids for e in shuffled)                               # the sources interleave
    stored = epochs(**{"data.shuffle_blocks": False})
    assert len({tuple(e) for e in stored}) == 1 and set(stored[0][:8]) == duts_ids     # off: folder after folder


def test_two_gloo_workers_resume_on_s3(ray_cluster, data, tmp_path, s3_endpoint):
    """Two DDP workers (gloo), checkpoints in a bucket: stop after 1 epoch, resubmit with 2 -> continues."""
    over = {"scaling.num_workers": 2, "run.storage": f"s3://{BUCKET}/runs", "s3.endpoint_url": s3_endpoint,
            "optim.epochs": 1, "val.panel": 0}
    out1 = run_training(load_train_config(_config(data, tmp_path, "ddp2", **over)))
    assert (out1.rows, out1.steps_per_epoch, out1.metrics["epoch"]) == (8, 2, 1)
    assert out1.checkpoint.startswith(f"s3://{BUCKET}/runs/ddp2/checkpoint_")
    s3 = boto3_client(S3Config(endpoint_url=s3_endpoint))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/ddp2/")["Contents"]]
    assert any(k.endswith("/meta.json") for k in keys) and any(k.endswith("/best.pt") for k in keys)

    # the second submission also calibrates the output on the validation pairs before writing the files
    out2 = run_training(load_train_config(_config(data, tmp_path, "ddp2", **{**over, "optim.epochs": 2,
                                                                            "output.calibrate": True})))
    assert out2.resumed_from == [1] and out2.metrics["epoch"] == 2 and out2.metrics["step"] == 4
    meta = read_metadata(out2.weights[0])
    cal = meta["calibration"]
    assert meta["output_scale"] == cal["scale"] >= 1 and cal["pairs"] == 4 and cal["val"] == str(data["ecssd"])
    assert cal["mae_after"] <= cal["mae_before"] and cal["sm_after"] >= cal["sm_before"] - 0.005
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = _runs(client, "ddp2")
    assert len(runs) == 1 and runs[0].info.run_id == out1.mlflow_run_id == out2.mlflow_run_id
    # exactly one point per step although two workers trained: rank 0 alone logs
    assert [s for s, _ in _history(client, out2.mlflow_run_id, S.TRAIN_LOSS)] == [1, 2, 3, 4]
    assert [s for s, _ in _history(client, out2.mlflow_run_id, S.VAL_MAE)] == [2, 4]
    assert _history(client, out2.mlflow_run_id, "calibration/scale") == [(0, cal["scale"])]


def test_deepspeed_zero2_worker_killed_finishes_from_checkpoint(ray_cluster, data, tmp_path):
    """DeepSpeed ZeRO-2 on CPU with the torch SGD optimizer; rank 1 exits at step 3 (epoch 2) once;
    FailureConfig restarts the group, which resumes from the epoch-1 checkpoint (ZeRO partitions included)."""
    marker = tmp_path / "failed-once"
    over = {"scaling.num_workers": 2, "scaling.strategy": "deepspeed", "scaling.zero_stage": 2,
            "run.max_failures": 1, "debug.fail_at_step": 3, "debug.fail_marker": str(marker), "debug.fail_rank": 1,
            "debug.fail_after_s": 10.0,
            "val.panel": 0}
    out = run_training(load_train_config(_config(data, tmp_path, "ds2", **over)))
    assert marker.read_text().startswith("worker rank 1 exited at step 3")
    assert out.resumed_from == [1] and out.metrics["epoch"] == 2 and out.metrics["step"] == 4
    ckpt = Path(out.checkpoint)
    shards = sorted(p.name for p in (ckpt / "ds" / "state").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert json.loads((ckpt / "meta.json").read_text())["resumed_from"] == [1]
    model = load_weights(out.weights[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
