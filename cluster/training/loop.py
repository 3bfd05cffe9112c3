"""The one training loop every worker runs, whatever the task (``TorchTrainer(train_loop,
train_loop_config=config)``; in this process with ``ScalingConfig(num_workers=0)``).

The loop owns what every job shares: the worker's device and seed, the SGD optimizer with the warm-up +
per-iteration cosine schedule (``kd.schedule``, the backbone at ``optim.backbone_lr_mult``), DDP or DeepSpeed,
the resume from the run's checkpoint (:func:`cluster.training.checkpoint.restore_checkpoint`: each worker from
its own copy), the step (backward, clipping, a non-finite loss is an error), rank 0's MLflow metrics
(``train/loss``, ``train/lr`` and the loss's parts per step; ``val/*`` per epoch), the best weights by
``val/mae``, one checkpoint an epoch reported to Ray Train (which keeps the latest and the best) and the
fault injection of the tests. A :class:`Task` says the rest: its model, what a batch is, its loss and its
validation (:class:`cluster.training.image.ImageTask`, :class:`cluster.training.video.VideoTask`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from cluster.tracking import RankTracker
from cluster.training.checkpoint import DS_DIR, persist_local_checkpoint, restore_checkpoint, save_checkpoint_dir
from cluster.training.sections import DebugConfig, ScalingSection, freeze_parts, part_lr_groups
from kd import schema as S

log = logging.getLogger(__name__)

__all__ = ["Task", "train_loop", "task_for", "start_worker", "worker_device", "unwrap", "inject_failure"]

CKPT_PREFIX = "sodkd-ckpt-"   # the loop's checkpoint dirs in the temp dir (the driver removes the in-process one)


class Task:
    """What a training job hands the loop: its config, its model, what a batch is, its loss and its validation.

    ``cfg`` is the job's config dataclass: the loop reads its ``model``, ``optim``, ``scaling``, ``run``,
    ``mlflow``, ``debug``, ``s3`` sections, ``val.uri`` / ``val.every`` and ``per_worker_batch``.
    ``meta`` holds the keys a task adds to the checkpoint's ``meta.json`` (restored on resume).
    """

    cfg: Any
    meta: Mapping[str, Any] = {}
    channels_last: bool = False   # run the model in channels_last (the image task: ``scaling.channels_last``)

    def build(self, rank: int, device) -> tuple[Any, dict[str, Any]]:
        """The model (on the CPU, its starting weights applied) and the modules trained beside it (their
        parameters join the optimizer, their state the checkpoint's ``state.pt``, by name)."""
        raise NotImplementedError

    def open(self, rank: int, world: int, steps: int, tracker: RankTracker) -> None:
        """Once the model is placed: open the data, and on rank 0 the validation set."""

    def batches(self, epoch: int, rank: int, world: int) -> Iterable[Any]:
        """This worker's batches of ``epoch`` (the loop takes ``steps_per_epoch`` of them, draining the rest)."""
        raise NotImplementedError

    def loss(self, net, module, batch, device, dtype) -> tuple[Any, dict[str, Any], int]:
        """(loss tensor, its named parts, samples in the batch) of one training batch through ``net``."""
        raise NotImplementedError

    @property
    def validates(self) -> bool:
        """Whether this worker validates (rank 0 with a validation set)."""
        return False

    def validate(self, module, dtype, epoch: int) -> dict[str, float]:
        """The ``val/*`` metrics of ``module`` (called on rank 0 in the epochs ``val.every`` picks)."""
        raise NotImplementedError

    def log_validation(self, tracker: RankTracker, module, epoch: int) -> None:
        """Rank 0, after a validation: what the task logs beside the metrics (a picture panel)."""

    def write_checkpoint(self, path: str) -> None:
        """Rank 0: files the task adds to the epoch's checkpoint directory (after the loop wrote its own)."""


def task_for(config: Mapping[str, Any]) -> Task:
    """The task of a job's config dict (``to_dict`` of its dataclass): video for mode ``distill-video``, the
    image task (teacher, supervised, distill, foundation) otherwise."""
    cfg = {k: v for k, v in config.items() if k != "_runtime"}
    if cfg.get("mode") == "distill-video":
        from cluster.training.video import VideoTask
        return VideoTask(cfg)
    from cluster.training.image import ImageTask
    return ImageTask(cfg)


def inject_failure(debug: DebugConfig, step: int, rank: int, before_exit: Callable[[], None]) -> None:
    """Exit this worker's process at ``debug.fail_at_step`` on ``debug.fail_rank``, once (see DebugConfig)."""
    if (debug.fail_at_step is None or step != debug.fail_at_step or rank != debug.fail_rank
            or os.path.exists(debug.fail_marker)):
        return
    with open(debug.fail_marker, "w") as f:
        f.write(f"worker rank {rank} exited at step {step}\n")
    before_exit()
    time.sleep(max(0.0, debug.fail_after_s))
    os._exit(1)


def unwrap(model):
    """The bare module under a DDP / DeepSpeed wrapper (or the model itself)."""
    return getattr(model, "module", model)


def start_worker(scaling: ScalingSection, seed: int):
    """Set up this training worker: torch's threads and seed; returns (rank, world size, device)."""
    import ray.train
    import torch
    ctx = ray.train.get_context()
    torch.set_num_threads(scaling.threads())
    torch.manual_seed(seed)
    return ctx.get_world_rank(), ctx.get_world_size(), worker_device(scaling)


def worker_device(scaling: ScalingSection):
    """This worker's device: under Ray Train its own GPU (``ray.train.torch.get_device()``: CUDA_VISIBLE_DEVICES
    + local rank), ``cuda:0`` in process, the CPU without ``scaling.use_gpu`` or without CUDA."""
    import torch
    if not (scaling.use_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    if scaling.num_workers:
        import ray.train.torch
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


def _wrap(model, optimizer, cfg, device, world: int, restored):
    """(net, module, engine, optimizer, dtype): ``model`` placed and wrapped for ``scaling.strategy``."""
    import torch
    if cfg.scaling.strategy != "deepspeed":
        if world > 1:
            import ray.train.torch
            net = ray.train.torch.prepare_model(model)
        else:
            net = model.to(device)
        return net, unwrap(net), None, optimizer, torch.float32
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.per_worker_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        "bf16": {"enabled": cfg.scaling.bf16},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    model.to(device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if restored:
        engine.load_checkpoint(restored.path(DS_DIR), tag="state", load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
    return engine, engine.module, engine, optimizer, torch.bfloat16 if cfg.scaling.bf16 else torch.float32


def train_loop(config: dict) -> dict:
    """The per-worker training function of every task.

    ``config`` is ``kd.config.to_dict`` of the job's config plus a ``_runtime`` entry the driver computes
    (``steps_per_epoch``, ``mlflow_run_id``). Returns a summary dict (epochs run, last metrics, timings).
    """
    import ray.train
    import torch

    from kd.schedule import set_lr, with_lr_mult
    from models import create_model

    runtime = dict(config.get("_runtime", {}))
    task = task_for(config)
    cfg = task.cfg
    rank, world, device = start_worker(cfg.scaling, cfg.run.seed)
    in_process = cfg.scaling.num_workers == 0
    steps = int(runtime["steps_per_epoch"])
    schedule = cfg.optim.schedule(steps)

    model, extras = task.build(rank, device)
    frozen = freeze_parts(model, cfg.model.freeze)
    if frozen and rank == 0:
        log.info("model.freeze %s: %d of %d parameter tensors keep their starting weights", list(cfg.model.freeze),
                 frozen, len(list(model.parameters())))
        if not (cfg.model.init_weights or cfg.model.backbone_weights):
            log.warning("model.freeze without model.init_weights: the frozen parts keep their random initial weights")
    groups = with_lr_mult(model.param_groups(cfg.optim.lr, cfg.optim.backbone_lr_mult), cfg.optim.lr)
    if cfg.model.lr_mult:
        groups = part_lr_groups(model, groups, cfg.model.lr_mult, cfg.optim.lr)
        if rank == 0:
            log.info("model.lr_mult: %s", ", ".join(f"{g['name']} {len(g['params'])} tensors at {g['lr_mult']:g}x"
                                                     for g in groups))
    groups += [{"name": name, "params": list(m.parameters()), "lr": cfg.optim.lr, "lr_mult": 1.0}
               for name, m in extras.items()]
    optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)

    meta: dict[str, Any] = {"epoch": 0, "step": 0, "best_mae": None, "best_epoch": None,
                            "mlflow_run_id": runtime.get("mlflow_run_id"), "resumed_from": [], **task.meta}
    restored = restore_checkpoint(meta, model, lambda: create_model(cfg.model.name, **cfg.model.kwargs),
                                  run=cfg.run, s3=cfg.s3, in_process=in_process, rank=rank)
    best_state = restored.best_state if restored else None
    if task.channels_last:
        model.to(memory_format=torch.channels_last)   # before the wrap: DDP's buckets take the params' layout
    net, module, engine, optimizer, dtype = _wrap(model, optimizer, cfg, device, world, restored)
    for m in extras.values():
        m.to(device)
    if restored:
        if engine is None:   # after the move to the device: state follows the params
            state = restored.state(device)
            optimizer.load_state_dict(state["optimizer"])
            for name, m in extras.items():
                if name in state:
                    m.load_state_dict(state[name])
        restored.close()

    tracker = RankTracker(cfg.mlflow, meta["mlflow_run_id"], rank)
    task.open(rank, world, steps, tracker)
    step = int(meta["step"])
    last: dict[str, float] = {}
    previous_local = None   # in-process mode: the checkpoint dir reported last epoch (Ray keeps only a path)
    t_start, images_seen = time.perf_counter(), 0
    epoch_wall, epoch_cpu, epoch_images = [], [], []   # training phase only (no validation / checkpoint)

    for epoch in range(int(meta["epoch"]), cfg.optim.epochs):
        net.train()
        sums: dict[str, float] = {}
        n_steps, n_images = 0, 0
        t_epoch, c_epoch = time.perf_counter(), time.process_time()
        for batch in task.batches(epoch, rank, world):
            if n_steps >= steps:
                continue  # a cache-less pipeline may yield more rows than counted: keep the schedule
            lr = schedule(step)
            set_lr(optimizer, lr)
            loss, parts, n = task.loss(net, module, batch, device, dtype)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.run.name}: loss {loss.item()} at step {step}")
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
                optimizer.step()
            step += 1
            n_steps += 1
            n_images += n
            values = {S.TRAIN_LOSS: float(loss.detach()), **{f"train/{k}": float(v) for k, v in parts.items()}}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if step % tracker.every == 0:
                tracker.metrics({**values, S.TRAIN_LR: lr}, step)
            inject_failure(cfg.debug, step, rank, tracker.flush)

        epoch_wall.append(time.perf_counter() - t_epoch)
        epoch_cpu.append(time.process_time() - c_epoch)   # every thread of this process (data prefetch too)
        epoch_images.append(n_images)
        images_seen += n_images

        # -- end of epoch: validate, checkpoint, report ---------------------------------------------------
        metrics: dict[str, float] = {"epoch": epoch + 1, "step": step, S.TRAIN_LOSS: 0.0,
                                     **{k: v / max(1, n_steps) for k, v in sums.items()}}
        validated = task.validates and ((epoch + 1) % cfg.val.every == 0 or epoch + 1 == cfg.optim.epochs)
        if validated:
            metrics.update(task.validate(module, dtype, epoch))
            if meta["best_mae"] is None or metrics[S.VAL_MAE] < meta["best_mae"]:
                meta["best_mae"], meta["best_epoch"] = metrics[S.VAL_MAE], epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        meta["epoch"], meta["step"] = epoch + 1, step
        if "history" in meta:
            meta["history"] = list(meta["history"]) + [{k: v for k, v in metrics.items() if np.isfinite(v)}]
        log.info("epoch %d: %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                   if k.startswith(("train/", "val/"))))
        if rank == 0:
            tracker.metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step, flush=True)
            tracker.metrics({"epoch": epoch + 1, "train/epoch_loss": metrics[S.TRAIN_LOSS]}, step, flush=True)
            if validated:
                task.log_validation(tracker, module, epoch)
        if meta["best_mae"] is not None:
            metrics["best_mae"] = meta["best_mae"]
        if cfg.val.uri and S.VAL_MAE not in metrics:
            metrics[S.VAL_MAE] = float("inf")  # not validated this epoch: never the best checkpoint
        tmp = tempfile.mkdtemp(prefix=CKPT_PREFIX)
        save_checkpoint_dir(tmp, meta=dict(meta), module=module, best_state=best_state,
                            optimizer=optimizer if engine is None else None, engine=engine,
                            write_model=rank == 0, extra_state={k: m.state_dict() for k, m in extras.items()})
        if rank == 0:
            task.write_checkpoint(tmp)
        if in_process:
            persist_local_checkpoint(cfg.run, cfg.s3, tmp, epoch + 1)
        report_ckpt = ray.train.Checkpoint.from_directory(tmp) if (rank == 0 or engine is not None) else None
        ray.train.report(metrics, checkpoint=report_ckpt)
        if in_process:   # the newest stays for the driver (result.checkpoint); the one before can go
            if previous_local:
                shutil.rmtree(previous_local, ignore_errors=True)
            previous_local = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        last = metrics

    tracker.flush()
    wall = time.perf_counter() - t_start
    summary = {"epochs": int(meta["epoch"]), "step": step, "metrics": last, "images": images_seen,
               "wall_s": wall, "epoch_wall_s": epoch_wall, "epoch_cpu_s": epoch_cpu, "epoch_images": epoch_images,
               "resumed_from": meta["resumed_from"], "rank": rank, "world_size": world}
    if "history" in meta:
        summary["history"] = meta["history"]
    return summary
