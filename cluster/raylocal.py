"""Start a private Ray instance on this machine that Ray's own state API can find again.

``ray.init(address="local")`` starts a fresh cluster even when others run on the same machine (other jobs,
other test sessions, a ``sodkd local up`` stack). But Ray's state API -- which Ray Train V2's controller
uses to watch its actors -- locates "the" cluster from ``RAY_ADDRESS`` or, failing that, the newest one on the
machine, which may be somebody else's: its calls then time out (10 s each, and Train waits on them when a
run ends). Pinning the dashboard port and exporting ``RAY_API_SERVER_ADDRESS`` *before* ``ray.init`` makes
every process of the new cluster (they inherit the environment) ask the right dashboard.

It can also start Ray's workers at a chosen priority (``worker_niceness``), see :func:`start_private_ray`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

__all__ = ["start_private_ray"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_private_ray(num_cpus: int | None = None, worker_niceness: int | None = None,
                      **kwargs: Any) -> dict[str, Any]:
    """``ray.init(address="local", ...)`` with a dashboard the state API is pointed at; returns the
    ``ray.init`` context as a dict plus ``api_server`` (the URL exported).

    ``worker_niceness``: Ray starts its worker processes at nice 15 so that its own daemons stay responsive.
    On a machine shared with other (nice 0) work that alone can starve training; 0 gives workers the same
    priority as any other process (benchmarks compare Ray Train with a plain loop at nice 0).
    """
    import ray
    if worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(int(worker_niceness))   # read by the raylet at start
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    kwargs.setdefault("logging_level", logging.WARNING)
    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=port, **kwargs)
    info = dict(getattr(ctx, "address_info", {}) or {})
    info["api_server"] = url
    return info
