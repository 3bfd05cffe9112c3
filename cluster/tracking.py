"""All of sodkd's MLflow: runs (opened or resumed by tag), flat params, metrics, figures, the training workers'
rank-0 tracker and the logged, registered student.

Every job records one MLflow run: the flattened config as params (so the run can be reproduced from MLflow
alone), its counts and rates as metrics, and pictures as artifacts. Nothing that looks like a credential is
ever logged: keys that name a secret are dropped and user:password parts of URIs are stripped.

MLflow is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping

from kd.config import to_flat_dict

if TYPE_CHECKING:
    import numpy as np

__all__ = ["TrackingConfig", "TrainTracking", "start_run", "find_run", "end_stale_runs", "log_params", "log_metrics",
           "log_figure", "sanitize_params", "MAX_PARAM_CHARS", "RUN_NAME_TAG", "RankTracker", "resolve_tracking_uri",
           "pin_tracking_uri", "mlflow_client", "open_job_run", "log_student"]

RUN_NAME_TAG = "sodkd.run_name"   # the tag a job's run is found by when it resumes

MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access[_-]?key|api[_-]?key|session[_-]?key)",
                         re.IGNORECASE)
_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_PARAM_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")   # what MLflow refuses in a param name (e.g. `scfm*`)


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
    """Flat params -> MLflow-safe strings: secrets dropped, URI credentials stripped, long values cut, and in
    keys every character MLflow refuses (a pattern's ``*`` in ``model.lr_mult``) written as ``_``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if _SECRET_KEY.search(str(key)):
            continue
        text = "None" if value is None else str(value)
        text = _URI_USERINFO.sub(r"\1", text)
        if len(text) > MAX_PARAM_CHARS:
            text = text[: MAX_PARAM_CHARS - 3] + "..."
        out[_PARAM_KEY_BAD.sub("_", str(key))] = text
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


@dataclasses.dataclass(frozen=True)
class TrainTracking(TrackingConfig):
    """MLflow: :class:`TrackingConfig` plus what training adds.

    ``registered_model``: name the final model is registered under (None = log it, do not register).
    ``log_every``: steps between ``train/loss`` / ``train/lr`` points. ``onnx``: log the ONNX export too.
    ``artifact_location``: for a new experiment; None = next to a sqlite store, else MLflow's default.
    """

    experiment: str = "sodkd-train"
    registered_model: str | None = None
    log_every: int = 1
    onnx: bool = True
    onnx_exporter: Literal["dynamo", "torchscript"] = "dynamo"
    artifact_location: str | None = None


def resolve_tracking_uri(uri: str | None) -> str | None:
    """Relative sqlite paths become absolute: Ray workers run in other directories."""
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def pin_tracking_uri(tracking: TrainTracking) -> TrainTracking:
    """``tracking`` with the URI the workers must use: MLflow's default of this process when none is set (a
    worker runs in another directory, maybe another environment), a relative sqlite path made absolute."""
    uri = tracking.uri
    if tracking.enabled and not uri:
        import mlflow
        uri = mlflow.get_tracking_uri()
    return dataclasses.replace(tracking, uri=resolve_tracking_uri(uri))


def _artifact_location(tracking: TrackingConfig) -> str | None:
    if tracking.artifact_location:
        return tracking.artifact_location
    uri = tracking.uri or ""
    if uri.startswith("sqlite:////"):
        return os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def mlflow_client(tracking: TrackingConfig):
    """An ``MlflowClient`` for the run's tracking URI (the environment's when the config has none)."""
    import mlflow
    return mlflow.MlflowClient(tracking_uri=tracking.uri) if tracking.uri else mlflow.MlflowClient()


def open_job_run(tracking: TrainTracking, run_name: str, tags: Mapping[str, str], config: Any) -> str | None:
    """Find this job's run by its ``sodkd.run_name`` tag, or create it with ``tags``; log the flattened
    ``config`` (a config dataclass) as params.

    On resume the params already recorded stay (MLflow params are immutable); a value that changed (say
    ``optim.epochs``) is recorded as the tag ``changed.<key>`` instead.
    """
    if not tracking.enabled:
        return None
    from mlflow.entities import Param, RunTag

    client = mlflow_client(tracking)
    exp = client.get_experiment_by_name(tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(tracking.experiment,
                                                                     artifact_location=_artifact_location(tracking))
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        run_id, old = runs[0].info.run_id, runs[0].data.params
        client.update_run(run_id, status="RUNNING")
    else:
        run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
        run_id, old = run.info.run_id, {}
    params = sanitize_params(to_flat_dict(config))
    new = [Param(k, v) for k, v in sorted(params.items()) if k not in old]
    changed = [RunTag(f"changed.{k}", v) for k, v in sorted(params.items()) if k in old and old[k] != v]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])
    if changed:
        client.log_batch(run_id, tags=changed)
    return run_id


class RankTracker:
    """Rank 0's MLflow logging through ``MlflowClient`` (no active-run state; the driver owns the status)."""

    def __init__(self, tracking: TrainTracking, run_id: str | None, rank: int):
        self.client = None
        self.run_id = run_id
        self.every = max(1, tracking.log_every)
        self._pending: list = []
        self._flushed = time.monotonic()
        if rank != 0 or not run_id or not tracking.enabled:
            return
        self.client = mlflow_client(tracking)

    @property
    def active(self) -> bool:
        return self.client is not None

    def metrics(self, values: Mapping[str, float], step: int, flush: bool = False) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(float(v))]
        if flush or len(self._pending) >= 200 or time.monotonic() - self._flushed > 15.0:
            self.flush()

    def flush(self) -> None:
        """One ``log_batch`` for what is pending: at most every 15 s or 200 points, and every epoch end."""
        if self.active and self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending)
            self._pending = []
        self._flushed = time.monotonic()

    def image(self, array: np.ndarray, artifact_file: str) -> None:
        if self.active:
            self.client.log_image(self.run_id, array, artifact_file=artifact_file)


def log_student(tracking: TrainTracking, run_name: str, model, run_id: str, tmp: str, metrics: Mapping[str, Any],
                input_size: int) -> str | None:
    """Log (and register) the model in the MLflow ONNX flavour: the BatchNorm-folded ONNX export with its card
    as an extra file -- a format MLflow and sodkd load without unpickling anything (``models:/NAME/VERSION``
    runs through :class:`cluster.predictor.Predictor`). ``mlflow.onnx`` also logs the export under ``onnx/``."""
    import mlflow
    import onnx
    import onnxruntime

    from cluster.registry import log_onnx_model
    from cluster.export import export_teacher
    if tracking.uri:
        mlflow.set_tracking_uri(tracking.uri)
    version = None
    with mlflow.start_run(run_id=run_id):
        onnx_path = os.path.join(tmp, f"{run_name}.onnx")
        meta = export_teacher(model.eval(), onnx_path, "onnx", input_size=input_size,
                              extra_meta={"run_name": run_name}, onnx_exporter=tracking.onnx_exporter)
        info = log_onnx_model(model, onnx_path, meta, registered_model_name=tracking.registered_model,
                              pip_requirements=[f"onnx=={onnx.__version__}",
                                                f"onnxruntime=={onnxruntime.__version__}", "numpy"])
        if tracking.registered_model:
            version = str(getattr(info, "registered_model_version", "") or "") or None
        if tracking.onnx:
            mlflow.log_artifact(onnx_path, artifact_path="onnx")
        final = {f"final/{k.split('/')[-1]}": float(v) for k, v in metrics.items()
                 if k.startswith("val/") and isinstance(v, (int, float)) and math.isfinite(float(v))}
        if final:
            mlflow.log_metrics(final)
    return version
