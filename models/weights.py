"""Weight files: a plain state dict plus a small metadata header.

A file written by :func:`save_weights` is a ``torch.save`` of::

    {"sodkd_meta": {"format": "sodkd-weights", "format_version": 1, "model": <registry name>,
                    "config": <model.config>, "git_commit": <sha or None>, "torch_version": ...,
                    "dtype": "float32" | "float16", "num_params": ..., "input_size": <the size it was
                    trained at, which predict / eval / label default to>, **extra_meta},
     "state_dict": {<param name>: tensor, ...}}

It contains only dicts, lists, strings, numbers and tensors, so it loads with ``weights_only=True`` (no
pickled code runs). :func:`read_metadata` reads the header without building the model (the tensors are
memory-mapped, not read). :func:`load_weights` rebuilds the model through the registry from the header.
Half-precision files (``half=True``) load back into float32 models: ``load_state_dict`` casts on copy.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any, Union

import torch
from torch import nn

from .base import SODModel
from .complexity import count_params
from .registry import create_model

__all__ = ["save_weights", "load_weights", "load_state", "read_metadata", "extra_metadata", "WeightsFormatError"]

FORMAT = "sodkd-weights"
FORMAT_VERSION = 1
META_KEY = "sodkd_meta"
STATE_KEY = "state_dict"
_RESERVED = ("format", "format_version", "model", "config", "torch_version", "dtype", "num_params", "input_size")

PathOrFile = Union[str, os.PathLike, IO[bytes]]


class WeightsFormatError(ValueError):
    """The file is not a weights file this module can read (or lacks the metadata asked for)."""


def _git_commit() -> str | None:
    """HEAD of the git checkout this package lives in, or None outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _name(target: PathOrFile) -> str:
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else getattr(target, "name", "<stream>")


def save_weights(model: SODModel, path: PathOrFile, extra_meta: dict[str, Any] | None = None,
                 half: bool = False) -> dict[str, Any]:
    """Write ``model``'s weights and metadata to ``path`` (a file path or a writable binary stream).

    Args:
        model: a model built by ``create_model`` (its ``name`` and ``config`` go into the header).
        extra_meta: JSON-serialisable extras (e.g. ``{"epoch": 69, "val/mae": 0.041}``); a
            ``git_commit`` here overrides the one detected from the working tree.
        half: store floating tensors as float16 (half the size; loads back into float32).

    Paths are written atomically (temporary file + rename). Returns the metadata written.
    """
    if not isinstance(model, SODModel):
        raise TypeError(f"save_weights: expected a SODModel, got {type(model).__name__}")
    extra = dict(extra_meta or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_weights: extra_meta may not set reserved key(s) {clash}")
    try:
        extra = json.loads(json.dumps(extra))  # plain dict/list/str/number only: loadable weights_only
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_weights: extra_meta must be JSON-serialisable: {e}") from None
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "config": json.loads(json.dumps(model.config)),
        "git_commit": _git_commit(),
        "torch_version": str(torch.__version__),
        "dtype": "float16" if half else "float32",
        "num_params": count_params(model),
        "input_size": int(model.input_size),   # the resolution it was trained at: what to run it at
    }
    meta.update(extra)
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    payload = {META_KEY: meta, STATE_KEY: state}
    if not isinstance(path, (str, os.PathLike)):
        torch.save(payload, path)
        return meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def _load_payload(path: PathOrFile, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {os.fspath(path)}")
    try:
        kwargs = {"mmap": True} if mmap and isinstance(path, (str, os.PathLike)) else {}
        payload = torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a foreign file
        raise WeightsFormatError(f"{_name(path)}: not a loadable weights file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict):
        raise WeightsFormatError(f"{_name(path)}: expected a dict, found {type(payload).__name__}")
    return payload


def extra_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The entries of a header that :func:`save_weights` takes back as ``extra_meta`` (all but the reserved ones):
    what a tool that rewrites a file keeps of the old header."""
    return {k: v for k, v in meta.items() if k not in _RESERVED}


def read_metadata(path: PathOrFile) -> dict[str, Any]:
    """The metadata header of a file written by :func:`save_weights`, without building the model."""
    meta = _load_payload(path, mmap=True).get(META_KEY)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsFormatError(f"{_name(path)}: no sodkd metadata header (not written by save_weights?)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsFormatError(f"{_name(path)}: format version {meta['format_version']} is newer than "
                                 f"this sodkd understands ({FORMAT_VERSION})")
    return meta


def _state_dict_of(payload: dict[str, Any], path: PathOrFile) -> dict[str, torch.Tensor]:
    state = payload[STATE_KEY] if META_KEY in payload else payload  # a bare ``torch.save(state_dict)``
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFormatError(f"{_name(path)}: does not hold a state dict of tensors")
    # Weights saved from a DistributedDataParallel wrapper carry a "module." prefix on every key.
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_state(model: nn.Module, path: PathOrFile, strict: bool = True,
               map_location: Any = "cpu") -> nn.Module:
    """Load the weights in ``path`` into an existing ``model`` (in place; returns it).

    Accepts files from :func:`save_weights` and bare ``torch.save(model.state_dict())`` files. When the
    file names a model and ``model`` is a SODModel with a different name, that is an error under
    ``strict``. float16 tensors are cast to the model's dtype.
    """
    payload = _load_payload(path, map_location)
    meta = payload.get(META_KEY)
    if strict and isinstance(meta, dict) and isinstance(model, SODModel) and meta.get("model") != model.name:
        raise WeightsFormatError(f"{_name(path)}: holds weights of {meta.get('model')!r}, "
                                 f"but the model is {model.name!r}")
    try:
        model.load_state_dict(_state_dict_of(payload, path), strict=strict)
    except RuntimeError as e:
        raise WeightsFormatError(f"{_name(path)}: does not fit {type(model).__name__}: {e}") from e
    if isinstance(meta, dict) and meta.get("input_size") and isinstance(model, SODModel):
        model.input_size = int(meta["input_size"])
    return model


def load_weights(path: PathOrFile, map_location: Any = "cpu") -> SODModel:
    """Rebuild the model recorded in ``path``'s header via ``create_model`` and load its weights.

    The model is returned in eval mode with float32 parameters on ``map_location``.
    """
    if not isinstance(path, (str, os.PathLike)):  # a stream can be read once: buffer it
        path = io.BytesIO(path.read())
    payload = _load_payload(path, "cpu")
    meta = payload.get(META_KEY)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsFormatError(f"{_name(path)}: no sodkd metadata header; build the model yourself "
                                 "and use load_state(model, path)")
    model = create_model(meta["model"], **meta["config"])
    model.load_state_dict(_state_dict_of(payload, path), strict=True)
    if meta.get("input_size"):
        model.input_size = int(meta["input_size"])
    return model.to(map_location).eval()
