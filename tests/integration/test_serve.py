"""``sodkd serve`` for real: the CLI in a subprocess (``--local``: its own private Ray, Serve's HTTP proxy on a free
port of 127.0.0.1), a real ``scfnet_m3`` weights file, real ECSSD images and plain HTTP requests (http.client).

One service runs for the whole module (starting Ray, Serve and a replica that imports torch takes a while on a
busy machine); it is stopped at the end with SIGTERM, which is how ``serve_forever`` ends: ``serve.shutdown()``,
then ``ray.shutdown()`` -- the test checks it exits 0 and says so.

The replica's masks are compared with a :class:`cluster.predictor.Predictor` of the same weights run in this
process, so a reply that is the wrong image's map (a batch answered out of order), the wrong size or not the
model's output fails. The model is the one of tests/unit/test_predictor.py: a real ``scfnet_m3`` at 64 px whose
finest head is scaled so its maps span (0, 1) (masks of a fresh network sit near 0.5 and tell nothing apart).

Settings under test (flags and dotted overrides of the real CLI): route prefix ``/sod``, replica ``num_cpus``
0.25, batching at most 4 requests waiting 0.25 s, uploads up to 64 KiB, images up to 100,000 pixels.
"""

from __future__ import annotations

import collections
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "sample-data" / "ecssd" / "images"
PREFIX = "/sod"
MAX_BATCH = 4
BATCH_WAIT_S = 0.25
MAX_UPLOAD = 64 * 1024
MAX_PIXELS = 100_000
SIZE = 64
STARTUP_S = 420            # Ray + Serve + a replica importing torch, on 2 cores shared with training jobs
REQUEST_S = 180


# --- the model, the images and what the model says about them ------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from models import save_weights
    from tests.conftest import spread_student

    path = tmp_path_factory.mktemp("serve") / "m3.pt"
    save_weights(spread_student(SIZE), path)
    return path


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes, tuple[int, int]]]:
    """(name, JPEG bytes, (height, width)) of 8 ECSSD images of several sizes, all under the upload limit."""
    from kd.imageio import oriented_size

    out = []
    for p in sorted(IMAGES.glob("*.jpg")):
        data = p.read_bytes()
        if len(data) < MAX_UPLOAD:
            out.append((p.name, data, oriented_size(data)))
        if len(out) == 8:
            break
    assert len(out) == 8 and len({hw for _, _, hw in out}) > 1, "want 8 sample images of more than one size"
    return out


@pytest.fixture(scope="module")
def reference(weights, images) -> dict[str, np.ndarray]:
    """name -> the probability map of the same Predictor, one image at a time, in this process."""
    from cluster.predictor import Predictor
    from kd.imageio import decode_image

    pred = Predictor.load(weights, backend="eager", device="cpu", threads=1)
    maps = {name: pred.predict([decode_image(data)])[0] for name, data, _ in images}
    assert min(m.min() for m in maps.values()) < 0.2 and max(m.max() for m in maps.values()) > 0.8
    return maps


def _mask_of(prob: np.ndarray) -> np.ndarray:
    from cluster.render import Render
    return Render("mask").mask(prob)


# --- the service ----------------------------------------------------------------------------------------------

class Service:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path):
        self.port, self.proc, self.log = port, proc, log
        self.health: dict = {}

    def call(self, method: str, path: str, body=None, headers: dict | None = None,
             timeout: float = REQUEST_S) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, PREFIX + path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def predict(self, data: bytes, query: str = "", headers: dict | None = None):
        return self.call("POST", "/predict" + (f"?{query}" if query else ""), data,
                         {"Content-Type": "image/jpeg", **(headers or {})})

    def get_health(self) -> dict:
        status, _, body = self.call("GET", "/healthz")
        assert status == 200, (status, body)
        return json.loads(body)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture(scope="module")
def started(weights, tmp_path_factory):
    """``sodkd serve --local`` launched in a subprocess (its own process group); stopped at the end with SIGTERM
    (SIGKILL to its group only if it does not stop)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [sys.executable, "-m", "jobs.cli", "serve", "--local", "--local-cpus", "2", "--weights", str(weights),
           "--port", str(port), "--route-prefix", PREFIX, "--name", "sodkd-test", "--num-cpus", "0.25",
           "--max-batch-size", str(MAX_BATCH), "--batch-wait-s", str(BATCH_WAIT_S), "--threads", "1",
           f"limits.max_upload_bytes={MAX_UPLOAD}", f"limits.max_pixels={MAX_PIXELS}", "max_ongoing_requests=16"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    svc = Service(port, proc, log)
    svc.launched = time.monotonic()
    try:
        yield svc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)               # serve_forever: serve.shutdown(), then ray.shutdown()
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)        # only the process group this fixture started
                proc.wait(timeout=30)
                pytest.fail(f"sodkd serve did not stop within 180 s of SIGTERM:\n{svc.log_tail()}")


@pytest.fixture(scope="module")
def service(started, reference):
    """The launched service once its /healthz answers 200 (the in-process reference maps are computed while Ray
    and Serve start)."""
    svc, proc = started, started.proc
    import cluster.serve  # noqa: F401 - Ray Serve's import (half a minute on a loaded machine) while it boots
    deadline = svc.launched + STARTUP_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sodkd serve exited {proc.returncode} before it served:\n{svc.log_tail()}")
        try:
            status, _, body = svc.call("GET", "/healthz", timeout=30)
            if status == 200:
                svc.health = json.loads(body)
                break
        except (OSError, http.client.HTTPException):
            pass                                   # the proxy is not listening yet
        if time.monotonic() > deadline:
            pytest.fail(f"no 200 from /healthz within {STARTUP_S} s:\n{svc.log_tail()}")
        time.sleep(1.0)
    svc.started_s = time.monotonic() - svc.launched
    return svc


def _png(body: bytes) -> Image.Image:
    assert body[:8] == b"\x89PNG\r\n\x1a\n", body[:64]
    img = Image.open(io.BytesIO(body))
    img.load()
    return img


# --- tests ----------------------------------------------------------------------------------------------------

def test_healthz_reports_the_model_and_the_batching_config(service):
    status, headers, body = service.call("GET", "/healthz")
    assert status == 200 and headers["content-type"].startswith("application/json")
    h = json.loads(body)
    assert (h["status"], h["model"], h["backend"], h["size"]) == ("ok", "scfnet_m3", "onnx", SIZE)   # auto on a CPU: ONNX Runtime
    assert h["batching"] == {"enabled": True, "max_batch_size": MAX_BATCH, "batch_wait_timeout_s": BATCH_WAIT_S}
    assert h["pid"] == service.health["pid"] and h["replica"] == service.health["replica"]
    print(f"service up after {service.started_s:.0f} s; model loaded in {h['load_s']} s")


def test_raw_body_gives_the_models_mask_at_the_image_size(service, images, reference):
    name, data, (h, w) = images[0]
    status, headers, body = service.predict(data)
    assert status == 200, body[:300]
    assert headers["content-type"] == "image/png"
    img = _png(body)
    assert img.mode == "L" and img.size == (w, h)
    got = np.asarray(img).astype(int)
    assert np.abs(got - _mask_of(reference[name]).astype(int)).max() <= 1
    assert got.min() < 64 and got.max() > 192                     # a map, not a constant
    # a lone request: a batch of one, after waiting the configured batch_wait_timeout_s for company
    assert headers["x-sodkd-batch-size"] == "1" and int(headers["x-sodkd-batch-id"]) >= 1
    assert float(headers["x-sodkd-queue-wait-ms"]) >= 0.8 * 1000 * BATCH_WAIT_S, headers
    for key in ("read-ms", "decode-ms", "forward-ms", "encode-ms", "total-ms"):
        assert float(headers[f"x-sodkd-{key}"]) >= 0.0


def _multipart(parts: list[tuple[str, str | None, str, bytes]], boundary: str = "sodkd-b0undary") -> tuple[bytes, str]:
    out = io.BytesIO()
    for name, filename, ctype, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("field", ["image", "upload"])
def test_multipart_upload_gives_the_mask_of_the_file_part(service, images, reference, field):
    """The ``image`` field, else the first part with a filename; a text field before it is not the image."""
    name, data, (h, w) = images[1]
    body, ctype = _multipart([("note", None, "text/plain", b"not the image"),
                              (field, name, "image/jpeg", data)])
    status, headers, out = service.call("POST", "/predict", body, {"Content-Type": ctype})
    assert status == 200, out[:300]
    img = _png(out)
    assert img.size == (w, h)
    assert np.abs(np.asarray(img).astype(int) - _mask_of(reference[name]).astype(int)).max() <= 1


def test_json_output_has_map_stats_and_timings(service, images, reference):
    name, data, (h, w) = images[2]
    status, headers, body = service.predict(data, "output=json")
    assert status == 200 and headers["content-type"].startswith("application/json"), body[:300]
    r = json.loads(body)
    assert (r["model"], r["backend"], r["size"]) == ("scfnet_m3", "onnx", SIZE)
    ref = reference[name]
    m = r["map"]
    assert (m["height"], m["width"]) == (h, w) and m["threshold"] == 0.5
    assert m["min"] <= m["mean"] <= m["max"] and 0.0 <= m["min"] and m["max"] <= 1.0
    assert m["mean"] == pytest.approx(float(ref.mean()), abs=1e-4)
    assert m["foreground"] == pytest.approx(float((ref >= 0.5).mean()), abs=1e-3)
    t = r["timings"]
    assert t["batch_size"] == 1 and t["batch_id"] >= 1
    for key in ("read_ms", "decode_ms", "queue_wait_ms", "forward_ms", "total_ms"):
        assert t[key] >= 0.0, (key, t)
    assert t["total_ms"] >= t["forward_ms"] and t["total_ms"] >= t["queue_wait_ms"]


def test_cutout_is_an_rgba_png_of_the_image_with_the_mask_as_alpha(service, images, reference):
    from kd.imageio import decode_image

    name, data, (h, w) = images[3]
    status, headers, body = service.predict(data, "output=cutout")
    assert status == 200 and headers["content-type"] == "image/png", body[:300]
    img = _png(body)
    assert img.mode == "RGBA" and img.size == (w, h)
    rgba = np.asarray(img)
    assert np.array_equal(rgba[..., :3], decode_image(data))
    assert np.abs(rgba[..., 3].astype(int) - _mask_of(reference[name]).astype(int)).max() <= 1


def test_threshold_query_binarises_the_mask(service, images, reference):
    name, data, (h, w) = images[4]
    status, _, body = service.predict(data, "threshold=0.5")
    assert status == 200, body[:300]
    got = np.asarray(_png(body))
    assert got.shape == (h, w) and set(np.unique(got)) <= {0, 255}
    ref = reference[name]
    clear = np.abs(ref - 0.5) > 1e-3                   # pixels a float wobble cannot flip
    assert np.array_equal(got[clear], np.where(ref[clear] >= 0.5, 255, 0))


def test_concurrent_requests_share_a_forward_pass(service, images, reference):
    """8 requests at once with batching on (at most 4 per batch, 0.25 s wait): some answers report a batch of
    more than one, every batch id is reported by exactly batch-size answers, none exceeds max_batch_size, and each
    answer is the map of its own image (images of different sizes share a batch)."""

    def one(item, barrier):
        name, data, hw = item
        barrier.wait()
        t0 = time.perf_counter()
        status, headers, body = service.predict(data)
        return name, hw, status, headers, body, time.perf_counter() - t0

    rounds = []
    for attempt in range(3):                       # a loaded machine may stagger the requests past the wait
        barrier = threading.Barrier(len(images))
        results: list = [None] * len(images)

        def run(i):
            results[i] = one(images[i], barrier)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=REQUEST_S + 30)
        assert all(r is not None for r in results), "a request did not come back"
        by_batch: dict[int, list] = collections.defaultdict(list)
        for name, (h, w), status, headers, body, _ in results:
            assert status == 200, body[:300]
            img = _png(body)
            assert img.size == (w, h), f"{name}: mask {img.size} for an image of {(w, h)}"
            assert np.abs(np.asarray(img).astype(int) - _mask_of(reference[name]).astype(int)).max() <= 1, name
            size, bid = int(headers["x-sodkd-batch-size"]), int(headers["x-sodkd-batch-id"])
            assert 1 <= size <= MAX_BATCH
            by_batch[bid].append((size, headers["x-sodkd-forward-ms"]))
        for bid, members in by_batch.items():
            sizes = {s for s, _ in members}
            assert sizes == {len(members)}, f"batch {bid}: {len(members)} answers report sizes {sizes}"
            assert len({f for _, f in members}) == 1, f"batch {bid}: one forward pass, several forward times"
        sizes = sorted((len(m) for m in by_batch.values()), reverse=True)
        rounds.append(sizes)
        if sizes[0] > 1:
            break
    print(f"batch sizes per round: {rounds}")
    assert rounds[-1][0] > 1, f"no request shared a forward pass in {len(rounds)} rounds of 8: {rounds}"


def _oversized() -> bytes:
    return np.random.default_rng(0).integers(0, 256, MAX_UPLOAD + 40_000, dtype=np.uint8).tobytes()


def _too_many_pixels() -> bytes:
    """A real photo resized to 400 x 400 = 160,000 pixels (over max_pixels) in a file well under the byte limit."""
    buf = io.BytesIO()
    Image.open(sorted(IMAGES.glob("*.jpg"))[0]).convert("RGB").resize((400, 400)).save(buf, "JPEG", quality=40)
    assert len(buf.getvalue()) < MAX_UPLOAD
    return buf.getvalue()


def _chunks(data: bytes, n: int = 8192):
    for i in range(0, len(data), n):
        yield data[i:i + n]


def _jpeg() -> bytes:
    return sorted(IMAGES.glob("*.jpg"))[0].read_bytes()


# (id, method, path, body maker, headers, status, error)
BAD = [
    ("empty-body", "POST", "/predict", lambda: b"", {"Content-Type": "image/jpeg"}, 400, "empty"),
    ("not-an-image", "POST", "/predict", lambda: b"this is plain text, not a picture\n" * 40,
     {"Content-Type": "image/jpeg"}, 415, "not_an_image"),
    ("truncated-jpeg", "POST", "/predict", lambda: _jpeg()[: len(_jpeg()) // 2], {"Content-Type": "image/jpeg"},
     422, "truncated"),
    ("oversized-content-length", "POST", "/predict", _oversized, {"Content-Type": "image/jpeg"}, 413, "too_large"),
    ("oversized-chunked", "POST", "/predict", lambda: _chunks(_oversized()), {"Content-Type": "image/jpeg"},
     413, "too_large"),
    ("too-many-pixels", "POST", "/predict", _too_many_pixels, {"Content-Type": "image/jpeg"}, 413,
     "too_many_pixels"),
    ("multipart-empty-file", "POST", "/predict",
     lambda: _multipart([("image", "x.jpg", "image/jpeg", b"")])[0],
     {"Content-Type": _multipart([])[1]}, 400, "empty"),
    ("multipart-no-boundary", "POST", "/predict", _jpeg, {"Content-Type": "multipart/form-data"}, 400, "bad_form"),
    ("bad-output", "POST", "/predict?output=bogus", _jpeg, {}, 400, "bad_query"),
    ("threshold-out-of-range", "POST", "/predict?threshold=2", _jpeg, {}, 400, "bad_query"),
    ("threshold-nan", "POST", "/predict?threshold=nan", _jpeg, {}, 400, "bad_query"),
    ("threshold-not-a-number", "POST", "/predict?threshold=half", _jpeg, {}, 400, "bad_query"),
    ("unknown-parameter", "POST", "/predict?colour=red", _jpeg, {}, 400, "bad_query"),
    ("bad-format", "POST", "/predict?format=gif", _jpeg, {}, 400, "bad_query"),
    ("cutout-as-jpeg", "POST", "/predict?output=cutout&format=jpg", _jpeg, {}, 400, "bad_query"),
    ("get-predict", "GET", "/predict", lambda: None, {}, 405, "method_not_allowed"),
    ("post-healthz", "POST", "/healthz", lambda: b"x", {}, 405, "method_not_allowed"),
    ("unknown-path", "GET", "/nowhere", lambda: None, {}, 404, "not_found"),
]


def _send_bad(service, method, path, make, headers):
    try:
        return service.call(method, path, make(), headers)
    except (BrokenPipeError, ConnectionResetError) as e:     # a server that answers before reading it all
        pytest.fail(f"{method} {path}: connection broken before an answer ({e!r})")


@pytest.mark.parametrize("method,path,make,headers,status,error", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_answered_with_its_status(service, method, path, make, headers, status, error):
    got, hdrs, body = _send_bad(service, method, path, make, headers)
    assert got == status, (got, body[:300])
    assert hdrs["content-type"].startswith("application/json")
    r = json.loads(body)
    assert r["error"] == error and r["detail"], r


def test_the_replica_survives_every_bad_input_and_still_answers(service, images, reference):
    before = service.get_health()
    for _, method, path, make, headers, status, _ in BAD:
        assert _send_bad(service, method, path, make, headers)[0] == status
    after = service.get_health()
    # the same process, never restarted by Serve, counting every refused request
    assert (after["pid"], after["replica"]) == (service.health["pid"], service.health["replica"])
    assert after["errors"] - before["errors"] == len(BAD)
    assert after["requests"] - before["requests"] == len(BAD) + 1          # + the /healthz before
    name, data, (h, w) = images[5]
    status, _, body = service.predict(data)
    assert status == 200, body[:300]
    img = _png(body)
    assert img.size == (w, h)
    assert np.abs(np.asarray(img).astype(int) - _mask_of(reference[name]).astype(int)).max() <= 1
    assert service.get_health()["predictions"] == after["predictions"] + 1


def test_patient_ray_start_also_waits_for_the_dashboard():
    """``--local`` starts a Ray with a dashboard; Ray gives it 60 s (a constant read at import), which a loaded
    machine missed ("Failed to start the dashboard") before patient_ray_start raised it too."""
    from ray._private import ray_constants, services

    from cluster.serve import patient_ray_start

    before, get_node = ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S, services.get_node
    env = os.environ.get("RAY_agent_register_timeout_ms")
    try:
        with patient_ray_start(timeout_s=300.0):
            assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S >= 300
            assert services.get_node is not get_node
        assert (ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S, services.get_node) == (before, get_node)
    finally:
        if env is None:
            os.environ.pop("RAY_agent_register_timeout_ms", None)     # set (setdefault) for the raylet it starts


def test_sigterm_stops_the_service_cleanly(service):
    """Last: SIGTERM ends ``sodkd serve --local`` through serve.shutdown() and ray.shutdown(), exit code 0."""
    service.proc.send_signal(signal.SIGTERM)
    try:
        rc = service.proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 180 s after SIGTERM:\n{service.log_tail()}")
    log = service.log_tail(20000)
    assert rc == 0, log
    assert "serving " in log and "stopping" in log, log
    with pytest.raises(OSError):
        service.call("GET", "/healthz", timeout=5)
