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
or a private local Ray for ``--local``), deploys and waits for Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import itertools
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Literal, Mapping

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kd.config import ConfigError, load_config, to_dict

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "BatchingConfig", "AutoscalingConfig", "LimitsConfig", "load_serve_config",
           "SaliencyService", "build_app", "deploy", "connect", "serve_forever", "patient_ray_start", "OUTPUTS",
           "HTTPError"]

OUTPUTS = ("mask", "cutout", "overlay", "alpha", "json")


# --- configuration ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching (``@serve.batch``): at most ``max_batch_size`` requests per forward pass, waiting at most
    ``batch_wait_timeout_s`` for the batch to fill; ``enabled=false``: one request per forward pass."""

    enabled: bool = True
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"batching.max_batch_size: must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"batching.batch_wait_timeout_s: must be >= 0, got {self.batch_wait_timeout_s}")


@dataclasses.dataclass(frozen=True)
class AutoscalingConfig:
    """Ray Serve autoscaling of the replicas (its ``autoscaling_config``)."""

    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                              f"{self.min_replicas}, {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ConfigError(f"autoscaling.initial_replicas: must lie in [min_replicas, max_replicas], got "
                              f"{self.initial_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"autoscaling.target_ongoing_requests: must be > 0, got {self.target_ongoing_requests}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ConfigError("autoscaling: upscale_delay_s and downscale_delay_s must be >= 0")


@dataclasses.dataclass(frozen=True)
class LimitsConfig:
    """What a request may carry: bytes of the upload and pixels of the decoded image."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ConfigError(f"limits.max_upload_bytes: must be >= 1, got {self.max_upload_bytes}")
        if self.max_pixels < 1:
            raise ConfigError(f"limits.max_pixels: must be >= 1, got {self.max_pixels}")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """``sodkd serve``: which model, how each replica runs it, how many replicas, the HTTP side.

    Attributes:
        model: a :class:`cluster.predictor.Predictor` spec (``MODEL:WEIGHTS``, a weights file, an exported
            ``.onnx`` / ``.pt2`` file, ...); it must be readable where the replicas run.
        backend, size, device, precision: as ``sodkd predict`` (``size`` None = the model's own).
        threads: intra-op threads per replica (torch and ONNX Runtime).
        threshold: default binarisation of mask / cutout / overlay replies (None = the soft map; a request's
            ``?threshold=`` wins).
        host, port: where Ray Serve's HTTP proxy listens (a cluster-wide setting: an already running Serve
            keeps its own).
        route_prefix, app_name: the application's URL prefix and name (several may run side by side).
        num_replicas: fixed replica count (default 1); or ``autoscaling`` (not both).
        num_cpus, num_gpus: Ray resources per replica (fractions are fine).
        max_ongoing_requests: requests a replica holds at once (queued for its batches included).
        batching, limits: see :class:`BatchingConfig`, :class:`LimitsConfig`.
    """

    model: str
    backend: Literal["auto", "eager", "onnx", "pt2"] = "auto"
    size: int | None = None
    device: str = "cpu"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    threads: int = 1
    threshold: float | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "sodkd"
    num_replicas: int | None = None
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: a model spec is required (MODEL:WEIGHTS, a weights or exported file)")
        if self.size is not None and (self.size < 32 or self.size % 32):
            raise ConfigError(f"size: a multiple of 32, at least 32, got {self.size}")
        if self.threads < 1:
            raise ConfigError(f"threads: must be >= 1, got {self.threads}")
        if self.threshold is not None and not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"threshold: a probability in [0, 1], got {self.threshold}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix: must start with '/', got {self.route_prefix!r}")
        if not self.app_name:
            raise ConfigError("app_name: must not be empty")
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ConfigError("num_replicas: give num_replicas or autoscaling, not both")
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ConfigError(f"num_replicas: must be >= 1, got {self.num_replicas}")
        for name in ("num_cpus", "num_gpus"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v}")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")

    def deployment_options(self) -> dict[str, Any]:
        """Options for ``serve.deployment(...).options(**)``: replicas, resources, concurrency."""
        opts: dict[str, Any] = {
            "name": "SaliencyService",
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling is not None:
            a = dataclasses.asdict(self.autoscaling)
            if a["initial_replicas"] is None:
                del a["initial_replicas"]
            opts["autoscaling_config"] = a
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


def load_serve_config(source: Any = None, overrides: Any = None) -> ServeConfig:
    """YAML path or mapping + dotted overrides -> :class:`ServeConfig` (strict, see :mod:`kd.config`)."""
    return load_config(ServeConfig, source, overrides)


# --- requests --------------------------------------------------------------------------------------------

class HTTPError(Exception):
    """A request we answer with ``status`` and ``{"error": reason, "detail": detail}``."""

    def __init__(self, status: int, reason: str, detail: str = ""):
        super().__init__(f"{status} {reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.reason, "detail": self.detail}, status_code=self.status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (by Content-Length, then while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HTTPError(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if n > limit:
            raise HTTPError(413, "too_large", f"upload of {n} bytes exceeds limits.max_upload_bytes={limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise HTTPError(413, "too_large", f"upload of more than {limit} bytes (limits.max_upload_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    """``multipart/form-data; boundary="x"`` -> (``multipart/form-data``, {"boundary": "x"})."""
    from email.message import Message

    msg = Message()
    msg["content-type"] = value
    params = dict((k.lower(), v) for k, v in msg.get_params(header="content-type")[1:])
    return msg.get_content_type(), params


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The image of a ``multipart/form-data`` body: the part named ``image`` or ``file``, else the first part
    that carries a filename, else the first part."""
    _, params = _header_params(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPError(400, "bad_form", "multipart/form-data without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    pieces = body.split(delim)
    if len(pieces) < 3:
        raise HTTPError(400, "bad_form", "multipart body without parts")
    parts = []
    for piece in pieces[1:-1]:                     # pieces[0]: preamble; pieces[-1]: "--" + epilogue
        piece = piece[2:] if piece.startswith(b"\r\n") else piece
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise HTTPError(400, "bad_form", "a multipart part has no header/body separator")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        disposition = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value.strip()
        _, dparams = _header_params(f"form-data; {disposition.partition(';')[2]}") if disposition else ("", {})
        parts.append((dparams.get("name", ""), dparams.get("filename"), data))
    if not parts:
        raise HTTPError(400, "bad_form", "multipart body without parts")
    for wanted in ("image", "file"):
        for name, _, data in parts:
            if name == wanted:
                return data
    return next((data for _, filename, data in parts if filename is not None), parts[0][2])


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> uint8 RGB, refusing images of more than ``max_pixels`` before decoding them."""
    from PIL import Image

    from kd.imageio import ImageDecodeError, decode_image

    if not data:
        raise HTTPError(400, "empty", "the request has no image: send its bytes as the body or as a form file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError as e:
        raise HTTPError(413, "too_many_pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001 - anything PIL cannot identify is no image to us
        raise HTTPError(415, "not_an_image", f"{len(data)} bytes that no image decoder recognises "
                        f"({type(e).__name__})") from None
    if w * h > max_pixels:
        raise HTTPError(413, "too_many_pixels", f"{w}x{h} = {w * h} pixels exceeds limits.max_pixels={max_pixels}")
    try:
        return decode_image(data)
    except ImageDecodeError as e:
        status = {"not_an_image": 415, "too_large": 413, "empty": 400}.get(e.reason, 422)
        reason = "too_many_pixels" if e.reason == "too_large" else e.reason
        raise HTTPError(status, reason, str(e)) from None


def _query(request: Request, default_threshold: float | None) -> tuple[str, float | None, str]:
    q = request.query_params
    unknown = sorted(set(q) - {"output", "threshold", "format"})
    if unknown:
        raise HTTPError(400, "bad_query", f"unknown parameter(s) {', '.join(unknown)} (known: output, threshold, "
                        "format)")
    output = q.get("output", "mask")
    if output not in OUTPUTS:
        raise HTTPError(400, "bad_query", f"output: expected one of {', '.join(OUTPUTS)}, got {output!r}")
    threshold = default_threshold
    if "threshold" in q:
        try:
            threshold = float(q["threshold"])
        except ValueError:
            raise HTTPError(400, "bad_query", f"threshold: a probability in [0, 1], got {q['threshold']!r}") from None
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise HTTPError(400, "bad_query", f"threshold: a probability in [0, 1], got {q['threshold']!r}")
    fmt = q.get("format", "png")
    return output, threshold, fmt


def map_stats(prob: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """What ``?output=json`` says about a map: its size and its probabilities' summary."""
    t = 0.5 if threshold is None else threshold
    return {"height": int(prob.shape[0]), "width": int(prob.shape[1]), "mean": float(prob.mean()),
            "min": float(prob.min()), "max": float(prob.max()), "threshold": t,
            "foreground": float((prob >= t).mean())}


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

        output, threshold, fmt = _query(request, self.cfg.threshold)
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
