"""The training loop every worker runs (``TorchTrainer(train_loop, train_loop_config=config)``; in this
process with ``ScalingConfig(num_workers=0)``).

Per batch: augmentation and one random scale on the worker (:func:`cluster.training.image.collate`), SGD with
the warm-up + per-iteration cosine schedule (``kd.schedule``), the backbone at 0.1x, DDP or DeepSpeed. Each
epoch: validation (rank 0), a checkpoint (model, optimizer, epoch, step, the best weights so far, the MLflow run
id; :mod:`cluster.training.checkpoint`) reported to Ray Train, which keeps the latest and the best by
``val/mae``; rank 0 alone logs ``train/loss`` and ``train/lr`` per step, ``val/*`` and a picture panel per
epoch. A restarted worker group and a resubmitted run resume from the latest checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np

from cluster.tracking import RankTracker
from cluster.training.checkpoint import DS_DIR, persist_local_checkpoint, restore_checkpoint, save_checkpoint_dir
from cluster.training.image import apply_start_weights, collate, load_val_set, panel, predict_val, score
from cluster.training.sections import DebugConfig, ScalingSection, load_train_config
from kd import schema as S

__all__ = ["train_loop", "start_worker", "worker_device", "unwrap", "inject_failure"]


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


class _Float32Outputs:
    """Calls a (wrapped) model and casts its outputs to float32 (bf16 DeepSpeed): losses run in fp32."""

    def __init__(self, net):
        self.net = net
        self.module = unwrap(net)

    def __call__(self, x, **kw):
        import torch

        def cast(o):
            if isinstance(o, torch.Tensor):
                return o.float()
            return type(o)(cast(v) for v in o)
        return cast(self.net(x, **kw))


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


def train_loop(config: dict) -> dict:
    """The per-worker training function (``TorchTrainer(train_loop, train_loop_config=config)``).

    ``config`` is ``kd.config.to_dict(TrainConfig)`` plus a ``_runtime`` entry the driver computes
    (``steps_per_epoch``, ``rows``, ``mlflow_run_id``). Returns a summary dict (epochs run, last metrics).
    """
    import ray.train
    import torch

    from kd.augment import Augmenter
    from kd.losses import boundary_band
    from kd.schedule import set_lr, with_lr_mult
    from kd.pseudo_labels import fm_model_loss
    from kd.step import batch_loss
    from models import create_model

    runtime = dict(config.get("_runtime", {}))
    cfg = load_train_config({k: v for k, v in config.items() if k != "_runtime"})
    rank, world, device = start_worker(cfg.scaling, cfg.run.seed)
    in_process = cfg.scaling.num_workers == 0
    use_gpu = device.type == "cuda"

    steps = int(runtime["steps_per_epoch"])
    schedule = cfg.optim.schedule(steps)

    model = create_model(cfg.model.name, **cfg.model.kwargs)
    model.input_size = max(cfg.data.sizes)   # recorded in every weights file: the size to run it at
    apply_start_weights(model, cfg, verbose=rank == 0)
    groups = with_lr_mult(model.param_groups(cfg.optim.lr, cfg.optim.backbone_lr_mult), cfg.optim.lr)
    optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)

    # -- resume ---------------------------------------------------------------------------------------------
    meta: dict[str, Any] = {"epoch": 0, "step": 0, "best_mae": None, "best_epoch": None,
                            "mlflow_run_id": runtime.get("mlflow_run_id"), "resumed_from": []}
    restored = restore_checkpoint(meta, model, lambda: create_model(cfg.model.name, **cfg.model.kwargs),
                                  run=cfg.run, s3=cfg.s3, in_process=in_process, rank=rank)
    best_state = restored.best_state if restored else None

    # -- wrap for the strategy ------------------------------------------------------------------------------
    engine = None
    if cfg.scaling.strategy == "deepspeed":
        if not use_gpu:
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
        net, module = engine, engine.module
        dtype = torch.bfloat16 if cfg.scaling.bf16 else torch.float32
    else:
        if world > 1:
            net = ray.train.torch.prepare_model(model)
        else:
            net = model.to(device)
        module, dtype = unwrap(net), torch.float32
    if restored:
        if engine is None:   # after the move to the device: state follows the params
            optimizer.load_state_dict(restored.state(device)["optimizer"])
        restored.close()

    # -- data, validation, tracking --------------------------------------------------------------------------
    shard = ray.train.get_dataset_shard("train")
    val = load_val_set(cfg) if rank == 0 else None
    tracker = RankTracker(cfg.mlflow, meta["mlflow_run_id"], rank)
    panel_teacher = None
    if rank == 0 and val is not None and cfg.val.panel and cfg.data.teacher.teachers and tracker.active:
        from cluster.teachers import build_teacher
        t = cfg.data.teacher
        panel_teacher = build_teacher(list(t.teachers), tta=t.tta, s3=cfg.s3, device="cpu", precision="fp32",
                                      input_size=t.teacher_size)
    augmenter = Augmenter(cfg.data.augment)
    foundation = cfg.mode == "foundation"
    batch = cfg.per_worker_batch
    step = int(meta["step"])
    last: dict[str, float] = {}
    previous_local = None   # in-process mode: the checkpoint dir reported last epoch (Ray keeps only a path)
    t_start, images_seen = time.perf_counter(), 0
    epoch_wall, epoch_cpu, epoch_images = [], [], []   # training phase only (no validation / checkpoint)

    for epoch in range(int(meta["epoch"]), cfg.optim.epochs):
        band = boundary_band(epoch)
        rng = np.random.default_rng([cfg.run.seed, epoch, rank])
        net.train()
        loss_sum, n_steps, n_images = 0.0, 0, 0
        t_epoch, c_epoch = time.perf_counter(), time.process_time()
        it = shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True,
                                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                local_shuffle_seed=cfg.run.seed * 100003 + epoch * 101 + rank
                                if cfg.data.shuffle_buffer else None)
        for rows in it:
            if n_steps >= steps:
                continue  # a cache-less pipeline may yield more rows than counted: keep the schedule
            x, y, soft, conf = collate(rows, augmenter, rng, module.mean, module.std, cfg.data.sizes)
            x, y = x.to(device=device, dtype=dtype), y.to(device)
            lr = schedule(step)
            set_lr(optimizer, lr)
            parts: dict[str, float] = {}
            if foundation:
                loss, parts = fm_model_loss(_Float32Outputs(net), x, y, conf.to(device), cfg.fm)
            else:
                logits = [o.float() for o in net(x)]
                loss = batch_loss(logits, y, soft, band, cfg.kd, cfg.mask_loss)
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
            n_images += len(rows[S.ID])
            loss_value = float(loss.detach())
            loss_sum += loss_value
            if step % tracker.every == 0:
                tracker.metrics({S.TRAIN_LOSS: loss_value, S.TRAIN_LR: lr,
                                 **{f"train/{k}": v for k, v in parts.items()}}, step)
            inject_failure(cfg.debug, step, rank, tracker.flush)

        epoch_wall.append(time.perf_counter() - t_epoch)
        epoch_cpu.append(time.process_time() - c_epoch)   # every thread of this process (data prefetch too)
        epoch_images.append(n_images)
        images_seen += n_images

        # -- end of epoch: validate, checkpoint, report ---------------------------------------------------
        metrics: dict[str, float] = {"epoch": epoch + 1, "step": step,
                                     S.TRAIN_LOSS: loss_sum / max(1, n_steps)}
        probs = None
        if val is not None and ((epoch + 1) % cfg.val.every == 0 or epoch + 1 == cfg.optim.epochs):
            probs = predict_val(module, val.images, cfg.val.batch_size, dtype)
            metrics.update(score(probs, val.masks))
            if meta["best_mae"] is None or metrics[S.VAL_MAE] < meta["best_mae"]:
                meta["best_mae"], meta["best_epoch"] = metrics[S.VAL_MAE], epoch + 1
                best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        meta["epoch"], meta["step"] = epoch + 1, step
        if rank == 0:
            tracker.metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step, flush=True)
            tracker.metrics({"epoch": epoch + 1, "train/epoch_loss": metrics[S.TRAIN_LOSS]}, step, flush=True)
            if probs is not None and cfg.val.panel and tracker.active:
                tracker.image(panel(cfg, module, val, probs, panel_teacher), f"panels/epoch_{epoch + 1:03d}.png")
        if meta["best_mae"] is not None:
            metrics["best_mae"] = meta["best_mae"]
        if cfg.val.uri and S.VAL_MAE not in metrics:
            metrics[S.VAL_MAE] = float("inf")  # not validated this epoch: never the best checkpoint
        tmp = tempfile.mkdtemp(prefix="sodkd-ckpt-")
        save_checkpoint_dir(tmp, meta=dict(meta), module=module, best_state=best_state,
                             optimizer=optimizer if engine is None else None, engine=engine,
                             write_model=rank == 0)
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
    return {"epochs": int(meta["epoch"]), "step": step, "metrics": last, "images": images_seen,
            "wall_s": wall, "epoch_wall_s": epoch_wall, "epoch_cpu_s": epoch_cpu, "epoch_images": epoch_images,
            "resumed_from": meta["resumed_from"], "rank": rank, "world_size": world}
