"""The element-wise mean of several weights files of one model (checkpoint averaging, a "uniform model soup").

Checkpoints that lie on one training trajectory -- the ends of successive cosine cycles of a run, or the last
epochs of one -- sit in one basin of the loss, and the mean of their weights usually scores better than any of
them (stochastic weight averaging, Izmailov et al. 2018; model soups, Wortsman et al. 2022): it costs no training
step and no inference time. Files of unrelated runs (different random starts) do not average into a working
model; that is not checked here, beyond the architecture.

Every floating tensor is averaged, BatchNorm running statistics included (for siblings of one trajectory their
mean is close to what a re-estimate gives); integer buffers (``num_batches_tracked``) keep the first file's value.
A calibrated file (``sodkd calibrate``) has its output scale undone first (:func:`models.fuse.undo_output_scale`),
so the mean is of the models as trained; calibrate the result again if wanted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from .base import SODModel
from .fuse import undo_output_scale
from .weights import load_weights, read_metadata

__all__ = ["average_weights"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def average_weights(paths: Sequence[str | os.PathLike]) -> tuple[SODModel, list[dict]]:
    """Load the files, check they hold one architecture at one size, and return (mean model, sources).

    Raises:
        ValueError: fewer than two files, or a file whose model, config or input size differs from the first's
            (the message names the file and what differs).
        FileNotFoundError / models.WeightsFormatError: a file that is missing or not a sodkd weights file.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"average_weights: needs at least two files, got {len(paths)}")
    first_meta = read_metadata(paths[0])
    first = load_weights(paths[0]).float()
    undo_output_scale(first, first_meta)
    sums = {k: v.detach().clone().double() for k, v in first.state_dict().items() if v.is_floating_point()}
    sources = []
    for i, path in enumerate(paths):
        meta = first_meta if i == 0 else read_metadata(path)
        for key in ("model", "config", "input_size"):
            if meta.get(key) != first_meta.get(key):
                raise ValueError(f"{path}: its {key} {meta.get(key)!r} differs from {paths[0]}'s "
                                 f"{first_meta.get(key)!r}: only files of one model at one size average")
        if i:
            model = load_weights(path).float()
            undo_output_scale(model, meta)
            for k, v in model.state_dict().items():
                if k in sums:
                    sums[k] += v.detach().double()
        sources.append({"file": path.name, "sha256": _sha256(path)[:16],
                        **{k: meta[k] for k in ("dtype", "run_name", "step", "output_scale") if k in meta}})
    state = first.state_dict()
    with torch.no_grad():
        for k, total in sums.items():
            state[k].copy_((total / len(paths)).to(state[k].dtype))
    return first.eval(), sources
