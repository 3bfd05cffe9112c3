"""One line per failure on S3 (issue 13, item 5): the real ``sodkd`` CLI in a subprocess against a real S3
endpoint (moto's ThreadedMotoServer on 127.0.0.1), with real credential chains.

- a bucket that does not exist, no credentials at all, an access key the server does not know (moto with its
  IAM authentication switched on): each ends in one stderr line naming the location and the credential
  *source* (``env``, ``shared-credentials-file``, none), never the key or the secret, and a 0600 log file
  holding the traceback (also free of the secret);
- inputs deferred after transient storage errors (``DeferredInputs``, which used to end in a traceback): an
  HTTP proxy in front of moto answers 503 SlowDown to every request under ``OUTPUT/rejects/``, so the preflight
  probe and the listings pass and the one shard write fails as an outage would; the rerun through a healthy
  proxy writes exactly what was deferred, and the preflight probe left no object or folder marker behind.
"""

from __future__ import annotations

import http.client
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
import torch

from models import create_model, save_weights
from cli_helpers import error_lines, one_error, sodkd
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

BUCKET = "cli-errors"
ACCESS_KEY = "AKIAPREFLIGHT0TEST01"
SECRET = "s3cr3t-Value-That-Must-Never-Show-9f8e7d"


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    _client(url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def _client(url: str):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def _keys(url: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in _client(url).list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The subprocess's AWS environment: only what the test sets (no host credentials, files or metadata)."""
    env = {k: "" for k in os.environ if k.startswith("AWS_")}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
                "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_DEFAULT_REGION": "us-east-1"})
    env.update(extra)
    return {k: v for k, v in env.items()}


def _sodkd(*argv: str, tmp: Path, env: dict[str, str]):
    """sodkd with exactly ``env``'s AWS variables (empty ones removed)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full = {**base, **{k: v for k, v in env.items() if v}}
    saved = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(full)
        return sodkd(*argv, tmp=tmp)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "m3.pt"
    save_weights(create_model("scfnet_m3"), path)
    return f"scfnet_m3:{path}"


@pytest.fixture
def broken_input(tmp_path) -> Path:
    d = tmp_path / "input"
    d.mkdir()
    os.symlink(tmp_path / "nowhere.jpg", d / "gone.jpg")   # one listing reject, nothing for Ray to do
    return d


def _no_secret(out, log: Path | None) -> None:
    for text in (out.stdout, out.stderr, log.read_text() if log else ""):
        assert SECRET not in text and ACCESS_KEY not in text


def test_missing_bucket_names_the_output_and_the_credential_source(tmp_path, moto_url, teacher, broken_input):
    env = _clean_env(tmp_path, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    out = _sodkd("label", "--input", str(broken_input), "--output", "s3://no-such-bucket-here/labels", "--teacher",
                 teacher, f"s3.endpoint_url={moto_url}", "tracking.enabled=false", tmp=tmp_path, env=env)
    assert out.returncode == 1, out.stderr
    message, log = one_error(out, "label")
    assert message.startswith("PreflightError: output s3://no-such-bucket-here/labels: not writable"), message
    assert "NO_SUCH_BUCKET" in message and message.endswith("[S3 credentials: env]"), message
    _no_secret(out, log)


def test_no_credentials_anywhere_is_one_line_saying_none_found(tmp_path, moto_url, teacher, broken_input):
    out = _sodkd("label", "--input", str(broken_input), "--output", f"s3://{BUCKET}/labels", "--teacher", teacher,
                 f"s3.endpoint_url={moto_url}", "tracking.enabled=false", tmp=tmp_path, env=_clean_env(tmp_path))
    assert out.returncode == 1, out.stderr
    message, _ = one_error(out, "label")
    assert message.startswith(f"PreflightError: S3 credentials for s3://{BUCKET}/labels: none found"), message
    assert message.endswith("[S3 credentials: none found]"), message
    assert _keys(moto_url, "labels") == []


@pytest.fixture
def moto_auth(moto_url):
    """moto with IAM authentication on: an access key it did not issue is refused (InvalidAccessKeyId)."""
    def set_count(value: str) -> None:
        req = urllib.request.Request(f"{moto_url}/moto-api/reset-auth", data=value.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # not form data: moto reads the body
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
    set_count("0")
    yield
    set_count("inf")


def test_an_unknown_access_key_from_a_credentials_file_fails_before_ray_naming_the_file_source(
        tmp_path, moto_url, moto_auth):
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET}\n")
    env = _clean_env(tmp_path, AWS_SHARED_CREDENTIALS_FILE=str(creds))
    out = _sodkd("train", "--supervised", "--paired", f"s3://{BUCKET}/pairs", "--storage", f"s3://{BUCKET}/runs",
                 "--name", "auth", f"s3.endpoint_url={moto_url}", tmp=tmp_path, env=env)
    assert out.returncode == 1, out.stderr
    message, log = one_error(out, "train")
    assert message.startswith(f"PreflightError: data.paired[0].uri s3://{BUCKET}/pairs: cannot list it "
                              "(ClientError: An error occurred (InvalidAccessKeyId)"), message
    assert message.endswith("[S3 credentials: shared-credentials-file]"), message
    assert "Ray" not in out.stderr
    _no_secret(out, log)


# --- deferred inputs ------------------------------------------------------------------------------------

class _Proxy(BaseHTTPRequestHandler):
    """Forwards each request to moto; answers 503 SlowDown under ``/rejects/`` while ``server.failing``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = b""
            while True:     # forwarded as it came: the chunk framing and any trailers stay
                size_line = self.rfile.readline()
                raw += size_line
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return raw
                raw += self.rfile.read(size + 2)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self) -> None:
        body = self._body()
        path = self.path.split("?", 1)[0]
        if self.server.failing and "/rejects/" in path:
            self.server.refused += 1
            payload = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                       b"<Message>Please reduce your request rate.</Message></Error>")
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=60)
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in self.headers.items():
            if k.lower() not in ("expect", "connection"):
                conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


@pytest.fixture
def proxy(moto_url):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    server.daemon_threads = True
    server.target_port = int(moto_url.rsplit(":", 1)[1])
    server.failing, server.refused = True, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_deferred_inputs_end_in_one_line_and_the_rerun_writes_them(tmp_path, moto_url, teacher, broken_input,
                                                                   proxy):
    env = _clean_env(tmp_path, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    argv = ["label", "--input", str(broken_input), "--output", f"s3://{BUCKET}/deferred", "--teacher", teacher,
            f"s3.endpoint_url=http://127.0.0.1:{proxy.server_address[1]}", "tracking.enabled=false",
            "s3.request_attempts=1", "retry.attempts=2", "retry.delay_s=0", "retry.max_delay_s=0"]
    out = _sodkd(*argv, tmp=tmp_path, env=env)
    assert out.returncode == 1, out.stderr
    message, log = one_error(out, "label")
    assert message.startswith("1 inputs deferred after transient storage errors (not done; rerun the same command "
                              "to label them), e.g. gone.jpg: writing the rejects shard:"), message
    assert message.endswith(f"[input {broken_input}] [S3 credentials: env]"), message
    assert "DeferredInputs" in log.read_text()
    assert proxy.refused >= 2 and _keys(moto_url, "deferred") == []   # nothing written, no probe left
    _no_secret(out, log)

    proxy.failing = False
    again = _sodkd(*argv, tmp=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert error_lines(again.stderr) == []
    keys = _keys(moto_url, "deferred")
    assert len(keys) == 1 and keys[0].startswith("deferred/rejects/") and keys[0].endswith(".parquet"), keys
