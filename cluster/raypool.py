"""What every Ray job of sodkd shares: the one way a job joins or starts Ray (:func:`ensure_ray`), the teacher
pool's config (:class:`PoolConfig`), the ``ActorPoolStrategy`` it runs under, the intra-op threads an actor or a
train worker gives torch, and the filesystem a Ray task or actor opens once per process."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Literal

from cluster import storage
from kd.config import ConfigError

__all__ = ["ensure_ray", "PoolConfig", "actor_pool", "torch_threads", "cached_filesystem", "finite_resources"]

_FS_CACHE: dict[tuple[str, Any], tuple[Any, str]] = {}


def cached_filesystem(uri: str, s3: storage.S3Config | None) -> tuple[Any, str]:
    """``storage.get_filesystem(uri, s3)``, built once per (uri, s3) per worker process from plain config (no
    credentials shipped)."""
    key = (uri, s3)
    if key not in _FS_CACHE:
        _FS_CACHE[key] = storage.get_filesystem(uri, s3)
    return _FS_CACHE[key]


def ensure_ray(address: str | None = None) -> None:
    """Join Ray at ``address`` (else ``$RAY_ADDRESS``, which the Ray Jobs API sets for a submitted job), else start a
    private local instance; nothing when this process is connected already (a test's or a caller's ``ray.init``).

    Labelling, training and the demo start Ray here. A bare ``ray.init()`` would attach to whatever cluster
    ``ray start`` last left on this machine (even a dead one); a job must not depend on that, so the default is
    an explicit private local instance. ``sodkd serve`` joins or starts its own (``cluster.serve.connect``):
    it must outlive the command that deployed it.
    """
    import ray
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING)


def actor_pool(size: int, max_size: int | None = None):
    """Ray Data's ``ActorPoolStrategy``: ``size`` actors, or autoscaling from ``size`` up to ``max_size``."""
    import ray.data
    if max_size is not None and max_size > size:
        return ray.data.ActorPoolStrategy(min_size=size, max_size=max_size)
    return ray.data.ActorPoolStrategy(size=size)


def torch_threads(threads: int, cpus: float) -> int:
    """Intra-op threads for a process given ``cpus`` Ray CPUs: ``threads`` when set (> 0), else one per whole
    CPU, at least 1 (a fractional CPU still runs one thread)."""
    return threads or max(1, int(cpus))


def finite_resources(section: str, **amounts: float | None) -> None:
    """Reject NaN and infinite Ray resource amounts (``num_cpus=...``), naming the dotted key."""
    for name, v in amounts.items():
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{section}.{name}: must be a finite number, got {v}")


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """The teacher actor pool.

    Attributes:
        size: a fixed number of actors; set it to None to autoscale between ``min_size`` and ``max_size``.
        min_size, max_size: autoscaling bounds (used when ``size`` is None).
        num_cpus, num_gpus: Ray resources per actor. Keep ``num_cpus`` fractional on small machines, or the
            actors can take every CPU and starve the decode tasks.
        batch_size: images per forward pass.
        torch_threads: intra-op threads per actor; 0 = one per whole CPU asked for (at least 1).
        device: ``auto`` (CUDA when the actor has a GPU), ``cpu`` or ``cuda``.
        precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32`` or ``fp16``.
        backend: how a teacher given as a weights file runs (:func:`cluster.predictor.runtime_teacher`, the
            engine of ``sodkd predict``): ``auto`` = ONNX Runtime on a CPU (exported once into the export
            cache), eager PyTorch on a GPU; ``eager``, ``onnx`` or ``pt2`` to choose. Exported and carded
            files always run in their own runtime.
    """

    size: int | None = 1
    min_size: int | None = None
    max_size: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 16
    torch_threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16"] = "auto"
    backend: Literal["auto", "eager", "onnx", "pt2"] = "auto"

    def __post_init__(self) -> None:
        finite_resources("pool", num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        if self.size is None:
            if self.min_size is None or self.max_size is None:
                raise ConfigError("pool: set size, or min_size and max_size for autoscaling")
            if not 1 <= self.min_size <= self.max_size:
                raise ConfigError(f"pool: need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        elif self.size < 1:
            raise ConfigError(f"pool.size: must be >= 1, got {self.size}")
        elif self.min_size is not None or self.max_size is not None:
            raise ConfigError("pool: give either size or min_size/max_size, not both")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("pool: num_cpus and num_gpus must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"pool.batch_size: must be >= 1, got {self.batch_size}")
        if self.torch_threads < 0:
            raise ConfigError(f"pool.torch_threads: must be >= 0, got {self.torch_threads}")
        if self.backend in ("onnx", "pt2") and self.precision == "fp16":
            raise ConfigError(f"pool.backend: {self.backend} runs exported fp32 files; use pool.precision fp32 "
                              "(or auto), or the eager backend for fp16")

    def threads(self) -> int:
        return torch_threads(self.torch_threads, self.num_cpus)

    def compute(self):
        """The ``ActorPoolStrategy`` of this pool: ``size`` actors, or ``min_size`` up to ``max_size``."""
        return actor_pool(self.size) if self.size is not None else actor_pool(self.min_size, self.max_size)

    def resolved_device(self) -> str:
        """``device``, with ``auto`` resolved: CUDA when the actor has a GPU."""
        return self.device if self.device != "auto" else ("cuda" if self.num_gpus > 0 else "cpu")
