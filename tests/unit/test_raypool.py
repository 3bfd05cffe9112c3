"""The one actor-pool builder and thread rule the labelling, online-teacher and foundation pools share."""

from __future__ import annotations

import pytest

from cluster.foundation import StageResources
from cluster.raypool import PoolConfig, actor_pool, torch_threads
from cluster.training.sections import ScalingSection


def _bounds(strategy) -> tuple[int, int]:
    return strategy.min_size, strategy.max_size


def test_actor_pool_is_fixed_or_autoscales():
    assert _bounds(actor_pool(3)) == (3, 3)
    assert _bounds(actor_pool(2, 2)) == (2, 2)
    assert _bounds(actor_pool(1, 4)) == (1, 4)
    assert _bounds(PoolConfig(size=2).compute()) == (2, 2)
    assert _bounds(PoolConfig(size=None, min_size=1, max_size=3).compute()) == (1, 3)


@pytest.mark.parametrize("threads, cpus, expected", [(0, 1.0, 1), (0, 0.25, 1), (0, 3.5, 3), (2, 0.5, 2)])
def test_torch_threads_is_one_per_whole_cpu_unless_set(threads, cpus, expected):
    assert torch_threads(threads, cpus) == expected
    assert PoolConfig(num_cpus=cpus, torch_threads=threads).threads() == expected
    assert StageResources(num_cpus=cpus, torch_threads=threads).threads() == expected
    assert ScalingSection(cpus_per_worker=cpus, torch_threads=threads).threads() == expected


def test_pool_device_auto_follows_the_gpu():
    assert PoolConfig().resolved_device() == "cpu"
    assert PoolConfig(num_gpus=0.5).resolved_device() == "cuda"
    assert PoolConfig(num_gpus=1, device="cpu").resolved_device() == "cpu"
