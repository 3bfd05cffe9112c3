"""Shared fixtures: where the real data is, and small copies of it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SODKD_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    """Predictors cache the exports they make from weights (``cluster.predictor.export_cache_dir``): the test
    run keeps its own cache, not the user's ``~/.cache/sodkd``, and removes it at the end."""
    if not os.environ.get("SODKD_CACHE"):
        config._sodkd_cache = tempfile.mkdtemp(prefix="sodkd-test-cache-")
        os.environ["SODKD_CACHE"] = config._sodkd_cache


def pytest_unconfigure(config):
    cache = getattr(config, "_sodkd_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"{SHARED_DATA}: real data not found; set SODKD_SHARED_DATA")
    return SHARED_DATA


def copy_sample(src_dir: Path, dst_dir: Path, n: int, pattern: str = "*") -> list[Path]:
    """Copy the first ``n`` files (sorted) of ``src_dir`` matching ``pattern`` into ``dst_dir``."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(src_dir.glob(pattern))[:n]:
        shutil.copy(p, dst_dir / p.name)
        out.append(dst_dir / p.name)
    return out


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """Library code must not flip torch's process-wide grad mode (an in-process labelling stage once did,
    and every later test that trained got tensors without a graph). Fails the test that leaks it."""
    import torch

    leaked_by_fixture = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    yield
    leaked_by_test = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked_by_fixture, "torch grad mode was off when this test started (a fixture turned it off)"
    assert not leaked_by_test, "this test left torch grad mode off"


def spread_student(size: int):
    """A seeded scfnet_m3 at ``size`` whose maps are not flat: BN statistics from one training-mode pass (not
    the init's 0 / 1) and a steep head, so probabilities spread over (0, 1). In eval mode."""
    import torch

    from models import create_model
    torch.manual_seed(0)
    m = create_model("scfnet_m3")
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, size, size))
        m.heads[0].weight.mul_(40.0)
    m.input_size = size
    return m.eval()
