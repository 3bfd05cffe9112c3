"""`sodkd local up` + `sodkd submit`: jobs reach the stack exactly as they would reach a cluster on AWS.

A labelling job and a distillation job are submitted through the Ray Jobs API; the labels must then be in
the stack's S3 endpoint and both runs in its MLflow server.

Canaries (issue 13, item 4): the stack's own secret key (which the jobs do use, through the stack's private
credentials file) and a second pair of AWS keys and a password set in the submitting shell (which must not be
forwarded at all) are then searched for in ``ray job list``, the Jobs API's job info, every file under the
stack's folder and Ray's session folder (logs included), and MLflow's params, tags and artifacts: zero hits.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from cluster import local
from models import create_model, save_weights

REPO = Path(__file__).resolve().parents[2]
SODKD = [sys.executable, "-m", "jobs.cli"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    state = local.up(d, num_cpus=2, log=lambda *_: None)
    try:
        yield state
    finally:
        local.down(d, log=lambda *_: None)


def _sodkd(args, env, timeout=900):
    res = subprocess.run(SODKD + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"sodkd {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


# made at run time: a value written in this file would be found in the job's uploaded working directory
SHELL_CANARIES = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
                  "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30), "DB_PASSWORD": secrets.token_urlsafe(16)}


def _files_holding(root: Path, needles: list[str], skip: set[Path]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p in skip or not p.is_file() or p.is_symlink():
            continue
        try:
            data = p.read_bytes()
        except OSError:        # a socket or a file removed while listing
            continue
        hits += [f"{p}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


def test_label_and_distill_jobs_through_submit(stack, shared_data, tmp_path):
    env = {**stack.client_env(), **SHELL_CANARIES}   # a user's shell with keys of its own and a password
    s3 = stack.s3_client()
    secret = local.read_credentials(Path(stack.dir))["aws_secret_access_key"]
    images = sorted((shared_data / "unlabeled" / "imagenet-1k").glob("*.jpg"))[:6]
    for p in images:
        s3.upload_file(str(p), local.LOCAL_BUCKET, f"unlabeled/{p.name}")
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    save_weights(create_model("scfnet_m3"), teacher)
    s3.upload_file(str(teacher), local.LOCAL_BUCKET, "weights/teacher.pt")

    out = _sodkd(["submit", "label", "--input", "s3://sodkd/unlabeled", "--output", "s3://sodkd/soft",
                  "--teacher", "scfnet_m3:s3://sodkd/weights/teacher.pt", "teacher_size=96", "label_size=96",
                  "pool.num_cpus=0.5", "progress=false", "tracking.run_name=submitted-label"], env)
    assert "SUCCEEDED" in out and "labelled 6" in out, out[-3000:]
    assert secret not in out  # credentials travel, never printed
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="sodkd", Prefix="soft/labels/")["Contents"]]
    assert keys and all(k.endswith(".parquet") for k in keys)

    out = _sodkd(["submit", "distill", "--unlabeled", "s3://sodkd/unlabeled", "--labels", "s3://sodkd/soft",
                  "--name", "submitted-kd", "--storage", str(tmp_path / "runs"),
                  "optim.epochs=1", "optim.batch_size=4", "data.load_size=64", "data.sizes=[64]",
                  "scaling.num_workers=1", "scaling.cpus_per_worker=0.5",
                  "mlflow.onnx=false", f"output.dir={tmp_path / 'w'}"], env)
    assert "SUCCEEDED" in out, out[-3000:]
    assert (tmp_path / "w" / "submitted-kd.pt").is_file()

    client_ml = client = mlflow.MlflowClient(stack.mlflow_uri)
    runs = {r.info.run_name: r for exp in client.search_experiments()
            for r in client.search_runs([exp.experiment_id])}
    assert {"submitted-label", "submitted-kd"} <= set(runs), sorted(runs)  # distill runs are named after run.name
    assert runs["submitted-label"].data.metrics["label/labelled"] == 6
    kd_metrics = runs["submitted-kd"].data.metrics
    assert kd_metrics["epoch"] == 1 and any(k.startswith("train/") for k in kd_metrics), kd_metrics
    params = {k: v for r in runs.values() for k, v in r.data.params.items()}
    assert not any(secret in str(v) for v in params.values())

    # the canaries: nowhere Ray, the stack or MLflow keep anything
    needles = [secret, *SHELL_CANARIES.values()]
    listing = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address",
                              stack.ray_address], env=stack.client_env(), capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0 and "submitted" in listing.stdout + listing.stderr, listing.stderr[-2000:]
    api = subprocess.run([sys.executable, "-c", "from cluster.submit import client; import sys; "
                          "[print(repr(j)) for j in client(sys.argv[1]).list_jobs()]", stack.ray_address],
                         cwd=REPO, env=stack.client_env(), capture_output=True, text=True, timeout=300)
    assert api.returncode == 0, api.stderr[-2000:]
    infos = api.stdout.splitlines()     # the Jobs API's job info, as `cluster.submit.client` reads it
    assert len(infos) >= 2 and any("runtime_env" in i for i in infos), infos
    for n in needles:
        assert n not in listing.stdout + listing.stderr, f"{n[:6]}... in `ray job list`"
        assert not any(n in i for i in infos), f"{n[:6]}... in the Jobs API's job info"
    for r in runs.values():
        assert not any(n in f"{r.data.params} {r.data.tags}" for n in needles), r.info.run_name
        if not client_ml.list_artifacts(r.info.run_id):
            continue
        art = Path(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(tmp_path / r.info.run_id),
                                                       tracking_uri=stack.mlflow_uri))
        assert not _files_holding(art, needles, set()), r.info.run_name
    own = {Path(stack.dir) / "aws" / "credentials"}    # the one file meant to hold the stack's key
    hits = _files_holding(Path(stack.dir), needles, own) + _files_holding(Path(stack.ray_temp_dir), needles, own)
    assert not hits, hits
    assert any(Path(stack.ray_temp_dir).rglob("*.log")), "no Ray session logs searched"
