"""Checkpoints of the training core, written and restored the same way by every trainer (image, video).

A checkpoint is one directory::

    meta.json   epoch, step, best val/mae and its epoch, the MLflow run id, the epochs resumed after (read first)
    model.pt    models.save_weights of the current weights
    best.pt     models.save_weights of the best weights so far (by val/mae; the current ones without validation)
    state.pt    the optimizer (DDP / in-process), plus what a trainer adds to it; DeepSpeed keeps its own in ds/

Under Ray Train (``num_workers >= 1``) rank 0 reports it and Ray persists it under ``<storage>/<name>``; in
process (``num_workers: 0``, Ray's local mode persists nothing) the loop copies it to
``<storage>/<name>/checkpoint_epoch=NNNN`` itself. :func:`restore_checkpoint` finds either on a (re)start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Callable

from cluster import storage

if TYPE_CHECKING:
    from cluster.storage import S3Config
    from cluster.training.sections import RunSection

log = logging.getLogger(__name__)

__all__ = ["save_checkpoint_dir", "restore_checkpoint", "Restored", "latest_local_checkpoint",
           "persist_local_checkpoint", "STATE_FILE", "META_FILE", "MODEL_FILE", "BEST_FILE", "DS_DIR",
           "LOCAL_CKPT_PREFIX"]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
MODEL_FILE = "model.pt"
BEST_FILE = "best.pt"
DS_DIR = "ds"
LOCAL_CKPT_PREFIX = "checkpoint_epoch="


def save_checkpoint_dir(path: str, *, meta: dict, module, best_state: dict | None, optimizer=None,
                        engine=None, write_model: bool = True, extra_state: dict | None = None) -> None:
    """Write one checkpoint directory (see the module docstring for its files); ``extra_state`` (name -> a
    state dict: modules trained beside the model) joins the optimizer in ``state.pt``."""
    import torch

    from models import save_weights
    os.makedirs(path, exist_ok=True)
    if engine is not None:  # every rank writes its ZeRO partition; rank 0 also the module states
        engine.save_checkpoint(os.path.join(path, DS_DIR), tag="state", save_latest=False)
    if not write_model:
        return
    extra = {"epoch": meta["epoch"], "step": meta["step"]}
    save_weights(module, os.path.join(path, MODEL_FILE), extra_meta=extra)
    if best_state is not None:
        current = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(best_state)
        try:
            save_weights(module, os.path.join(path, BEST_FILE),
                         extra_meta={"epoch": meta["best_epoch"], "val/mae": meta["best_mae"]})
        finally:
            module.load_state_dict(current)
    else:
        shutil.copyfile(os.path.join(path, MODEL_FILE), os.path.join(path, BEST_FILE))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), **(extra_state or {})}, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def _local_root(run: RunSection, s3: S3Config) -> tuple[Any, str]:
    fs, root = storage.get_filesystem(run.storage, s3)
    return fs, storage.join(root, run.name)


def latest_local_checkpoint(run: RunSection, s3: S3Config) -> str | None:
    """In-process mode: the newest ``checkpoint_epoch=NNNN`` under the run folder, copied to a local dir."""
    import pyarrow.fs as pafs
    fs, root = _local_root(run, s3)
    if not storage.is_dir(fs, root):
        return None
    dirs = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory
                  and posixpath.basename(i.path).startswith(LOCAL_CKPT_PREFIX)
                  and storage.exists(fs, storage.join(i.path, META_FILE)))
    if not dirs:
        return None
    local = tempfile.mkdtemp(prefix="sodkd-resume-")
    pafs.copy_files(dirs[-1], local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def persist_local_checkpoint(run: RunSection, s3: S3Config, local_dir: str, epoch: int) -> str:
    """In-process mode: copy the checkpoint to ``<storage>/<name>/checkpoint_epoch=NNNN``, drop older ones."""
    import pyarrow.fs as pafs
    fs, root = _local_root(run, s3)
    dest = storage.join(root, f"{LOCAL_CKPT_PREFIX}{epoch:04d}")
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    for info in fs.get_file_info(pafs.FileSelector(root)):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.Directory and name.startswith(LOCAL_CKPT_PREFIX) and info.path != dest:
            fs.delete_dir(info.path)
    return storage.to_uri(fs, dest)


@dataclasses.dataclass
class Restored:
    """The checkpoint a worker resumes from: its private local copy and the best weights it held.

    ``close()`` removes the copy; call it once everything (optimizer, DeepSpeed partitions) is loaded."""

    dir: str
    best_state: dict | None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def state(self, device) -> dict:
        """``state.pt`` (the optimizer and what the trainer added), its tensors on ``device``."""
        import torch
        return torch.load(self.path(STATE_FILE), map_location=device, weights_only=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def restore_checkpoint(meta: dict, model, make_model: Callable[[], Any], *, run: RunSection, s3: S3Config,
                       in_process: bool, rank: int) -> Restored | None:
    """Resume this worker from the run's checkpoint, if it has one (None: it starts fresh).

    The checkpoint is Ray Train's (``ray.train.get_checkpoint()``) under workers, the newest persisted
    ``checkpoint_epoch=NNNN`` in process. Each worker restores from a private copy (``to_directory`` into
    its own temp dir), never from the shared ``as_directory()`` one: a worker done with that shared dir
    deletes it while another on the same node may still be reading it.

    ``meta`` (the loop's fresh values) is updated in place: every key of it from ``meta.json`` (a missing
    one is an error), the MLflow run id unless the checkpoint has none, and ``resumed_from`` gains the epoch
    resumed after. ``model`` gets ``model.pt``; ``make_model()`` builds a second one to read ``best.pt``.
    """
    if in_process:
        ckpt_dir = latest_local_checkpoint(run, s3)
    else:
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        ckpt_dir = (checkpoint.to_directory(tempfile.mkdtemp(prefix=f"sodkd-resume-r{rank}-"))
                    if checkpoint is not None else None)
    if ckpt_dir is None:
        return None
    from models import load_state
    with open(os.path.join(ckpt_dir, META_FILE)) as f:
        saved = json.load(f)
    meta.update({k: saved[k] for k in meta if k != "mlflow_run_id"})
    meta["mlflow_run_id"] = saved.get("mlflow_run_id") or meta.get("mlflow_run_id")
    meta["resumed_from"] = list(meta["resumed_from"]) + [meta["epoch"]]
    load_state(model, os.path.join(ckpt_dir, MODEL_FILE))
    best_state = None
    if meta["best_mae"] is not None:
        best = make_model()
        load_state(best, os.path.join(ckpt_dir, BEST_FILE))
        best_state = {k: v.detach().clone() for k, v in best.state_dict().items()}
    log.info("rank %d resumes after epoch %d (step %d)", rank, meta["epoch"], meta["step"])
    return Restored(ckpt_dir, best_state)
