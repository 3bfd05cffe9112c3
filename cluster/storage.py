"""One filesystem abstraction for local directories and object stores.

Every job builds one ``pyarrow.fs.FileSystem`` from a URI (``/data/imgs``, ``file:///data``,
``s3://bucket/prefix``) and passes it everywhere: Ray Data readers and writers, the catalog, checkpoints.
S3 endpoint and region come from :class:`S3Config` or the standard AWS environment
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``/``AWS_DEFAULT_REGION``); credentials always come
from the AWS default chain (environment, shared files, instance role) and are never stored in our configs.
pyarrow itself ignores ``AWS_ENDPOINT_URL``, so it is read here and passed as ``endpoint_override``.

Keys are data. pyarrow's S3 client cannot address every key an S3 bucket holds: it refuses empty segments
(``a//b.jpg``) and its HTTP layer folds ``.`` and ``..`` segments (``a/../b.jpg`` is read as ``b.jpg``).
So on S3 :func:`walk` lists and :func:`read_bytes` reads objects through boto3, by the exact key, byte for
byte (same endpoint, region and credential chain); writes stay with pyarrow (our own names only). A local
listing (:func:`walk`) reports what a plain directory listing hides: broken links, FIFOs and other special
files, links to directories.

Transient is not final. :func:`is_transient` says whether an error is worth retrying (network errors,
timeouts, throttling, 5xx); :func:`retrying` retries such errors with exponential backoff
(:class:`RetryConfig`). Inside one request, both S3 clients also retry on their own: the AWS standard
retry strategy with ``S3Config.request_attempts`` attempts, set explicitly.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import posixpath
import random
import re
import stat
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kd.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class S3Config:
    """Where the object store is. Credentials are deliberately not fields: they come from the AWS chain.

    ``request_attempts``: attempts per S3 request inside the client (pyarrow's and boto3's AWS standard retry
    strategy, short backoff); the job-level :class:`RetryConfig` waits out longer outages on top of it.
    """
    endpoint_url: str | None = None   # e.g. http://127.0.0.1:9000 for MinIO/moto; None = AWS
    region: str | None = None
    request_attempts: int = 3

    def __post_init__(self) -> None:
        if self.request_attempts < 1:
            raise ConfigError(f"s3.request_attempts: must be >= 1, got {self.request_attempts}")


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """Job-level retries of a read or write that failed with a transient error (:func:`is_transient`).

    Attempt ``k`` (k >= 2) waits ``min(max_delay_s, delay_s * 2**(k-2))``, scaled by a random factor in
    [0.5, 1] (jitter, so many workers do not retry in step). With the defaults an operation is given up after
    6 attempts and about 8 to 15 s of waiting.
    """
    attempts: int = 6
    delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry.attempts: must be >= 1, got {self.attempts}")
        for name in ("delay_s", "max_delay_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"retry.{name}: must be a finite number >= 0, got {v}")
        if self.max_delay_s < self.delay_s:
            raise ConfigError(f"retry.max_delay_s: must be >= retry.delay_s ({self.delay_s}), got {self.max_delay_s}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (2, 3, ...)."""
        return min(self.max_delay_s, self.delay_s * 2.0 ** (attempt - 2)) * random.uniform(0.5, 1.0)


class TransientError(OSError):
    """A storage request failed in a way that may succeed later (network, timeout, throttling, 5xx)."""


def _endpoint(cfg: S3Config | None) -> str | None:
    return (cfg and cfg.endpoint_url) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region(cfg: S3Config | None) -> str:
    return (cfg and cfg.region) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _attempts(cfg: S3Config | None) -> int:
    return cfg.request_attempts if cfg is not None else S3Config.request_attempts


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem(cfg: S3Config | None = None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": _region(cfg),
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_attempts(cfg))}
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
    """``path/part/...`` by plain concatenation: no segment of a key is normalised away (``..``, ``//``)."""
    for p in parts:
        path = f"{path.rstrip('/')}/{p}" if path else p
    return path


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


# --- transient errors and retries -----------------------------------------------------------------------

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN,
                     errno.EPIPE, errno.EIO, errno.ESTALE, errno.EBUSY}
# pyarrow (AWS SDK for C++) puts the error kind and HTTP status in the message
_TRANSIENT_TEXT = re.compile(
    r"NETWORK_CONNECTION|curlCode|SLOW_DOWN|THROTTL|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT|"
    r"REQUEST_TIME_TOO_SKEWED|HTTP status (5\d\d|429)|timed out|timeout|Connection reset|Broken pipe",
    re.IGNORECASE)
_TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
                       "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
                       "ExpiredToken", "RequestExpired", "TokenRefreshRequired"}  # expired: the chain renews them


def _botocore_transient(e: BaseException) -> bool | None:
    """True/False for botocore errors, None for anything else."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(e, bx.ClientError):
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(e.response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in _TRANSIENT_S3_CODES
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectTimeoutError,
                      bx.ReadTimeoutError, bx.ProxyConnectionError, bx.ResponseStreamingError,
                      bx.IncompleteReadError, bx.HTTPClientError,
                      # a worker that finds no credentials (an instance-metadata hiccup) must not turn every
                      # image into a final reject: deferred, they are tried again
                      bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return True
    if isinstance(e, bx.BotoCoreError):
        return False
    return None


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` (from pyarrow, boto3 or the OS) may go away if the operation is tried again later.

    Transient: network errors, timeouts, throttling (429, SlowDown), 5xx answers, expired or unavailable
    credentials, EIO/ETIMEDOUT-like errnos. Final: missing objects, permission errors, not-a-file, bad
    requests, decode errors, anything else.
    """
    if isinstance(e, TransientError):
        return True
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    boto = _botocore_transient(e)
    if boto is not None:
        return boto
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError):
        return e.errno in _TRANSIENT_ERRNOS or bool(_TRANSIENT_TEXT.search(str(e)))
    return False


def retrying(fn: Callable[[], T], retry: RetryConfig | None, what: str,
             on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``fn()``, tried again after transient errors (:func:`is_transient`) as ``retry`` says; the last error
    (or any final one) is raised. ``what`` names the operation in the log; ``on_retry`` sees each retried
    error."""
    retry = retry or RetryConfig()
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised when final
            if attempt == retry.attempts or not is_transient(e):
                raise
            wait = retry.delay(attempt + 1)
            log.warning("%s: transient error (attempt %d of %d, next in %.1f s): %s", what, attempt,
                        retry.attempts, wait, e)
            if on_retry is not None:
                on_retry(e)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# --- exact S3 keys through boto3 ------------------------------------------------------------------------

_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client_for(fs: pafs.S3FileSystem, s3: S3Config | None):
    """A boto3 client talking to the same endpoint and region as ``fs`` (cached per process)."""
    args = fs.__reduce__()[1][0]   # pyarrow's own pickling arguments: endpoint_override, scheme, region, ...
    endpoint, scheme = args.get("endpoint_override") or "", args.get("scheme") or "https"
    key = (endpoint, scheme, args.get("region") or _region(s3), _attempts(s3))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            import boto3
            from botocore.config import Config
            kwargs = {"region_name": key[2],
                      "config": Config(retries={"mode": "standard", "max_attempts": key[3]})}
            if endpoint:
                kwargs["endpoint_url"] = f"{scheme}://{endpoint}"
            _CLIENTS[key] = boto3.session.Session().client("s3", **kwargs)
        return _CLIENTS[key]


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _s3_error(e: Exception, path: str) -> OSError:
    """A boto3 error as the OSError kind callers handle (the message names the object, never a credential)."""
    where = f"s3://{path}"
    transient = is_transient(e)
    code = ""
    try:
        from botocore.exceptions import ClientError
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
    except ImportError:  # pragma: no cover
        pass
    if transient:
        return TransientError(f"{where}: {type(e).__name__}: {e}")
    if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
        return FileNotFoundError(errno.ENOENT, f"{where}: no such object ({code})")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
        return PermissionError(errno.EACCES, f"{where}: {code}")
    return OSError(f"{where}: {type(e).__name__}: {e}")


def read_bytes(fs: pafs.FileSystem, path: str, s3: S3Config | None = None) -> bytes:
    """The whole object or file at ``path``. On S3, by its exact key (boto3 GetObject, see the module
    docstring); ``s3`` only sets ``request_attempts``. Locally, only regular files are opened (a FIFO would
    block). Errors are OSErrors: :class:`FileNotFoundError` for a missing object, :class:`TransientError`
    (or another transient OSError, :func:`is_transient`) for what may succeed later."""
    if isinstance(fs, pafs.S3FileSystem):
        bucket, key = _split(path)
        try:
            return _s3_client_for(fs, s3).get_object(Bucket=bucket, Key=key)["Body"].read()
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore/urllib3 errors become OSErrors
            raise _s3_error(e, path) from e
    if isinstance(fs, pafs.LocalFileSystem):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{path}: not a regular file ({_file_kind(st.st_mode)})")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


# --- listing everything under a root --------------------------------------------------------------------

FILE, BROKEN_LINK, SPECIAL, LINKED_DIR, UNREADABLE_DIR, DIR_MARKER = (
    "file", "broken_link", "special_file", "linked_dir", "unreadable_dir", "dir_marker")


@dataclasses.dataclass(frozen=True, slots=True)   # slots: one per object listed
class Listed:
    """One entry under a listed root: its full ``path`` in the filesystem and what it is (``kind``:
    :data:`FILE` or one of the kinds a job cannot read as a file), with a human ``detail`` for the others."""
    path: str
    kind: str = FILE
    detail: str = ""


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _walk_local(root: str) -> Iterator[Listed]:
    yield from _walk_folder(root, root)


def _walk_folder(d: str, root: str) -> Iterator[Listed]:
    """``d`` depth first, its entries in the order of their full paths: a sub-folder sorts as its name + "/"
    (``a-b`` < ``a/`` < ``a0``), so paths come out sorted with one folder's entries per level in memory. An
    unreadable folder is yielded in its children's place (the one path a full sort would put earlier)."""
    try:
        entries = list(os.scandir(d))
    except OSError as e:
        if d == root:
            raise
        yield Listed(d, UNREADABLE_DIR, f"{type(e).__name__}: {e.strerror or e}")
        return
    found: list[tuple[str, str, Listed | None]] = []   # (sort name, path, entry; None for a folder)
    for entry in entries:
        found.append((entry.name + "/", entry.path, None) if _is_folder(entry)
                     else (entry.name, entry.path, _listed(entry)))
    del entries
    found.sort(key=lambda x: x[0])
    for _, path, listed in found:
        if listed is None:
            yield from _walk_folder(path, root)
        else:
            yield listed


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return not entry.is_symlink() and entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _listed(entry: os.DirEntry) -> Listed:
    """What a non-folder entry is: a file, or why a job cannot open it."""
    try:
        if entry.is_symlink():
            try:
                st = os.stat(entry.path)
            except OSError as e:
                return Listed(entry.path, BROKEN_LINK, f"symlink to {os.readlink(entry.path)!r}: {e.strerror or e}")
            if stat.S_ISREG(st.st_mode):
                return Listed(entry.path)
            if stat.S_ISDIR(st.st_mode):
                return Listed(entry.path, LINKED_DIR,
                              f"symlink to the directory {os.readlink(entry.path)!r}: not followed")
            return Listed(entry.path, SPECIAL, f"symlink to a {_file_kind(st.st_mode)}")
        if entry.is_file(follow_symlinks=False):
            return Listed(entry.path)
        return Listed(entry.path, SPECIAL, f"a {_file_kind(entry.stat(follow_symlinks=False).st_mode)}")
    except OSError as e:  # vanished or unreadable between scandir and stat
        return Listed(entry.path, SPECIAL, f"{type(e).__name__}: {e.strerror or e}")


def _walk_s3(fs: pafs.S3FileSystem, root: str, s3: S3Config | None, retry: RetryConfig | None) -> Iterator[Listed]:
    """Page by page; ListObjectsV2 gives keys in UTF-8 byte order, which is Python's str order (sorted paths)."""
    client = _s3_client_for(fs, s3)
    bucket, prefix = _split(root)
    if not bucket:
        raise ValueError("s3://: no bucket given")
    base = f"{prefix}/" if prefix else ""
    listed_any = False
    token: str | None = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": base, **({"ContinuationToken": token} if token else {})}

        def page(kwargs=kwargs):
            try:
                return client.list_objects_v2(**kwargs)
            except Exception as e:  # noqa: BLE001
                raise _s3_error(e, root) from e
        resp = retrying(page, retry, f"listing s3://{root}")
        for obj in resp.get("Contents", []):
            listed_any = True
            key = obj["Key"]
            if key.endswith("/"):
                yield Listed(f"{bucket}/{key}", DIR_MARKER, "a folder marker object (key ends with /)")
            else:
                yield Listed(f"{bucket}/{key}")
        if not resp.get("IsTruncated"):
            break
        token = resp["NextContinuationToken"]
    if not listed_any and prefix:
        try:  # the root itself may be one object
            retrying(lambda: client.head_object(Bucket=bucket, Key=prefix), retry, f"s3://{root}")
            yield Listed(root)
            return
        except Exception as e:  # noqa: BLE001
            err = e if isinstance(e, OSError) else _s3_error(e, root)
            if not isinstance(err, FileNotFoundError):
                raise err from e
        raise FileNotFoundError(f"s3://{root}: no such directory or prefix")


def iter_walk(fs: pafs.FileSystem, root: str, s3: S3Config | None = None,
              retry: RetryConfig | None = None) -> Iterator[Listed]:
    """Everything under ``root`` (recursively), streamed in path order: files and the entries a reader must not
    or cannot open (broken links, special files, links to directories, unreadable folders, S3 folder markers).

    Paths are ``root + "/" + key`` with the key exactly as stored (on S3 listed through boto3 a page at a time;
    pages retried on transient errors). Memory: one S3 page, or one folder's entries per level of a local tree.
    ``root`` that is itself a file gives ``Listed(root)`` alone; a missing root raises
    :class:`FileNotFoundError` (on S3 when the first page is read). Hidden names are listed too (callers decide).
    """
    if isinstance(fs, pafs.S3FileSystem):
        yield from _walk_s3(fs, root, s3, retry)
    elif isinstance(fs, pafs.LocalFileSystem):
        try:
            st = os.stat(root)
        except FileNotFoundError:
            raise FileNotFoundError(f"{root}: no such directory or prefix") from None
        if stat.S_ISREG(st.st_mode):
            yield Listed(root)
        else:
            yield from _walk_local(root)
    else:
        yield from sorted((Listed(p) for p in list_files(fs, root)), key=lambda e: e.path)


def walk(fs: pafs.FileSystem, root: str, s3: S3Config | None = None,
         retry: RetryConfig | None = None) -> list[Listed]:
    """:func:`iter_walk` as a list, sorted by path."""
    out = list(iter_walk(fs, root, s3, retry))
    out.sort(key=lambda e: e.path)   # in place; already in order but for an unreadable folder's entry
    return out


def boto3_client(s3: S3Config | None = None):
    """A boto3 S3 client with the same endpoint/region, for the calls pyarrow has no API for."""
    import boto3
    kwargs = {"region_name": _region(s3)}
    endpoint = _endpoint(s3)
    if endpoint:
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else f"https://{endpoint}"
    return boto3.client("s3", **kwargs)
