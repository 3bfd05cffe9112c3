"""Small MLflow helpers shared by the jobs (labelling, training): runs, flat params, metrics, figures.

Every job records one MLflow run: the flattened config as params (so the run can be reproduced from MLflow
alone), its counts and rates as metrics, and pictures as artifacts. Nothing that looks like a credential is
ever logged: keys that name a secret are dropped and user:password parts of URIs are stripped.

MLflow is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping

from kd.config import to_flat_dict

__all__ = ["TrackingConfig", "start_run", "find_run", "end_stale_runs", "log_params", "log_metrics", "log_figure",
           "sanitize_params", "MAX_PARAM_CHARS"]

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access[_-]?key|api[_-]?key|session[_-]?key)",
                         re.IGNORECASE)
_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where a job records its MLflow run.

    Attributes:
        enabled: record a run at all.
        uri: tracking URI (``sqlite:///mlflow.db``, ``http://mlflow:5000``); None = MLflow's own default
            (``MLFLOW_TRACKING_URI`` or its local store).
        experiment: experiment name, created when missing.
        run_name: the run's name; None = the job chooses one.
        artifact_location: where a *new* experiment keeps its artifacts (``s3://bucket/mlflow``, a folder);
            None = the tracking server's default (for a local sqlite store: ``./mlruns`` under the cwd).
    """

    enabled: bool = True
    uri: str | None = None
    experiment: str = "sodkd"
    run_name: str | None = None
    artifact_location: str | None = None


def sanitize_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flat params -> MLflow-safe strings: secrets dropped, URI credentials stripped, long values cut."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if _SECRET_KEY.search(str(key)):
            continue
        text = "None" if value is None else str(value)
        text = _URI_USERINFO.sub(r"\1", text)
        if len(text) > MAX_PARAM_CHARS:
            text = text[: MAX_PARAM_CHARS - 3] + "..."
        out[str(key)] = text
    return out


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, run_name: str | None = None, run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Open (or, with ``run_id``, reopen) a run in ``cfg.experiment``; yields the ``mlflow.ActiveRun``.

    The run ends FINISHED on normal exit and FAILED (or KILLED on Ctrl-C) when the block raises.
    """
    import mlflow
    if cfg.uri:
        mlflow.set_tracking_uri(cfg.uri)
    if run_id is None:
        if cfg.artifact_location and mlflow.get_experiment_by_name(cfg.experiment) is None:
            mlflow.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location)
        mlflow.set_experiment(cfg.experiment)
    run = mlflow.start_run(run_id=run_id, run_name=run_name or cfg.run_name,
                           tags=dict(tags) if tags else None)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def find_run(cfg: TrackingConfig, tags: Mapping[str, str], status: str | None = None) -> str | None:
    """Id of the newest run in ``cfg.experiment`` carrying all ``tags`` (and ``status``), else None.

    A job that resumes (a restarted training run) uses this to continue its earlier run.
    """
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=cfg.uri) if cfg.uri else mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return None
    clauses = [f"tags.`{k}` = '{str(v).replace(chr(39), '')}'" for k, v in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    runs = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def end_stale_runs(cfg: TrackingConfig, tags: Mapping[str, str], status: str = "KILLED") -> list[str]:
    """Mark the RUNNING runs of ``cfg.experiment`` carrying all ``tags`` as ``status``; returns their ids.

    A job killed hard (SIGKILL, a lost node) cannot end its own run, which then shows RUNNING for ever. A job
    calls this before it opens its new run, with the tags that name the same job (for labelling: the output
    location), so the dead run ends KILLED, tagged ``sodkd.ended_by=rerun``, the moment the job is rerun.
    """
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=cfg.uri) if cfg.uri else mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return []
    clauses = [f"tags.`{k}` = '{str(v).replace(chr(39), '')}'" for k, v in tags.items()]
    clauses.append("attributes.status = 'RUNNING'")
    ended = []
    for run in client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses), max_results=1000):
        client.set_tag(run.info.run_id, "sodkd.ended_by", "rerun")
        client.set_terminated(run.info.run_id, status=status)
        ended.append(run.info.run_id)
    return ended


def log_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Log a config (dataclass or nested dict) flattened to dotted keys; returns what was logged."""
    import mlflow
    clean = sanitize_params(to_flat_dict(params, prefix))
    items = sorted(clean.items())
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[i:i + 100]))
    return clean


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics (NaN/inf and non-numbers are skipped rather than failing the job)."""
    import mlflow
    clean = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            clean[k] = f
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_figure(fig: Any, artifact_file: str) -> None:
    """Save a matplotlib figure as an artifact of the active run (e.g. ``samples/labels.png``) and close it."""
    import matplotlib.pyplot as plt
    import mlflow
    try:
        mlflow.log_figure(fig, artifact_file)
    finally:
        plt.close(fig)
