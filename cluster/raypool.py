"""What every Ray actor pool of the jobs (labelling teachers, online teachers, foundation stages) shares: the
``ActorPoolStrategy`` it runs under, the intra-op threads an actor or a train worker gives torch, and the
filesystem a Ray task or actor opens once per process."""

from __future__ import annotations

from typing import Any

from cluster import storage

__all__ = ["actor_pool", "torch_threads", "cached_filesystem"]

_FS_CACHE: dict[tuple[str, Any], tuple[Any, str]] = {}


def cached_filesystem(uri: str, s3: storage.S3Config | None) -> tuple[Any, str]:
    """``storage.get_filesystem(uri, s3)``, built once per (uri, s3) per worker process from plain config (no
    credentials shipped)."""
    key = (uri, s3)
    if key not in _FS_CACHE:
        _FS_CACHE[key] = storage.get_filesystem(uri, s3)
    return _FS_CACHE[key]


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
