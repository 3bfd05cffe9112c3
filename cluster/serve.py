"""``sodkd serve``: a saliency model behind HTTP, as a Ray Serve application.

One deployment, :class:`SaliencyService`, runs a :class:`cluster.predictor.Predictor` (any spec it accepts:
``MODEL:WEIGHTS``, a weights file, an exported ``.onnx`` / ``.pt2`` with its card, ...) in each replica:

- ``POST /predict`` with the image as the raw request body or as a ``multipart/form-data`` file field
  (``image``, ``file``, else the first part) -> a PNG mask at the image's size; ``?output=`` one of
  ``mask`` (default), ``cutout`` (RGBA PNG, alpha = the mask), ``overlay``, ``alpha`` (the soft matte) or
  ``json`` (the map's statistics and the request's timings); ``?threshold=T`` binarises the mask (mask,
  cutout, overlay), ``?format=png|webp|jpg``. Pixels are those ``sodkd predict`` writes
  (:class:`cluster.render.Render`). Every image response carries the timings as ``X-Sodkd-*`` headers too;
- ``GET /healthz`` -> ``{"status": "ok", ...}`` with the model, backend, size, the replica and its counters.

Requests are batched (``@serve.batch``): the requests a replica holds within ``batching.batch_wait_timeout_s``,
at most ``batching.max_batch_size``, go through one forward pass (run in a thread, so the replica keeps
accepting requests meanwhile); each reply says how long it waited (``queue_wait_ms``), the size and id of
its batch and the forward time. ``batching.enabled=false`` runs one request per forward pass.

Bad input is answered, never fatal: an empty body (400 ``empty``), a body over ``limits.max_upload_bytes``
(413 ``too_large``, checked against Content-Length before reading and while reading), more pixels than
``limits.max_pixels`` (413 ``too_many_pixels``, from the image header, before decoding), bytes that are no image
(415 ``not_an_image``), a truncated or corrupt image (422), a bad query or form (400), a wrong path (404) or method
(405) all get ``{"error": REASON, "detail": ...}``; an unexpected failure is logged and answered 500.

Replicas: ``num_replicas`` or ``autoscaling`` (min/max replicas, target ongoing requests), ``num_cpus``
(fractional: several replicas share a core) and ``num_gpus`` per replica. :func:`deploy` runs the application
on the Ray cluster this process is connected to; :func:`serve_forever` connects (``--address`` / ``RAY_ADDRESS``,
or a private local Ray for ``--local``), deploys and waits for Ctrl-C. The config and the request handling that
needs no Ray are :mod:`cluster.serve_api`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.serve_api import (HTTPError, ServeConfig, decode_upload, load_serve_config, map_stats, multipart_file,
                               parse_query, read_body)
from kd.config import to_dict

log = logging.getLogger(__name__)

__all__ = ["SaliencyService", "build_app", "deploy", "url_of", "connect", "serve_forever", "patient_ray_start"]


# --- the deployment --------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    rgb: np.ndarray
    queued: float                      # perf_counter() when the request joined the queue


@dataclasses.dataclass
class _Done:
    prob: np.ndarray | None
    queue_wait_ms: float
    batch_id: int
    batch_size: int
    forward_ms: float
    error: str | None = None


class SaliencyService:
    """One replica: a Predictor, a batching queue and the HTTP routes (see the module docstring)."""

    def __init__(self, config: Mapping[str, Any]):
        import torch

        from cluster.predictor import Predictor

        self.cfg = load_serve_config(config)
        torch.set_num_threads(self.cfg.threads)
        t0 = time.perf_counter()
        self.predictor = Predictor.load(self.cfg.model, backend=self.cfg.backend, size=self.cfg.size,
                                        device=self.cfg.device, precision=self.cfg.precision, threads=self.cfg.threads)
        s = self.predictor.size
        self.predictor.predict([np.zeros((s, s, 3), np.uint8)])      # warm-up: the first pass is the slow one
        self.load_s = time.perf_counter() - t0
        b = self.cfg.batching
        self._predict_batch.set_max_batch_size(b.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
        self._lock = asyncio.Lock()                                  # batching off: one forward pass at a time
        self._batch_ids = itertools.count(1)
        self.counters = {"requests": 0, "predictions": 0, "batches": 0, "errors": 0}
        try:
            self.replica = str(serve.get_replica_context().replica_id)
        except Exception:  # noqa: BLE001 - constructed outside Serve (a test of the class itself)
            self.replica = "local"
        log.info("replica %s: %s (%s) at %d, loaded in %.1f s", self.replica, self.predictor.name,
                 self.predictor.backend, s, self.load_s)

    # -- forward passes
    def _forward(self, jobs: list[_Job]) -> list[_Done]:
        start = time.perf_counter()
        batch_id = next(self._batch_ids)
        self.counters["batches"] += 1
        try:
            probs: list[np.ndarray | None] = list(self.predictor.predict([j.rgb for j in jobs]))
            error = None
        except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the replica
            log.exception("forward pass of %d image(s) failed", len(jobs))
            probs, error = [None] * len(jobs), f"{type(e).__name__}: {e}"
        forward_ms = 1000.0 * (time.perf_counter() - start)
        return [_Done(p, 1000.0 * (start - j.queued), batch_id, len(jobs), forward_ms, error)
                for j, p in zip(jobs, probs)]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)      # set from the config in __init__
    async def _predict_batch(self, jobs: list[_Job]) -> list[_Done]:
        return await asyncio.to_thread(self._forward, jobs)

    async def _predict_one(self, job: _Job) -> _Done:
        async with self._lock:
            return (await asyncio.to_thread(self._forward, [job]))[0]

    # -- HTTP
    async def __call__(self, request: Request) -> Response:
        t0 = time.perf_counter()
        self.counters["requests"] += 1
        try:
            return await self._route(request, t0)
        except HTTPError as e:
            self.counters["errors"] += 1
            return e.response()
        except Exception as e:  # noqa: BLE001 - never let a request take the replica down
            self.counters["errors"] += 1
            log.exception("request %s %s failed", request.method, request.url.path)
            return JSONResponse({"error": "internal", "detail": f"{type(e).__name__}: {e}"}, status_code=500)

    def _subpath(self, request: Request) -> str:
        path = request.url.path
        root = request.scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):]
        prefix = self.cfg.route_prefix.rstrip("/")
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        return "/" + path.strip("/")

    async def _route(self, request: Request, t0: float) -> Response:
        path = self._subpath(request)
        if path == "/healthz":
            if request.method not in ("GET", "HEAD"):
                raise HTTPError(405, "method_not_allowed", f"{request.method} {path}: use GET")
            return JSONResponse(self.health())
        if path != "/predict":
            raise HTTPError(404, "not_found", f"{path}: the routes are POST /predict and GET /healthz")
        if request.method != "POST":
            raise HTTPError(405, "method_not_allowed", f"{request.method} /predict: POST the image")
        return await self._predict(request, t0)

    def health(self) -> dict[str, Any]:
        p = self.predictor
        return {"status": "ok", "model": p.name, "backend": p.backend, "size": p.size, "replica": self.replica,
                "pid": os.getpid(), "load_s": round(self.load_s, 3), "batching": to_dict(self.cfg.batching),
                **self.counters}

    async def _predict(self, request: Request, t0: float) -> Response:
        from cluster.render import Render

        output, threshold, fmt = parse_query(request, self.cfg.threshold)
        render = None
        if output != "json":
            try:
                render = Render(output, threshold, fmt)
            except ValueError as e:
                raise HTTPError(400, "bad_query", str(e).replace("--mode", "output").replace("--", "")) from None
        body = await read_body(request, self.cfg.limits.max_upload_bytes)
        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):
            body = multipart_file(body, ctype)
        t1 = time.perf_counter()
        rgb = await asyncio.to_thread(decode_upload, body, self.cfg.limits.max_pixels)
        t2 = time.perf_counter()
        job = _Job(rgb, t2)
        done = await (self._predict_batch(job) if self.cfg.batching.enabled else self._predict_one(job))
        if done.error is not None:
            raise HTTPError(500, "forward_failed", done.error)
        self.counters["predictions"] += 1
        t3 = time.perf_counter()
        timings = {"read_ms": 1000.0 * (t1 - t0), "decode_ms": 1000.0 * (t2 - t1),
                   "queue_wait_ms": done.queue_wait_ms, "batch_size": done.batch_size, "batch_id": done.batch_id,
                   "forward_ms": done.forward_ms}
        if output == "json":
            timings["total_ms"] = 1000.0 * (time.perf_counter() - t0)
            return JSONResponse({"model": self.predictor.name, "backend": self.predictor.backend,
                                 "size": self.predictor.size, "replica": self.replica,
                                 "map": map_stats(done.prob, threshold), "timings": timings})
        data = await asyncio.to_thread(lambda: render.encode(render(rgb, done.prob)))
        timings["encode_ms"] = 1000.0 * (time.perf_counter() - t3)
        timings["total_ms"] = 1000.0 * (time.perf_counter() - t0)
        headers = {f"X-Sodkd-{k.replace('_', '-')}": (f"{v:.3f}" if isinstance(v, float) else str(v))
                   for k, v in timings.items()}
        return Response(data, media_type=render.media_type, headers=headers)

    def check_health(self) -> None:
        """Serve's periodic replica check: the model must be loaded."""
        if self.predictor is None:
            raise RuntimeError("no model loaded")


def build_app(cfg: ServeConfig):
    """The Serve application of ``cfg`` (``serve.run`` it)."""
    dep = serve.deployment(SaliencyService).options(**cfg.deployment_options())
    return dep.bind(to_dict(cfg))


def url_of(cfg: ServeConfig, host: str | None = None, port: int | None = None) -> str:
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{host or cfg.host}:{port if port is not None else cfg.port}{prefix}"


def deploy(cfg: ServeConfig, start_http: bool = True) -> str:
    """Run ``cfg``'s application on the connected Ray cluster (starting Serve and its HTTP proxy on
    ``cfg.host:cfg.port`` if it does not run yet); returns the application's base URL once its replicas are up."""
    if start_http:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    return url_of(cfg)


@contextlib.contextmanager
def patient_ray_start(timeout_s: float = 300.0):
    """Let a Ray node started in this block take up to ``timeout_s`` to come up. Ray gives its raylet a fixed
    30 s to register and its agents 30 s to report their ports, which a machine busy with other work -- or a
    process at low priority -- can miss; the start then fails and leaves its agents behind. Only the waits
    change (``RAY_agent_register_timeout_ms``, read by the raylet, and the driver's registration poll): the node
    is a real one. The dashboard (which :func:`cluster.raylocal.start_private_ray` starts) gets the same time:
    Ray reads ``RAY_DASHBOARD_STARTUP_TIMEOUT_S`` (60 s) when it is imported, so the constant itself is raised."""
    from ray._private import ray_constants, services

    os.environ.setdefault("RAY_agent_register_timeout_ms", str(int(timeout_s * 1000)))
    original = services.get_node
    dashboard_timeout = ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S
    ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(dashboard_timeout, int(timeout_s))

    def get_node(gcs_address, node_id):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return original(gcs_address, node_id)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = dashboard_timeout


def connect(address: str | None = None, local: bool = False, num_cpus: float | None = None) -> dict[str, Any]:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``), or start a private Ray on this machine (``local``).
    Returns ``ray.init``'s address info."""
    import ray

    if local:
        from cluster.raylocal import start_private_ray
        with patient_ray_start():
            return start_private_ray(num_cpus=int(math.ceil(num_cpus)) if num_cpus else None, log_to_driver=False)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no Ray cluster to serve on: give --address HOST:PORT, set RAY_ADDRESS, or use --local")
    ctx = ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return dict(getattr(ctx, "address_info", {}) or {})


def serve_forever(cfg: ServeConfig, address: str | None = None, local: bool = False, detach: bool = False,
                  local_cpus: float | None = None, log_fn: Callable[[str], None] = print,
                  stop: threading.Event | None = None) -> int:
    """Connect, deploy ``cfg`` and wait until interrupted (Ctrl-C / SIGTERM / ``stop``); then delete the
    application (on a cluster) or stop the private Ray (``local``). ``detach``: return once deployed and leave the
    application running on the cluster."""
    import ray

    if detach and local:
        raise ValueError("--detach: a --local Ray ends with this process; serve on a cluster to detach")
    connect(address, local, local_cpus)
    stop = stop or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = deploy(cfg)
        log_fn(f"serving {cfg.model} on {url}/predict (POST an image; ?output=mask|cutout|overlay|alpha|json), "
               f"health on {url}/healthz")
        if detach:
            log_fn(f"detached: application {cfg.app_name!r} keeps running; `serve shutdown` or "
                   f"serve.delete({cfg.app_name!r}) removes it")
            return 0
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        log_fn("stopping")
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not detach:
            try:
                if local:
                    serve.shutdown()
                else:
                    serve.delete(cfg.app_name)
            except Exception as e:  # noqa: BLE001 - teardown is best effort; Ray may already be gone
                log.warning("teardown: %s", e)
        ray.shutdown()
