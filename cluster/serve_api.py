"""What ``sodkd serve`` is configured with and what its HTTP API takes and answers (:mod:`cluster.serve` runs
it): the config sections (batching, autoscaling, limits), and the request handling that needs no Ray -- the body
read within ``limits.max_upload_bytes``, a ``multipart/form-data`` file field, the upload decoded within
``limits.max_pixels``, the query (``output``, ``threshold``, ``format``), and :class:`HTTPError`, the way every
bad request is answered (``{"error": REASON, "detail": ...}``)."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Literal

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from kd.config import ConfigError, load_config

__all__ = ["ServeConfig", "BatchingConfig", "AutoscalingConfig", "LimitsConfig", "load_serve_config", "OUTPUTS",
           "HTTPError", "read_body", "multipart_file", "decode_upload", "parse_query", "map_stats"]

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


def parse_query(request: Request, default_threshold: float | None) -> tuple[str, float | None, str]:
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
