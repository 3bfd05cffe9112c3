"""One filesystem abstraction for local directories and object stores.

Every job builds one ``pyarrow.fs.FileSystem`` from a URI (``/data/imgs``, ``file:///data``,
``s3://bucket/prefix``) and passes it everywhere: Ray Data readers and writers, the catalog, checkpoints.
S3 endpoint and region come from :class:`S3Config` or the standard AWS environment
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``/``AWS_DEFAULT_REGION``); credentials always come
from the AWS default chain (environment, shared files, instance role) and are never stored in our configs.
pyarrow itself ignores ``AWS_ENDPOINT_URL``, so it is read here and passed as ``endpoint_override``.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Iterable
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclasses.dataclass(frozen=True)
class S3Config:
    """Where the object store is. Credentials are deliberately not fields: they come from the AWS chain."""
    endpoint_url: str | None = None   # e.g. http://127.0.0.1:9000 for MinIO/moto; None = AWS
    region: str | None = None


def _endpoint(cfg: S3Config | None) -> str | None:
    return (cfg and cfg.endpoint_url) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region(cfg: S3Config | None) -> str:
    return (cfg and cfg.region) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(cfg: S3Config | None = None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": _region(cfg)}
    endpoint = _endpoint(cfg)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


def get_filesystem(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (filesystem, path inside it). S3 paths are ``bucket/prefix`` (no scheme), as pyarrow wants."""
    if is_s3(uri):
        return s3_filesystem(s3), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(fs: pafs.FileSystem, path: str, extensions: Iterable[str] | None = None,
               recursive: bool = True) -> list[str]:
    """Sorted file paths under ``path`` whose lower-cased name ends with one of ``extensions``."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{to_uri(fs, path)}: no such directory or prefix")
    if info.type == pafs.FileType.File:
        return [path]
    exts = tuple(e.lower() for e in extensions) if extensions else None
    sel = pafs.FileSelector(path, recursive=recursive)
    out = [i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
           and not posixpath.basename(i.path).startswith(".")
           and (exts is None or i.path.lower().endswith(exts))]
    return sorted(out)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def boto3_client(s3: S3Config | None = None):
    """A boto3 S3 client with the same endpoint/region, for the calls pyarrow has no API for."""
    import boto3
    kwargs = {"region_name": _region(s3)}
    endpoint = _endpoint(s3)
    if endpoint:
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"https://{endpoint}"
    return boto3.client("s3", **kwargs)
