"""The driver of a training job: build the data, open the MLflow run, run the loop under ``TorchTrainer`` (in
this process with ``scaling.num_workers: 0``), then write the final weights and log the model. Every task's
driver (:func:`run_training` here, :func:`cluster.training.video.run_video_distill`) counts its data and hands
the rest to :func:`train_and_export`.

Checkpoints go to ``<run.storage>/<run.name>``; a resubmitted run (same name and storage) resumes from its
latest checkpoint, and ``FailureConfig(run.max_failures)`` restarts a worker group that lost a worker from the
same place. In process (Ray's local mode persists no checkpoint) the loop writes them itself to
``<storage>/<name>/checkpoint_epoch=NNNN``; fault tolerance needs real workers.

Tracking: the driver finds (by the tag ``sodkd.run_name``) or creates the MLflow run and logs the flattened
config; at the end it logs the best model as its BatchNorm-folded ONNX export in MLflow's ONNX flavour, with
its card (``registered_model_name``; nothing pickled). One run per job, found again on resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Mapping

from cluster import storage
from cluster.raypool import ensure_ray
from cluster.tracking import RankTracker, log_student, mlflow_client, open_job_run, pin_tracking_uri
from cluster.training.checkpoint import BEST_FILE, LOCAL_CKPT_PREFIX, META_FILE
from cluster.training.data import build_train_dataset
from cluster.training.image import apply_start_weights
from cluster.training.loop import CKPT_PREFIX, train_loop
from cluster.training.sections import RunConfig, TrainConfig
from kd import schema as S
from kd.config import ConfigError, to_dict

log = logging.getLogger(__name__)

__all__ = ["TrainOutcome", "run_training", "Trained", "train_and_export", "ensure_ray", "launch", "checkpoint_uri",
           "export_final", "calibrate_final", "steps_per_epoch"]


@dataclasses.dataclass
class TrainOutcome:
    """What :func:`run_training` returns: where things went and the final figures."""

    run_name: str
    checkpoint: str | None          # URI of the latest checkpoint
    weights: list[str]              # final weight files written
    metrics: dict[str, float]       # the last epoch's reported metrics
    best_mae: float | None
    mlflow_run_id: str | None
    rows: int
    steps_per_epoch: int
    wall_s: float
    resumed_from: list[int]
    model_version: str | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)   # rank 0's train_loop return value


def launch(train_fn: Callable[[dict], dict], loop_config: dict, cfg: RunConfig, run_id: str | None, *,
           scored: bool, **trainer_kw: Any):
    """Run ``train_fn`` under ``TorchTrainer`` (in process with ``scaling.num_workers: 0``); the ``Result``.

    Checkpoints go to ``<run.storage>/<run.name>``; Ray keeps ``run.keep_checkpoints`` of them, the best by
    ``val/mae`` when ``scored``, and restarts the worker group up to ``run.max_failures`` times. A run that
    fails is marked FAILED in MLflow; ``trainer_kw`` (``datasets``, ``dataset_config``) go to the trainer."""
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, root = storage.get_filesystem(cfg.run.storage, cfg.s3)
    fs.create_dir(root, recursive=True)
    sc = cfg.scaling
    scaling = ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                      resources_per_worker={"CPU": sc.cpus_per_worker} if sc.num_workers else None)
    run_config = ray.train.RunConfig(
        name=cfg.run.name, storage_path=root, storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute=S.VAL_MAE if scored else None,
            checkpoint_score_order="min"))
    trainer = TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, **trainer_kw)
    try:
        result = trainer.fit()
    except BaseException:
        if run_id:
            mlflow_client(cfg.mlflow).set_terminated(run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name}: training reported no checkpoint")
    return result


def checkpoint_uri(cfg: RunConfig, result, epoch: int) -> str:
    """Where the run's latest checkpoint lives: Ray's, or the in-process copy under ``run.storage``."""
    if cfg.scaling.num_workers:
        return storage.to_uri(result.checkpoint.filesystem, result.checkpoint.path)
    return storage.join(cfg.run.storage.rstrip("/"), cfg.run.name, f"{LOCAL_CKPT_PREFIX}{epoch:04d}")


def export_final(cfg: RunConfig, best_path: str, run_id: str | None, metrics: Mapping[str, Any], *,
                 input_size: int) -> tuple[list[str], str | None]:
    """Write the final weights (fp32 + fp16) and log/register the model and its ONNX export in MLflow
    (exported at ``input_size``)."""
    from models import load_weights, save_weights
    model = load_weights(best_path)
    meta = {k: v for k, v in json.load(open(os.path.join(os.path.dirname(best_path), META_FILE))).items()
            if k in ("epoch", "step", "best_mae", "best_epoch")}
    extra = {"run_name": cfg.run.name, "mode": cfg.mode, **meta, "mlflow_run_id": run_id}
    if cfg.output.calibrate:
        extra.update(calibrate_final(cfg, model, run_id, input_size))
    out_uri = cfg.output.dir or storage.join(cfg.run.storage.rstrip("/"), cfg.run.name, "final")
    fs, out_root = storage.get_filesystem(out_uri, cfg.s3)
    written = []
    with tempfile.TemporaryDirectory(prefix="sodkd-final-") as tmp:
        files = [(f"{cfg.run.name}.pt", False)] + ([(f"{cfg.run.name}.fp16.pt", True)] if cfg.output.fp16 else [])
        for name, half in files:
            local = os.path.join(tmp, name)
            save_weights(model, local, extra_meta=extra, half=half)
            with open(local, "rb") as f:
                storage.write_bytes(fs, storage.join(out_root, name), f.read())
            written.append(storage.to_uri(fs, storage.join(out_root, name)))
        version = None
        if run_id is not None:
            version = log_student(cfg.mlflow, cfg.run.name, model, run_id, tmp, metrics, input_size)
    return written, version


def calibrate_final(cfg: RunConfig, model, run_id: str | None, input_size: int) -> dict[str, Any]:
    """``output.calibrate``: the output scale chosen on ``val.uri`` and folded into ``model`` (in place); returns the
    header entries, and logs the scale and the before / after figures to the run."""
    from cluster.calibrate import calibrate_model
    from cluster.catalog import paired_folder
    cat = paired_folder(cfg.val.uri, cfg.s3, limit=cfg.val.limit)
    choice, record = calibrate_model(model, cat, cfg.val.uri, input_size, max_s_drop=cfg.output.max_s_drop)
    log.info("output.calibrate: scale %g on %d pairs, val MAE %.4f -> %.4f, S %.4f -> %.4f", choice.scale,
             choice.images, record["mae_before"], record["mae_after"], record["sm_before"], record["sm_after"])
    RankTracker(cfg.mlflow, run_id, rank=0).metrics({"calibration/scale": choice.scale, "calibration/val_mae":
                                                     record["mae_after"], "calibration/val_sm": record["sm_after"]},
                                                    step=0, flush=True)
    return {"output_scale": choice.scale, "calibration": record}


def steps_per_epoch(rows: int, batch_size: int, workers: int) -> int:
    """Optimizer steps per epoch: the rows split evenly over ``workers`` (remainder dropped), full
    per-worker batches only (``batch_size`` is global)."""
    workers = max(1, workers)
    per_worker = batch_size // workers
    steps = (rows // workers) // per_worker
    if steps < 1:
        raise ValueError(f"optim.batch_size {batch_size} is larger than the {rows} training rows "
                         f"({workers} workers): no full batch per epoch")
    return steps


@dataclasses.dataclass
class Trained:
    """What :func:`train_and_export` hands back to a task's driver."""

    checkpoint: str                 # URI of the latest checkpoint
    weights: list[str]              # final weight files written (best by val/mae, else last)
    metrics: dict[str, float]       # the last epoch's reported metrics
    meta: dict[str, Any]            # the latest checkpoint's meta.json
    mlflow_run_id: str | None
    model_version: str | None
    summary: dict[str, Any]         # rank 0's train_loop return value
    extra: Any = None               # what ``read`` took from the latest checkpoint directory


def train_and_export(cfg: RunConfig, steps: int, *, data_metrics: Mapping[str, float] | None = None,
                     read: Callable[[str], Any] | None = None, finish: Callable[[str, Any], None] | None = None,
                     **trainer_kw: Any) -> Trained:
    """Every job's driver after its data is counted: open (or find again) the MLflow run, run
    :func:`cluster.training.loop.train_loop` for ``steps`` steps an epoch, write the final weights and log the
    model, close the run.

    ``data_metrics`` are logged at step 0 of the run; ``read(checkpoint_dir)`` takes what the task wrote into
    the latest checkpoint (:attr:`Trained.extra`); ``finish(run_id, extra)`` logs the task's last figures
    before the run is marked FINISHED; ``trainer_kw`` (``datasets``, ``dataset_config``) go to the trainer.
    """
    cfg = dataclasses.replace(cfg, mlflow=pin_tracking_uri(cfg.mlflow))
    ensure_ray()
    run_id = open_job_run(cfg.mlflow, cfg.run.name, {"sodkd.mode": cfg.mode, "sodkd.model": cfg.model.name}, cfg)
    if run_id and data_metrics:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        mlflow_client(cfg.mlflow).log_batch(run_id, metrics=[Metric(k, float(v), now, 0)
                                                             for k, v in data_metrics.items()])
    loop_config = to_dict(cfg)
    loop_config["_runtime"] = {"steps_per_epoch": steps, "mlflow_run_id": run_id}
    result = launch(train_loop, loop_config, cfg, run_id, scored=bool(cfg.val.uri), **trainer_kw)
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
        extra = read(d) if read else None
        run_id = meta.get("mlflow_run_id") or run_id
        metrics = dict(result.metrics or {})
        if run_id:  # the export reopens the run with MLflow's fluent API: point it at this run's experiment
            import mlflow
            if cfg.mlflow.uri:
                mlflow.set_tracking_uri(cfg.mlflow.uri)
            mlflow.set_experiment(cfg.mlflow.experiment)
        weights, version = export_final(cfg, os.path.join(d, BEST_FILE), run_id, metrics, input_size=cfg.val.size)
    if not cfg.scaling.num_workers and os.path.basename(result.checkpoint.path).startswith(CKPT_PREFIX):
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)   # in process: persisted under run.storage
    if run_id:
        if finish:
            finish(run_id, extra)
        mlflow_client(cfg.mlflow).set_terminated(run_id, status="FINISHED")
    return Trained(checkpoint_uri(cfg, result, meta["epoch"]), weights, metrics, meta, run_id, version,
                   dict(getattr(result, "return_value", None) or {}), extra)


def config_from_init_weights(cfg):
    """``cfg`` (an image or video training config) with ``model.kwargs`` completed from ``model.init_weights``'
    header: a file with another config than the defaults (a widened decoder, ``models.scfnet.widen_decoder``)
    trains as itself without restating it, and so does a video student started from such an image student.
    Keys given in ``model.kwargs`` win. Taken over only from a file of the same model, or one whose every config
    key the target model has (image -> video SCFNet); bare state dicts and other models are left to the loaders,
    whose errors name them."""
    import io

    from models import WeightsFormatError, create_model, read_metadata
    m = cfg.model
    if not m.init_weights:
        return cfg
    fs, path = storage.get_filesystem(m.init_weights, cfg.s3)
    if not storage.exists(fs, path):
        raise ConfigError(f"model.init_weights: file not found: {m.init_weights}")
    try:
        meta = read_metadata(io.BytesIO(storage.read_bytes(fs, path)))
    except (WeightsFormatError, ValueError, RuntimeError):
        return cfg
    config = meta.get("config", {})
    fits = meta.get("model") == m.name or set(config) <= set(create_model(m.name, **m.kwargs).config)
    kwargs = {**config, **m.kwargs}
    if not fits or kwargs == m.kwargs:
        return cfg
    log.info("model.kwargs from %s: %s", m.init_weights, {k: v for k, v in kwargs.items() if k not in m.kwargs})
    return dataclasses.replace(cfg, model=dataclasses.replace(m, kwargs=kwargs))


def run_training(cfg: TrainConfig) -> TrainOutcome:
    """The image job: build the data, then :func:`train_and_export`."""
    import ray.train

    t0 = time.perf_counter()
    if cfg.model.init_weights or cfg.model.backbone_weights:   # a wrong file fails here, in seconds
        from models import create_model
        cfg = config_from_init_weights(cfg)
        apply_start_weights(create_model(cfg.model.name, **cfg.model.kwargs), cfg)
    ensure_ray()
    data = build_train_dataset(cfg)
    spe = steps_per_epoch(data.rows, cfg.optim.batch_size, cfg.scaling.num_workers)
    log.info("training rows %d (%s), %d steps per epoch", data.rows, data.counts, spe)
    out = train_and_export(cfg, spe, datasets={"train": data.dataset},
                           dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    return TrainOutcome(cfg.run.name, out.checkpoint, out.weights, out.metrics, out.meta.get("best_mae"),
                        out.mlflow_run_id, data.rows, spe, time.perf_counter() - t0,
                        list(out.meta.get("resumed_from", [])), out.model_version, out.summary)
