"""Nothing lost, nothing leaked (issue 13, items 1-3): the labelling job on real Ray, a real S3 endpoint (moto's
ThreadedMotoServer on 127.0.0.1) behind a TCP proxy that can refuse connections or answer 503 (a storage
outage, throttling), and local folders holding what real folders hold (odd names, broken links, FIFOs, EXIF
photos, animated GIFs).

- keys are data: keys with ``..``, ``//``, ``./``, backslashes, spaces and unicode are read, hashed and stored
  as listed, byte for byte (decoys at the keys a normalised path would name prove it), and nothing is
  written outside the output prefix;
- every object is labelled, rejected with a reason, or counted in ``ignored``;
- transient is not final: an outage longer than the retries defers inputs (not done, the run raises
  ``DeferredInputs``) and the rerun labels exactly what it left; a short 503 spell is waited out.

The teacher is a randomly initialised ``scfnet_r18`` at 128 px with 64 px labels, as in test_labelling.py.
"""

from __future__ import annotations

import collections
import io
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster import labels as L
from cluster.label import DecodeConfig, DeferredInputs, LabelConfig, RetryConfig, WriteConfig, run_labelling
from cluster.raypool import PoolConfig
from cluster.storage import S3Config, boto3_client, get_filesystem
from cluster.teachers import build_teacher
from cluster.tracking import TrackingConfig
from kd import schema as S
from kd.imageio import decode_image, resize
from models import create_model, save_weights
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

TEACHER_SIZE = 128
LABEL_SIZE = 64
BUCKET = "sodkd-faults"


class _Answer:
    """Follows one awaited HTTP answer through the proxy: :meth:`passed` is true once its status line, headers
    and whole body (``Content-Length``) have been sent on, and the status was 200."""

    def __init__(self):
        self._buf: bytes | None = None

    def expect(self) -> None:
        self._buf = b""

    def passed(self, chunk: bytes) -> bool:
        if self._buf is None:
            return False
        self._buf += chunk
        head, sep, body = self._buf.partition(b"\r\n\r\n")
        while sep and head.startswith(b"HTTP/1.1 100"):   # "100 Continue" precedes the real answer
            self._buf = body
            head, sep, body = self._buf.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length and len(body) < int(length.group(1)):
            return False
        self._buf = None
        return head.startswith(b"HTTP/1.1 200")


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``. Modes: ``up`` forwards; ``refuse`` closes the
    listening socket and cuts every live connection (clients get connection refused / reset: an endpoint
    that is down); ``503`` answers every request with ``503 SlowDown`` (throttling).

    ``label_puts_answered`` counts label-shard writes (the upload that completes the object) whose ``200`` answer the proxy has passed back to the
    client: an outage started after that cannot take the answer of that write away (an object seen on the
    server is not yet a write the job knows has landed)."""

    _SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                  b'<Message>Please reduce your request rate.</Message></Error>')

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self.mode = "up"
        self.requests_refused = 0
        self.label_puts_answered = 0
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._sock: socket.socket | None = None
        self._closed = False
        self._listen()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.settimeout(0.05)
        self._sock = s

    def set_mode(self, mode: str) -> None:
        with self._lock:
            self.mode = mode
            if mode == "refuse" and self._sock is not None:
                self._sock.close()
                self._sock = None
            elif mode != "refuse" and self._sock is None:
                self._listen()
            for c in list(self._live):   # connections opened before the switch do not outlive it
                self._cut(c)
            self._live.clear()

    @staticmethod
    def _finishes_label_write(request_line: bytes) -> bool:
        """The request that makes a label shard appear: a single-part PUT, or the POST completing a multipart
        upload (pyarrow's S3 writer uploads parts, then completes)."""
        if b"/labels/" not in request_line:
            return False
        if request_line.startswith(b"PUT "):
            return b"partNumber=" not in request_line
        return request_line.startswith(b"POST ") and b"uploadId=" in request_line

    @staticmethod
    def _cut(c: socket.socket) -> None:
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        c.close()

    def close(self) -> None:
        self._closed = True
        self.set_mode("refuse")

    def _accept_loop(self) -> None:
        while not self._closed:
            sock = self._sock
            if sock is None:
                time.sleep(0.01)
                continue
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        if self.mode == "503":
            self.requests_refused += 1
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(self._SLOW_DOWN), self._SLOW_DOWN))
            except OSError:
                pass
            conn.close()
            return
        try:
            up = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            conn.close()
            return
        with self._lock:
            self._live.update((conn, up))
        answer = _Answer()   # the answer to a label-shard write on this connection (HTTP/1.1: one at a time)
        for a, b, upward in ((conn, up, True), (up, conn, False)):
            threading.Thread(target=self._pump, args=(a, b, upward, answer), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool, answer: "_Answer") -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                if upward and self._finishes_label_write(chunk.split(b"\r\n", 1)[0]):
                    answer.expect()
                dst.sendall(chunk)
                if not upward and answer.passed(chunk):
                    with self._lock:
                        self.label_puts_answered += 1
        except OSError:
            pass
        for s in (src, dst):
            self._cut(s)
        with self._lock:
            self._live.discard(src)
            self._live.discard(dst)


@pytest.fixture(scope="module")
def moto_port(s3_endpoint):
    """The port of the shared S3 endpoint (tests/integration/conftest.py), with this module's bucket."""
    boto3_client(S3Config(endpoint_url=s3_endpoint)).create_bucket(Bucket=BUCKET)
    return int(s3_endpoint.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def direct(moto_port):
    """S3 settings straight to moto (the test's own view of the bucket, never through the proxy)."""
    return S3Config(endpoint_url=f"http://127.0.0.1:{moto_port}")


@pytest.fixture
def proxy(moto_port):
    p = FlakyProxy(moto_port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def ray_started(moto_port):
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "r18.pt"
    save_weights(create_model("scfnet_r18"), path)
    return f"scfnet_r18:{path}"


def _images(shared_data, n: int, start: int = 0) -> list[Path]:
    return sorted((shared_data / "unlabeled" / "imagenet-1k").glob("*.jpg"))[start:start + n]


def _cfg(inp, out, teacher_spec, **kw) -> LabelConfig:
    base = dict(input=str(inp), output=str(out), teachers=(teacher_spec,), teacher_size=TEACHER_SIZE,
                label_size=LABEL_SIZE, progress=False, tracking=TrackingConfig(enabled=False),
                pool=PoolConfig(size=1, num_cpus=0.5, batch_size=2, torch_threads=2),
                decode=DecodeConfig(num_cpus=0.25, batch_size=2), write=WriteConfig(num_cpus=0.25, shard_rows=2))
    base.update(kw)
    return LabelConfig(**base)


def _raw_ids(uri: str, s3: S3Config | None) -> collections.Counter:
    """Every id in every label and reject shard, NOT deduplicated: what "exactly once" is checked on."""
    fs, root = get_filesystem(uri, s3)
    ids: collections.Counter = collections.Counter()
    for kind in (S.LABELS_DIR, S.REJECTS_DIR):
        for p in L.shard_paths(fs, root, kind):
            ids.update(pq.read_table(p, filesystem=fs, columns=[S.ID]).column(S.ID).to_pylist())
    return ids


def _assert_exactly_once(uri: str, s3: S3Config | None, keys) -> None:
    ids = _raw_ids(uri, s3)
    assert set(ids) == {S.stable_id(k) for k in keys}
    assert not {i: c for i, c in ids.items() if c != 1}, "ids written more than once"


def _resized(src: Path, size: tuple[int, int]) -> bytes:
    with Image.open(src) as im:
        buf = io.BytesIO()
        im.convert("RGB").resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


# --- keys are data --------------------------------------------------------------------------------------

ODD_KEYS = ["a.jpg", "../escape.jpg", "x//y.jpg", "./dot.jpg", "sub/../b.jpg", "back\\slash.jpg", "sp ace.jpg",
            "ünï😀/é.jpg", "/lead.jpg"]
# where a normalising reader would have gone instead: a different image sits there, so a wrong read shows
DECOYS = ["escape.jpg", "in/x/y.jpg", "in/dot.jpg", "in/b.jpg", "in/lead.jpg"]


def test_s3_keys_round_trip_byte_for_byte(ray_started, teacher, shared_data, direct):
    client = boto3_client(direct)
    srcs = _images(shared_data, len(ODD_KEYS) + len(DECOYS), start=300)
    # a size of its own for every object: a wrong object read shows in the stored original size
    bodies = [_resized(p, (120 + 6 * i, 90 + 4 * i)) for i, p in enumerate(srcs)]
    sizes = {}
    for key, body in zip(ODD_KEYS, bodies):
        client.put_object(Bucket=BUCKET, Key=f"in/{key}", Body=body)
        sizes[key] = _size(body)
    for key, body in zip(DECOYS, bodies[len(ODD_KEYS):]):
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
        if key.startswith("in/"):
            sizes[key[len("in/"):]] = _size(body)
    assert len(set(sizes.values())) == len(sizes)
    client.put_object(Bucket=BUCKET, Key="in/notes.txt", Body=b"not an image")
    client.put_object(Bucket=BUCKET, Key="in/folder/", Body=b"")
    client.put_object(Bucket=BUCKET, Key="in/.hidden.jpg", Body=bodies[0])
    inp = f"s3://{BUCKET}/in"
    out = f"s3://{BUCKET}/out"
    # the decoys under in/ are inputs too (in/x/y.jpg, in/dot.jpg, in/b.jpg, in/lead.jpg); escape.jpg is not
    inputs = ODD_KEYS + [d[len("in/"):] for d in DECOYS if d.startswith("in/")]

    summary = run_labelling(_cfg(inp, out, teacher, s3=direct), samples=0)
    assert (summary.total, summary.labelled, summary.rejected) == (len(inputs), len(inputs), 0)
    assert summary.ignored == {".txt": 1, "folder_marker": 1, "hidden": 1}
    rows = {r[S.KEY]: r for r in L.read_labels(out, direct).to_pylist()}
    assert sorted(rows) == sorted(inputs)
    for key, row in rows.items():
        assert row[S.ID] == S.stable_id(key), key
        assert (row[S.ORIG_H], row[S.ORIG_W]) == sizes[key], key
    # nothing written but under the output prefix, and only names of our own (shards, the review list)
    everything = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                  for o in page.get("Contents", [])]
    written = set(everything) - {f"in/{k}" for k in inputs} - set(DECOYS) - {
        "in/notes.txt", "in/folder/", "in/.hidden.jpg"}
    assert written and all(k == f"out/{S.REVIEW_FILE}" or (k.startswith("out/labels/part-") and k.endswith(".parquet"))
                           for k in written), written
    review = client.get_object(Bucket=BUCKET, Key=f"out/{S.REVIEW_FILE}")["Body"].read().decode("utf-8")
    assert "../escape.jpg" in review and "ünï😀/é.jpg" in review
    again = run_labelling(_cfg(inp, out, teacher, s3=direct), samples=0)
    assert (again.labelled, again.skipped_done) == (0, len(inputs))


PORTRAIT = (160, 240)   # (width, height) as displayed


def _exif_portrait(src: Path) -> bytes:
    """``src`` as a 160x240 portrait, stored sideways (240x160) with the EXIF orientation that shows it upright."""
    with Image.open(src) as im:
        upright = im.convert("RGB").resize(PORTRAIT)
    sideways = upright.transpose(Image.Transpose.ROTATE_90)   # counter-clockwise; orientation 6 turns it back
    assert sideways.size == PORTRAIT[::-1]
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    sideways.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_local_folder_accounts_for_every_entry(ray_started, teacher, shared_data, tmp_path):
    inp = tmp_path / "in"
    (inp / "sub dir").mkdir(parents=True)
    srcs = _images(shared_data, 6, start=320)
    for name, p in zip(["back\\slash.jpg", "sp ace.jpg", "ünï😀.jpg", "sub dir/a..b.jpg"], srcs):
        shutil.copy(p, inp / name)
    (inp / "portrait.jpg").write_bytes(_exif_portrait(srcs[4]))
    frames = [Image.open(srcs[5]).convert("RGB").resize((96, 64)), Image.new("RGB", (96, 64), (0, 0, 255))]
    frames[0].save(inp / "anim.gif", "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    os.symlink("gone.jpg", inp / "broken.jpg")
    os.mkfifo(inp / "fifo.jpg")
    os.symlink("sub dir", inp / "linked")
    (inp / "notes.txt").write_text("x")
    (inp / ".DS_Store").write_bytes(b"\0\0")
    out = tmp_path / "out"

    summary = run_labelling(_cfg(inp, out, teacher), samples=0)
    labelled = {r[S.KEY]: r for r in L.read_labels(str(out)).to_pylist()}
    assert sorted(labelled) == sorted(["back\\slash.jpg", "sp ace.jpg", "ünï😀.jpg", "sub dir/a..b.jpg",
                                       "portrait.jpg", "anim.gif"])
    rejects = {r[S.KEY]: r for r in L.read_rejects(str(out)).to_pylist()}
    assert {k: r[S.REASON] for k, r in rejects.items()} == {
        "broken.jpg": "broken_link", "fifo.jpg": "special_file", "linked": "linked_dir"}
    assert "gone.jpg" in rejects["broken.jpg"][S.DETAIL] and "FIFO" in rejects["fifo.jpg"][S.DETAIL]
    assert summary.ignored == {".txt": 1, "hidden": 1}
    entries = [e for d in (inp, inp / "sub dir") for e in os.scandir(d)
               if e.is_symlink() or not e.is_dir()]          # every entry but the real folders
    assert summary.total + sum(summary.ignored.values()) == len(entries) == 11
    assert (summary.labelled, summary.rejected) == (6, 3)
    # EXIF: the stored size is the displayed one, and the teacher saw the upright picture
    assert (labelled["portrait.jpg"][S.ORIG_H], labelled["portrait.jpg"][S.ORIG_W]) == PORTRAIT[::-1]
    ref = build_teacher(teacher, input_size=TEACHER_SIZE, device="cpu")
    upright = decode_image((inp / "portrait.jpg").read_bytes(), max_side=TEACHER_SIZE)
    with Image.open(srcs[4]) as im:
        truth = np.asarray(im.convert("RGB").resize(PORTRAIT), np.float32)
    assert upright.shape == truth.shape and np.abs(upright - truth).mean() < 8   # upright, as a viewer shows it
    with Image.open(inp / "anim.gif") as im:        # the first frame as stored (palette-quantised), not frame 2
        assert im.n_frames == 2
        first = np.asarray(im.convert("RGB"))
    assert first[..., 0].mean() > first[..., 2].mean() - 60   # not the blue second frame
    for key, image in [("portrait.jpg", upright), ("anim.gif", first)]:
        prob = ref.predict(resize(image, (TEACHER_SIZE, TEACHER_SIZE))[None])[0]
        expected = np.asarray(Image.fromarray(prob, "F").resize((LABEL_SIZE, LABEL_SIZE), Image.BILINEAR))
        assert np.abs(L.decode_label(labelled[key]) - expected).max() <= 1.5 / 255, key
    assert (labelled["anim.gif"][S.ORIG_H], labelled["anim.gif"][S.ORIG_W]) == (64, 96)
    again = run_labelling(_cfg(inp, out, teacher), samples=0)
    assert (again.labelled, again.rejected, again.skipped_done) == (0, 0, 9)


# --- transient is not final ---------------------------------------------------------------------------

def _upload(client, srcs, prefix: str) -> list[str]:
    keys = []
    for p in srcs:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.name}", Body=p.read_bytes())
        keys.append(p.name)
    return keys


def when(condition, then, timeout: float = 240, poll_s: float = 0.02) -> threading.Thread:
    """Start a thread that calls ``then()`` as soon as ``condition()`` is true (polled every ``poll_s``), or
    gives up after ``timeout`` seconds. The fault tests and benchmarks/chaos.py inject their faults with it."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                then()
                return
            time.sleep(poll_s)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _when_first_shard(client, prefix: str, then) -> threading.Thread:
    """``then()`` as soon as a label shard appears under ``prefix`` (seen directly on moto, not through the proxy)."""
    return when(lambda: client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/labels/").get("KeyCount", 0), then)


def _when_answered(proxy: FlakyProxy, then) -> threading.Thread:
    """``then()`` as soon as the proxy has passed back the answer to a label-shard upload: the job then knows at
    least one write landed, whatever the outage does next."""
    return when(lambda: proxy.label_puts_answered, then, poll_s=0.005)


def test_outage_longer_than_the_retries_defers_and_the_rerun_labels_exactly_the_rest(
        ray_started, teacher, shared_data, direct, proxy):
    client = boto3_client(direct)
    n = 14
    keys = _upload(client, _images(shared_data, n, start=400), "outage/in")
    via_proxy = S3Config(endpoint_url=proxy.url, request_attempts=1)
    short = RetryConfig(attempts=2, delay_s=0.05, max_delay_s=0.1)
    inp, out = f"s3://{BUCKET}/outage/in", f"s3://{BUCKET}/outage/out"
    watcher = _when_answered(proxy, lambda: proxy.set_mode("refuse"))
    try:
        with pytest.raises(DeferredInputs) as err:   # the endpoint stays down until the run gives up
            run_labelling(_cfg(inp, out, teacher, s3=via_proxy, retry=short), samples=0)
    finally:
        proxy.set_mode("up")
        watcher.join(timeout=1)
    first = err.value.summary
    assert "deferred after transient storage errors" in str(err.value) and "testing" not in str(err.value)
    assert first.deferred_transient > 0 and first.labelled > 0
    assert first.labelled + first.rejected + first.deferred_transient == n
    assert first.deferred_examples and all(k in keys for k, _ in first.deferred_examples)
    done = _raw_ids(out, direct)
    # what was counted as done is in a shard; what was deferred is not done (a write whose answer was lost
    # may have landed: at most that many more)
    assert first.labelled + first.rejected <= len(done) <= n - 1
    left = n - len(done)

    rerun = run_labelling(_cfg(inp, out, teacher, s3=via_proxy, retry=short), samples=0)
    assert rerun.labelled + rerun.rejected == left and rerun.skipped_done == len(done)
    assert rerun.deferred_transient == 0
    _assert_exactly_once(out, direct, keys)
    assert L.read_labels(out, direct).num_rows == n


def test_a_short_throttling_spell_is_waited_out(ray_started, teacher, shared_data, direct, proxy):
    client = boto3_client(direct)
    n = 16
    keys = _upload(client, _images(shared_data, n, start=450), "slow/in")
    via_proxy = S3Config(endpoint_url=proxy.url, request_attempts=1)
    patient = RetryConfig(attempts=8, delay_s=0.2, max_delay_s=2.0)   # ~9 s of retries > the 1.5 s spell
    inp, out = f"s3://{BUCKET}/slow/in", f"s3://{BUCKET}/slow/out"

    def spell():
        proxy.set_mode("503")
        time.sleep(1.5)
        proxy.set_mode("up")
    watcher = _when_first_shard(client, "slow/out", spell)
    summary = run_labelling(_cfg(inp, out, teacher, s3=via_proxy, retry=patient), samples=0)
    watcher.join(timeout=5)
    assert proxy.requests_refused > 0            # the spell happened while the job talked to S3 ...
    assert summary.retried > 0                   # ... the job met it and retried ...
    assert (summary.labelled, summary.deferred_transient) == (n, 0)   # ... and lost nothing
    _assert_exactly_once(out, direct, keys)
