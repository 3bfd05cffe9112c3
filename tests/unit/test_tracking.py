"""cluster.tracking on a real MLflow store (sqlite in tmp_path): runs a killed job left RUNNING are ended."""

from __future__ import annotations

import mlflow

from cluster.tracking import TrackingConfig, end_stale_runs


def test_end_stale_runs_ends_only_the_same_jobs_running_runs(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="stale")
    client = mlflow.MlflowClient(tracking_uri=cfg.uri)
    exp = client.create_experiment(cfg.experiment, artifact_location=str(tmp_path / "art"))
    same = {"sodkd.job": "label", "sodkd.output": "s3://b/out"}
    dead = client.create_run(exp, tags=same).info.run_id                       # left RUNNING by a kill
    done = client.create_run(exp, tags=same).info.run_id
    client.set_terminated(done, "FINISHED")
    other = client.create_run(exp, tags={**same, "sodkd.output": "s3://b/other"}).info.run_id

    assert end_stale_runs(cfg, same) == [dead]
    status = {r: client.get_run(r).info.status for r in (dead, done, other)}
    assert status == {dead: "KILLED", done: "FINISHED", other: "RUNNING"}
    assert client.get_run(dead).data.tags["sodkd.ended_by"] == "rerun"
    assert end_stale_runs(cfg, same) == []                                     # nothing left to end
    assert end_stale_runs(TrackingConfig(uri=cfg.uri, experiment="missing"), same) == []
