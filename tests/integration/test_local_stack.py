"""`sodkd local up` + `sodkd submit`: jobs reach the stack exactly as they would reach a cluster on AWS.

A labelling job and a distillation job are submitted through the Ray Jobs API; the labels must then be in
the stack's S3 endpoint and both runs in its MLflow server.
"""

from __future__ import annotations

import os
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


def test_label_and_distill_jobs_through_submit(stack, shared_data, tmp_path):
    env = stack.client_env()
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

    client = mlflow.MlflowClient(stack.mlflow_uri)
    runs = {r.info.run_name: r for exp in client.search_experiments()
            for r in client.search_runs([exp.experiment_id])}
    assert {"submitted-label", "submitted-kd"} <= set(runs), sorted(runs)  # distill runs are named after run.name
    assert runs["submitted-label"].data.metrics["label/labelled"] == 6
    kd_metrics = runs["submitted-kd"].data.metrics
    assert kd_metrics["epoch"] == 1 and any(k.startswith("train/") for k in kd_metrics), kd_metrics
    params = {k: v for r in runs.values() for k, v in r.data.params.items()}
    assert not any(secret in str(v) for v in params.values())
