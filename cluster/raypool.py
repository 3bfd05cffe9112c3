"""What every Ray actor pool of the jobs (labelling teachers, online teachers, foundation stages) shares: the
``ActorPoolStrategy`` it runs under and the intra-op threads an actor or a train worker gives torch."""

from __future__ import annotations

__all__ = ["actor_pool", "torch_threads"]


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
