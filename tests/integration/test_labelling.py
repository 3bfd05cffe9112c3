"""The labelling job end to end on real Ray (local, 2 CPUs), a real S3 endpoint (moto's ThreadedMotoServer on
127.0.0.1), a real MLflow sqlite store and real images from ../shared/data.

The teacher is a randomly initialised ``scfnet_r18`` saved with ``save_weights`` (labels are checked against the
same teacher run in-process, so they need not be meaningful); it runs at 128 px and stores 64 px labels so the
file stays well under two minutes on two cores.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster import labels as L
from cluster.label import DecodeConfig, LabelConfig, ReviewConfig, WriteConfig, run_labelling
from cluster.raypool import PoolConfig
from cluster.storage import S3Config, boto3_client
from cluster.teachers import EnsembleConfig, build_teacher, weights_hash
from cluster.tracking import TrackingConfig
from kd import schema as S
from kd.imageio import decode_image, resize
from models import create_model, save_weights

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEACHER_SIZE = 128
LABEL_SIZE = 64
BUCKET = "sodkd-test"


@pytest.fixture(scope="module")
def ray_address(s3_endpoint):
    import ray
    info = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                    log_to_driver=False)
    yield info.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "r18.pt"
    save_weights(create_model("scfnet_r18"), path)
    return f"scfnet_r18:{path}", path


def _images(shared_data, n: int, start: int = 0) -> list[Path]:
    return sorted((shared_data / "unlabeled" / "imagenet-1k").glob("*.jpg"))[start:start + n]


def _copy(paths, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, dst / p.name)
    return dst


def _cfg(inp, out, teacher_spec, **kw) -> LabelConfig:
    base = dict(input=str(inp), output=str(out), teachers=(teacher_spec,), teacher_size=TEACHER_SIZE,
                label_size=LABEL_SIZE, progress=False, tracking=TrackingConfig(enabled=False),
                pool=PoolConfig(size=1, num_cpus=0.5, batch_size=4, torch_threads=2),
                decode=DecodeConfig(num_cpus=0.25, batch_size=4), write=WriteConfig(num_cpus=0.25, shard_rows=4))
    base.update(kw)
    return LabelConfig(**base)


def _review(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _raw_rows(fs, root, kind=S.LABELS_DIR) -> list[dict]:
    """Every row of every shard, NOT deduplicated: what "exactly once" is checked on."""
    rows = []
    for p in L.shard_paths(fs, root, kind):
        rows.extend(pq.read_table(p, filesystem=fs).to_pylist())
    return rows


def _assert_exactly_once(fs, root, keys):
    rows = _raw_rows(fs, root) + _raw_rows(fs, root, S.REJECTS_DIR)
    counts = collections.Counter(r[S.ID] for r in rows)
    assert set(counts) == {S.stable_id(k) for k in keys}
    dupes = {i: c for i, c in counts.items() if c != 1}
    assert not dupes, f"ids written more than once: {dupes}"


def test_local_folder_to_parquet_then_rerun_labels_nothing(ray_address, teacher, shared_data, tmp_path):
    spec, path = teacher
    src = _images(shared_data, 8)
    inp = _copy(src, tmp_path / "in")
    out = tmp_path / "out"
    db = tmp_path / "mlflow.db"
    tracking = TrackingConfig(uri=f"sqlite:///{db}", experiment="label-test",
                              artifact_location=str(tmp_path / "artifacts"))
    summary = run_labelling(_cfg(inp, out, spec, tracking=tracking), samples=3)
    assert (summary.total, summary.labelled, summary.rejected, summary.skipped_done) == (8, 8, 0, 0)
    assert summary.images_per_s > 0

    table = L.read_labels(str(out))
    assert table.num_rows == 8 and table.schema == L.LABEL_SCHEMA
    rows = {r[S.KEY]: r for r in table.to_pylist()}
    assert set(rows) == {p.name for p in src}
    ref_teacher = build_teacher(spec, input_size=TEACHER_SIZE, device="cpu")
    for p in src[:3]:
        row = rows[p.name]
        with Image.open(p) as im:
            assert (row[S.ORIG_H], row[S.ORIG_W]) == (im.height, im.width)
        assert row[S.ID] == S.stable_id(p.name)
        assert (row[S.TEACHER], row[S.WEIGHTS_HASH], row[S.TTA]) == ("scfnet_r18", weights_hash(path.read_bytes()),
                                                                     "none")
        label = L.decode_label(row)
        assert label.shape == (LABEL_SIZE, LABEL_SIZE)
        # the same teacher run in this process on the same decoded image gives the same label
        image = resize(decode_image(p.read_bytes(), max_side=TEACHER_SIZE), (TEACHER_SIZE, TEACHER_SIZE))
        prob = ref_teacher.predict(image[None])[0]
        expected = np.asarray(Image.fromarray(prob, "F").resize((LABEL_SIZE, LABEL_SIZE), Image.BILINEAR))
        assert np.abs(label - expected).max() <= 1.5 / 255
        assert np.isclose(row[S.CONF_MEAN], np.abs(2 * prob - 1).mean(), atol=0.02)
        assert 0.0 <= row[S.CONF_FRAC] <= 1.0 and 0.0 <= row[S.FG_FRAC] <= 1.0

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["teachers"] == str([spec]) and run.data.params["pool.batch_size"] == "4"
    assert run.data.params["label_size"] == str(LABEL_SIZE)
    assert run.data.metrics["label/labelled"] == 8 and run.data.metrics["label/skipped_done"] == 0
    assert run.data.metrics["label/images_per_s"] > 0
    assert run.data.tags["teacher"] == "scfnet_r18" and run.data.tags["weights_hash"] == weights_hash(path.read_bytes())
    picture = Path(client.download_artifacts(summary.run_id, "samples/labels.png", str(tmp_path / "dl")))
    with Image.open(picture) as im:
        assert im.format == "PNG" and im.width > 100

    # the review list: every labelled image, worst first; one teacher, one view: score = 1 - conf_mean
    review = _review(out / S.REVIEW_FILE)
    assert [r["key"] for r in review] and {r["key"] for r in review} == set(rows)
    assert [int(r["rank"]) for r in review] == list(range(1, 9))
    scores = [float(r["score"]) for r in review]
    assert scores == sorted(scores, reverse=True)
    assert all(r["disagreement"] == "" and np.isclose(float(r["score"]), 1 - rows[r["key"]][S.CONF_MEAN], atol=1e-5)
               for r in review)
    artifacts = {a.path for a in client.list_artifacts(summary.run_id, "review")}
    assert artifacts == {"review/worst.png", f"review/{S.REVIEW_FILE}"}
    sheet = Path(client.download_artifacts(summary.run_id, "review/worst.png", str(tmp_path / "dl")))
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 100
    logged = Path(client.download_artifacts(summary.run_id, f"review/{S.REVIEW_FILE}", str(tmp_path / "dl")))
    assert logged.read_text() == (out / S.REVIEW_FILE).read_text()

    shards_before = sorted(os.listdir(out / S.LABELS_DIR))
    again = run_labelling(_cfg(inp, out, spec, tracking=tracking, review=ReviewConfig(top=3, sheet=0)), samples=0)
    assert (again.labelled, again.rejected, again.skipped_done) == (0, 0, 8)
    assert sorted(os.listdir(out / S.LABELS_DIR)) == shards_before
    assert client.get_run(again.run_id).data.metrics["label/skipped_done"] == 8
    # a run that labels nothing still rewrites the list from the earlier runs' shards (here the worst 3)
    assert _review(out / S.REVIEW_FILE) == review[:3]
    assert {a.path for a in client.list_artifacts(again.run_id, "review")} == {f"review/{S.REVIEW_FILE}"}
    _assert_exactly_once(pafs.LocalFileSystem(), str(out), [p.name for p in src])


def test_video_frame_folders_with_an_ensemble_and_tta(ray_address, teacher, shared_data, tmp_path):
    spec, _ = teacher
    torch.manual_seed(1)
    save_weights(create_model("scfnet_m3"), tmp_path / "m3.pt")
    specs = (spec, f"scfnet_m3:{tmp_path / 'm3.pt'}")
    davis = shared_data / "davis2016-dev"
    seqs = sorted(p.name for p in davis.iterdir() if p.is_dir())[:2]
    for s in seqs:
        _copy(sorted((davis / s / "images").glob("*.jpg"))[:3], tmp_path / "v" / s / "images")
        _copy(sorted((davis / s / "masks").glob("*.png"))[:3], tmp_path / "v" / s / "masks")
    summary = run_labelling(_cfg(tmp_path / "v", tmp_path / "out", spec, teachers=specs, tta="hflip"), samples=0)
    assert summary.layout == "video" and summary.labelled == 6   # masks are not inputs
    rows = L.read_labels(str(tmp_path / "out")).to_pylist()
    got = sorted((r[S.SEQUENCE], r[S.FRAME], r[S.KEY]) for r in rows)
    assert got == [(s, f, f"{s}/images/{f:05d}.jpg") for s in seqs for f in range(3)]
    ensemble = build_teacher(list(specs), tta="hflip", input_size=TEACHER_SIZE, device="cpu")
    assert {(r[S.TEACHER], r[S.WEIGHTS_HASH], r[S.TTA]) for r in rows} == {
        ("ensemble(scfnet_r18,scfnet_m3)", ensemble.weights_hash, "hflip")}
    # two members x two flips: every frame has a disagreement, and the review list ranks by it
    assert all(np.isfinite(r[S.DISAGREEMENT]) and r[S.DISAGREEMENT] > 0 for r in rows)
    review = _review(tmp_path / "out" / S.REVIEW_FILE)
    dis = {r[S.KEY]: r[S.DISAGREEMENT] for r in rows}
    assert len(review) == 6 and all(np.isclose(float(r["score"]), dis[r["key"]], rtol=1e-5) for r in review)
    assert [float(r["score"]) for r in review] == sorted((float(r["score"]) for r in review), reverse=True)
    row = rows[0]
    image = resize(decode_image((tmp_path / "v" / row[S.KEY]).read_bytes(), max_side=TEACHER_SIZE),
                   (TEACHER_SIZE, TEACHER_SIZE))
    prob = ensemble.predict(image[None])[0]
    expected = np.asarray(Image.fromarray(prob, "F").resize((LABEL_SIZE, LABEL_SIZE), Image.BILINEAR))
    assert np.abs(L.decode_label(row) - expected).max() <= 1.5 / 255


def test_a_second_round_teacher_blends_teacher_and_student_in_logit_space(ray_address, teacher, shared_data,
                                                                          tmp_path):
    # the label job's config for a second-round teacher: the teacher and a student of it, weighted in logit space
    spec, _ = teacher
    torch.manual_seed(3)
    save_weights(create_model("scfnet_m3"), tmp_path / "student.pt")
    specs = (spec, f"scfnet_m3:{tmp_path / 'student.pt'}")
    src = _copy(_images(shared_data, 3, start=40), tmp_path / "in")
    how = EnsembleConfig(combine="logit", weights=(0.8, 0.2))
    summary = run_labelling(_cfg(src, tmp_path / "out", spec, teachers=specs, tta="hflip", ensemble=how), samples=0)
    assert summary.labelled == 3
    rows = L.read_labels(str(tmp_path / "out")).to_pylist()
    plain = build_teacher(list(specs), tta="hflip", input_size=TEACHER_SIZE, device="cpu")
    assert {(r[S.TEACHER], r[S.TTA]) for r in rows} == {("ensemble[logit;0.8,0.2](scfnet_r18,scfnet_m3)", "hflip")}
    assert {r[S.WEIGHTS_HASH] for r in rows} == {build_teacher(list(specs), tta="hflip", input_size=TEACHER_SIZE,
                                                               device="cpu", ensemble=how).weights_hash}
    assert plain.weights_hash not in {r[S.WEIGHTS_HASH] for r in rows}
    # each member on its own, flip-averaged, then blended here: sigmoid(0.8 logit(t) + 0.2 logit(s))
    members = [build_teacher(s, tta="hflip", input_size=TEACHER_SIZE, device="cpu") for s in specs]
    for row in rows:
        image = resize(decode_image((src / row[S.KEY]).read_bytes(), max_side=TEACHER_SIZE),
                       (TEACHER_SIZE, TEACHER_SIZE))
        z = [np.log(np.clip(p, 1e-4, 1 - 1e-4) / (1 - np.clip(p, 1e-4, 1 - 1e-4)))
             for p in (m.predict(image[None])[0].astype(np.float64) for m in members)]
        prob = (1 / (1 + np.exp(-(0.8 * z[0] + 0.2 * z[1])))).astype(np.float32)
        expected = np.asarray(Image.fromarray(prob, "F").resize((LABEL_SIZE, LABEL_SIZE), Image.BILINEAR))
        assert np.abs(L.decode_label(row) - expected).max() <= 1.5 / 255
        assert np.isfinite(row[S.DISAGREEMENT]) and row[S.DISAGREEMENT] > 0


def test_s3_input_to_parquet_in_the_same_bucket(ray_address, teacher, shared_data, s3_endpoint):
    spec, _ = teacher
    s3 = S3Config(endpoint_url=s3_endpoint)
    client = boto3_client(s3)
    client.create_bucket(Bucket=BUCKET)
    src = _images(shared_data, 6, start=20)
    for p in src:
        client.put_object(Bucket=BUCKET, Key=f"unlabeled/{p.name}", Body=p.read_bytes())
    out = f"s3://{BUCKET}/runs/r18"
    autoscaling = PoolConfig(size=None, min_size=1, max_size=2, num_cpus=0.5, batch_size=2, torch_threads=1)
    in_tasks = DecodeConfig(num_cpus=0.25, batch_size=2, placement="tasks")
    summary = run_labelling(_cfg(f"s3://{BUCKET}/unlabeled", out, spec, s3=s3, pool=autoscaling, decode=in_tasks),
                            samples=0)
    assert (summary.labelled, summary.rejected) == (6, 0)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/r18/")["Contents"]]
    # nothing but complete shards and the review list: no directory markers, no temporaries
    assert f"runs/r18/{S.REVIEW_FILE}" in keys
    keys.remove(f"runs/r18/{S.REVIEW_FILE}")
    assert keys and all(k.startswith("runs/r18/labels/part-") and k.endswith(".parquet") for k in keys)
    review = client.get_object(Bucket=BUCKET, Key=f"runs/r18/{S.REVIEW_FILE}")["Body"].read().decode()
    assert review.splitlines()[0] == "rank,key,score,conf_mean,disagreement" and len(review.splitlines()) == 7
    table = L.read_labels(out, s3)
    assert sorted(table.column(S.KEY).to_pylist()) == sorted(p.name for p in src)
    assert all(L.decode_label(r).shape == (LABEL_SIZE, LABEL_SIZE) for r in table.to_pylist())
    again = run_labelling(_cfg(f"s3://{BUCKET}/unlabeled", out, spec, s3=s3), samples=0)
    assert (again.labelled, again.skipped_done) == (0, 6)


def test_views_of_a_labelled_bucket_are_written_resumed_and_labelled(ray_address, teacher, shared_data,
                                                                    s3_endpoint, tmp_path):
    """`sodkd views` (the real CLI) on a bucket and its labels: zoom and paste views from real pixels, a corrupt
    image skipped and listed, a rerun that writes nothing, and the views labelled by the same job as any pool."""
    from cli_helpers import sodkd    # tests/cli_helpers.py (tests/ is on sys.path, as for conftest)
    spec, _ = teacher
    s3 = S3Config(endpoint_url=s3_endpoint)
    client = boto3_client(s3)
    bucket = "sodkd-views"
    client.create_bucket(Bucket=bucket)
    src = _images(shared_data, 5, start=40)
    for p in src:
        client.put_object(Bucket=bucket, Key=f"pool/{p.name}", Body=p.read_bytes())
    client.put_object(Bucket=bucket, Key="pool/zz-broken.jpg", Body=b"\xff\xd8 not a jpeg")
    summary = run_labelling(_cfg(f"s3://{bucket}/pool", f"s3://{bucket}/pool-labels", spec, s3=s3), samples=0)
    assert (summary.labelled, summary.rejected) == (5, 1)

    # a random teacher's maps are faint: take every label as an object map, cut at 0.45 (its top pixels)
    argv = ["views", "--input", f"s3://{bucket}/pool", "--labels", f"s3://{bucket}/pool-labels",
            "--output", f"s3://{bucket}/views", "--count", "12", "--seed", "3", "objects.min_fg=0",
            "objects.max_fg=1", "objects.min_conf=0", "view.alpha_cut=0.45", "sheet=8",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=views-test"]
    env = {"AWS_ENDPOINT_URL": s3_endpoint}
    out = sodkd(*argv, tmp=tmp_path, env=env)
    assert out.returncode == 1, out.stderr             # the broken image was drawn, skipped and listed
    assert "12 written, 0 already there" in out.stdout and "1 unreadable" in out.stdout, out.stdout
    # the MLflow run: counts as metrics, the draw's settings as params, sources and a contact sheet
    ml = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = re.search(r"mlflow run (\w+)", out.stdout).group(1)
    run = ml.get_run(run_id)
    m = run.data.metrics
    assert (m["views/written"], m["views/existing"], m["views/rejected"], m["views/pool"]) == (12, 0, 1, 6), m
    assert m["views/kind.zoom"] + m["views/kind.paste"] == 12
    assert run.data.params["job.seed"] == "3" and run.data.params["view.alpha_cut"] == "0.45"
    arts = {a.path for a in ml.list_artifacts(run_id, "views")}
    assert arts == {"views/sources.csv", "views/rejects.csv", "views/sheet.png"}, arts
    sheet = Image.open(ml.download_artifacts(run_id, "views/sheet.png", str(tmp_path)))
    assert sheet.size[0] > 400 and np.asarray(sheet.convert("L")).std() > 10     # a picture, not a blank page
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="views/")["Contents"])
    views = [k for k in keys if k.endswith(".jpg")]
    assert len(views) == 12 and keys == sorted(views + ["views/rejects.csv", "views/sources.csv"])
    rejects = client.get_object(Bucket=bucket, Key="views/rejects.csv")["Body"].read().decode().splitlines()
    assert rejects[0] == "key,reason" and len(rejects) == 2 and rejects[1].startswith("zz-broken.jpg,")
    rows = list(csv.DictReader(io.StringIO(
        client.get_object(Bucket=bucket, Key="views/sources.csv")["Body"].read().decode())))
    assert sorted(r["view"] for r in rows) == [k[len("views/"):] for k in views]
    kinds = collections.Counter(r["kind"] for r in rows)
    assert set(kinds) == {"zoom", "paste"}, kinds
    pool = {p.name: decode_image(p.read_bytes()) for p in src}
    for r in rows:
        used = r["sources"].split()
        assert len(used) == (2 if r["kind"] == "paste" else 1) and set(used) <= set(pool)
        view = decode_image(client.get_object(Bucket=bucket, Key=f"views/{r['view']}")["Body"].read())
        if r["kind"] == "paste":
            assert view.shape == pool[used[0]].shape    # B's object on A: A's frame
        else:
            h, w = view.shape[:2]
            a = pool[used[0]]
            assert h * w < a.shape[0] * a.shape[1] and h <= a.shape[0] and w <= a.shape[1]

    again = sodkd(*argv, tmp=tmp_path, env=env)
    assert "0 written, 12 already there" in again.stdout, again.stdout
    labelled = run_labelling(_cfg(f"s3://{bucket}/views", f"s3://{bucket}/views-labels", spec, s3=s3), samples=0)
    assert (labelled.labelled, labelled.rejected) == (12, 0)     # sources.csv and rejects.csv are not images


def test_limit_labels_part_then_the_rest_exactly_once(ray_address, teacher, shared_data, tmp_path):
    spec, _ = teacher
    src = _images(shared_data, 7, start=40)
    inp = _copy(src, tmp_path / "in")
    first = run_labelling(_cfg(inp, tmp_path / "out", spec, limit=3), samples=0)
    assert (first.labelled, first.deferred) == (3, 4)
    in_tasks = DecodeConfig(num_cpus=0.25, batch_size=4, placement="tasks")  # the rest decoded in CPU tasks
    rest = run_labelling(_cfg(inp, tmp_path / "out", spec, decode=in_tasks), samples=0)
    assert (rest.labelled, rest.skipped_done) == (4, 3)
    _assert_exactly_once(pafs.LocalFileSystem(), str(tmp_path / "out"), [p.name for p in src])


def test_a_listing_past_the_inline_limit_streams_through_the_object_store_exactly_once(
        ray_address, teacher, shared_data, s3_endpoint, monkeypatch):
    """The driver plans a listing a chunk at a time and, past ``_INLINE_ROWS`` inputs, hands them to Ray's object
    store in ``_BLOCK_ROWS`` blocks (limits made tiny here: 11 keys on S3 in nested prefixes, chunks of 4)."""
    from cluster.label import plan as label_plan
    from cluster.storage import get_filesystem
    monkeypatch.setattr(label_plan, "_ID_CHUNK", 4)
    monkeypatch.setattr(label_plan, "_INLINE_ROWS", 5)
    monkeypatch.setattr(label_plan, "_BLOCK_ROWS", 3)
    spec, _ = teacher
    s3 = S3Config(endpoint_url=s3_endpoint)
    client = boto3_client(s3)
    client.create_bucket(Bucket="sodkd-stream")
    src = _images(shared_data, 11, start=60)
    keys = [f"{'a/b' if i % 3 == 0 else 'a-b' if i % 3 == 1 else 'a0'}/{p.name}" for i, p in enumerate(src)]
    for k, p in zip(keys, src):
        client.put_object(Bucket="sodkd-stream", Key=f"in/{k}", Body=p.read_bytes())
    client.put_object(Bucket="sodkd-stream", Key="in/notes.txt", Body=b"not an image")
    cfg = _cfg("s3://sodkd-stream/in", "s3://sodkd-stream/out", spec, s3=s3, limit=8)
    blocks: list[int] = []
    plan = label_plan.plan_run(cfg, *get_filesystem(cfg.output, s3), put=lambda t: blocks.append(t.num_rows) or t)
    assert (plan.total, plan.blocks.rows, plan.deferred, plan.ignored) == (11, 8, 3, {".txt": 1})
    assert blocks == [3, 3] and len(plan.blocks.pending) == 2   # spilled once past 5; 2 wait for the last block
    first = run_labelling(cfg, samples=0)
    assert (first.labelled, first.deferred, first.total, first.ignored) == (8, 3, 11, {".txt": 1})
    rest = run_labelling(_cfg("s3://sodkd-stream/in", "s3://sodkd-stream/out", spec, s3=s3), samples=0)
    assert (rest.labelled, rest.skipped_done) == (3, 8)
    table = L.read_labels("s3://sodkd-stream/out", s3)
    assert sorted(table.column(S.KEY).to_pylist()) == sorted(keys)
    assert len(table) == 11


def _shards(out: Path) -> list[str]:
    """Finished label shards (not the hidden temporaries a shard is written to before its rename)."""
    d = out / S.LABELS_DIR
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if d.is_dir() else []


def test_killed_run_then_rerun_labels_every_input_exactly_once(ray_address, teacher, shared_data, tmp_path):
    """A real kill: the job runs as `sodkd label` in its own process group (a driver attached to this module's
    Ray cluster) and gets SIGKILL as soon as its first shards appear; the rerun finishes the rest, and marks the
    killed job's MLflow run (left RUNNING by the kill) KILLED."""
    spec, _ = teacher
    db = tmp_path / "mlflow.db"
    tracking = TrackingConfig(uri=f"sqlite:///{db}", experiment="kill-test", run_name="label")
    n = 40
    src = _images(shared_data, n, start=100)
    inp = _copy(src, tmp_path / "in")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.cli", "label", "--input", str(inp), "--output", str(out), "--teacher", spec,
           f"teacher_size={TEACHER_SIZE}", f"label_size={LABEL_SIZE}", "pool.num_cpus=0.5", "pool.batch_size=2",
           "pool.torch_threads=2", "decode.batch_size=2", "decode.num_cpus=0.25", "write.shard_rows=2",
           "progress=false", f"tracking.uri={tracking.uri}", f"tracking.experiment={tracking.experiment}"]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "job.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600    # MLflow creates its sqlite tables first: a minute on a busy machine
        while not _shards(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"the job ended before it could be killed:\n{(tmp_path / 'job.log').read_text()}"
        assert _shards(out), f"no shard within 600 s:\n{(tmp_path / 'job.log').read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    # Ray ends the dead driver's workers; wait until no shard has appeared for 3 s
    stable_since, seen = time.monotonic(), _shards(out)
    while time.monotonic() - stable_since < 3:
        time.sleep(0.2)
        if _shards(out) != seen:
            stable_since, seen = time.monotonic(), _shards(out)
    fs = pafs.LocalFileSystem()
    done_before = len(_raw_rows(fs, str(out)))
    assert 0 < done_before < n, f"kill landed after {done_before} of {n} images"

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    killed = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in killed] == ["RUNNING"]     # what a SIGKILL leaves behind

    summary = run_labelling(_cfg(inp, out, spec, tracking=tracking), samples=0)
    assert summary.skipped_done == done_before
    assert summary.labelled == n - done_before
    _assert_exactly_once(fs, str(out), [p.name for p in src])
    assert L.read_labels(str(out)).num_rows == n
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    dead = runs[killed[0].info.run_id]
    assert dead.info.status == "KILLED" and dead.data.tags["sodkd.ended_by"] == "rerun"
    assert runs[summary.run_id].info.status == "FINISHED"
    assert dead.data.tags["sodkd.output"] == runs[summary.run_id].data.tags["sodkd.output"] == str(out)


def _broken_inputs(real: bytes, d: Path) -> dict[str, str | None]:
    """Write every broken kind into ``d``; return name -> expected reject reason (None = converted, labelled)."""
    d.mkdir(parents=True)
    rgb = Image.open(io.BytesIO(real)).convert("RGB")

    def save(img, name, fmt, **kw):
        img.save(d / name, fmt, **kw)

    (d / "empty.jpg").write_bytes(b"")
    (d / "not_an_image.png").write_bytes(b"name,score\nfoo,1\n" * 20)
    (d / "truncated.jpg").write_bytes(real[: len(real) // 2])
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    png = bytearray(buf.getvalue())
    idat = png.index(b"IDAT")
    png[idat + 100: idat + 164] = bytes(b ^ 0xFF for b in png[idat + 100: idat + 164])
    (d / "corrupt.png").write_bytes(bytes(png))
    save(rgb.convert("CMYK"), "cmyk.jpg", "JPEG")
    save(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "gray16.png", "PNG")
    save(rgb.convert("P"), "palette.png", "PNG")
    save(rgb.convert("L"), "grayscale.jpg", "JPEG")
    save(rgb.convert("RGBA"), "rgba.png", "PNG")
    save(Image.new("L", (10000, 7500), 128), "large.jpg", "JPEG")      # 75 MP: decoded at 1/8 via draft
    save(Image.new("1", (11000, 10000), 1), "huge.png", "PNG")         # 110 MP: over the pixel limit
    return {"empty.jpg": "empty", "not_an_image.png": "not_an_image", "truncated.jpg": "truncated",
            "corrupt.png": "corrupt", "huge.png": "too_large", "cmyk.jpg": None, "gray16.png": None,
            "palette.png": None, "grayscale.jpg": None, "rgba.png": None, "large.jpg": None}


def test_broken_and_unusual_images_are_converted_or_rejected(ray_address, teacher, shared_data, tmp_path):
    spec, _ = teacher
    real = _images(shared_data, 2, start=60)
    inp = tmp_path / "in"
    expected = _broken_inputs(real[0].read_bytes(), inp)
    _copy(real, inp)
    expected.update({p.name: None for p in real})
    summary = run_labelling(_cfg(inp, tmp_path / "out", spec), samples=0)
    want_rejected = {k: v for k, v in expected.items() if v}
    assert summary.rejected == len(want_rejected) and summary.labelled == len(expected) - len(want_rejected)
    assert summary.reasons == dict(collections.Counter(want_rejected.values()))
    rejects = {r[S.KEY]: r for r in L.read_rejects(str(tmp_path / "out")).to_pylist()}
    assert {k: r[S.REASON] for k, r in rejects.items()} == want_rejected
    assert all(r[S.DETAIL] and r[S.ID] == S.stable_id(k) for k, r in rejects.items())
    labelled = {r[S.KEY]: r for r in L.read_labels(str(tmp_path / "out")).to_pylist()}
    assert set(labelled) == {k for k, v in expected.items() if v is None}
    assert (labelled["large.jpg"][S.ORIG_H], labelled["large.jpg"][S.ORIG_W]) == (7500, 10000)
    with Image.open(real[0]) as im:
        for name in ("cmyk.jpg", "gray16.png", "palette.png", "grayscale.jpg", "rgba.png"):
            assert (labelled[name][S.ORIG_H], labelled[name][S.ORIG_W]) == (im.height, im.width), name
    assert all(L.decode_label(r).shape == (LABEL_SIZE, LABEL_SIZE) for r in labelled.values())
    again = run_labelling(_cfg(inp, tmp_path / "out", spec), samples=0)
    assert (again.labelled, again.rejected, again.skipped_done) == (0, 0, len(expected))
