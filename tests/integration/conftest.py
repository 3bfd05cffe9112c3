"""Fixtures the integration modules share: a free TCP port on 127.0.0.1 and a real S3 endpoint (moto).

Modules that need a port outside a fixture import :func:`free_port` (``from tests.integration.conftest import
free_port``, as test_serve imports ``tests.conftest``)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator, Mapping

import pytest

# Dummy credentials for the moto endpoint, and no EC2 metadata lookups while a client looks for them.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environ(values: Mapping[str, str], restore: tuple[str, ...] = ()) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block, then put those keys and ``restore`` (keys that code in
    the block may set, e.g. Ray's) back as they were, unset ones unset. Usable in fixtures of any scope."""
    saved = {k: os.environ.get(k) for k in (*values, *restore)}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's ThreadedMotoServer on 127.0.0.1), one per module, with no bucket yet.
    The dummy credentials are exported before Ray starts, so its workers inherit them; the environment is put
    back afterwards."""
    from moto.server import ThreadedMotoServer

    with environ(S3_ENV):
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        yield f"http://127.0.0.1:{port}"
        server.stop()
