"""One line per failed job: what failed, on which input, and where the full traceback went.

``sodkd`` catches what a job raises (``jobs.cli.main``) and hands it to :func:`report`:

- known failures -- a config error, an ``OSError`` (local files, S3 through pyarrow or
  :mod:`cluster.storage`), a botocore/boto3 error, a pyarrow error, a Ray error (a task, actor or Ray Train
  failure: the worker's own error is named, not Ray's multi-line wrapper), labelling's ``DeferredInputs`` --
  become ONE stderr line: ``sodkd COMMAND: error: KIND: MESSAGE [input ...] [S3 credentials from SOURCE]
  (traceback: LOG)``. The full traceback is written to ``LOG``, a new file (mode 0600) under
  ``$SODKD_ERROR_DIR``, else ``$XDG_CACHE_HOME/sodkd/errors`` (``~/.cache/sodkd/errors``), else the temp dir;
- for S3 errors the line names where boto3 found credentials (``env``, ``shared-credentials-file``,
  ``iam-role``, ... or none) -- never a key, secret or token; any such value that a message might carry is
  replaced by ``***`` in the line and in the log;
- anything else (a bug) is re-raised: its traceback is what a bug report needs.

``sodkd -v`` / ``sodkd --debug`` re-raise everything (the traceback instead of the line). Exit codes: 2 for
config and usage errors (``ConfigError``, ``ValueError``, a missing file, as before), 1 for runtime failures.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

USAGE, RUNTIME = 2, 1
URIS_ATTR = "sodkd_uris"     # set on an exception by :func:`naming`: {"input": ..., "output": ...}
_MAX_CHARS = 600             # of the message in the line (the log has all of it)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


@contextlib.contextmanager
def naming(**uris: str | list[str] | None) -> Iterator[None]:
    """Attach the job's input/output locations to an exception raised inside, for the one-line report."""
    try:
        yield
    except Exception as e:
        if getattr(e, URIS_ATTR, None) is None:
            with contextlib.suppress(Exception):
                setattr(e, URIS_ATTR, {k: v for k, v in uris.items() if v})
        raise


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 20:
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def _from(e: BaseException, *tops: str) -> bool:
    return any(c.__module__.split(".")[0] in tops for c in type(e).__mro__)


def _ray_inner(e: BaseException) -> BaseException | None:
    """The worker's / controller's own exception inside a Ray error (followed down), if it carries one."""
    found = None
    for _ in range(10):
        inner = getattr(e, "cause", None) or getattr(e, "controller_failure", None)
        failures = getattr(e, "worker_failures", None)
        if inner is None and isinstance(failures, dict) and failures:
            inner = failures[sorted(failures)[0]]
        if not isinstance(inner, BaseException) or inner is e:
            break
        found = e = inner
    return found


def _deferred_class() -> type | None:
    mod = sys.modules.get("cluster.label.job")   # loaded whenever DeferredInputs can have been raised
    return getattr(mod, "DeferredInputs", None)


def classify(e: BaseException) -> tuple[str, int] | None:
    """(kind, exit code) of a failure sodkd reports in one line, or None for one to re-raise."""
    from kd.config import ConfigError
    deferred = _deferred_class()
    if isinstance(e, ConfigError):
        return "config", USAGE
    if deferred is not None and isinstance(e, deferred):
        return "deferred", RUNTIME
    if _from(e, "ray"):
        return "ray", RUNTIME
    chain = _chain(e)
    if any(_from(c, "botocore", "boto3", "s3transfer") for c in chain):
        return "s3", RUNTIME
    if _from(e, "pyarrow"):
        return "pyarrow", RUNTIME
    if isinstance(e, FileNotFoundError):
        return "os", USAGE
    if isinstance(e, OSError):
        return "os", RUNTIME
    if isinstance(e, ValueError):
        return "value", USAGE
    return None


def _is_s3(e: BaseException, uris: dict) -> bool:
    for c in _chain(e):
        if _from(c, "botocore", "boto3", "s3transfer"):
            return True
        text = str(c)
        if "s3://" in text or "AWS Error" in text:
            return True
    return False


def credential_source() -> tuple[str, object | None]:
    """Where boto3's default chain finds credentials (its ``method``: ``env``, ``shared-credentials-file``, ...),
    and the credentials (for redaction only; never printed)."""
    try:
        import boto3
        session = boto3.session.Session()
        creds = session.get_credentials()
        profile = os.environ.get("AWS_PROFILE")
        where = f" (profile {profile})" if profile else ""
        if creds is None:
            return f"none found{where}", None
        return f"{creds.method}{where}", creds
    except Exception as e:  # noqa: BLE001 - a broken profile or config: say so, in its type's name only
        return f"unavailable ({type(e).__name__})", None


def _secrets(creds: object | None) -> list[str]:
    values = [os.environ.get(k, "") for k in _SECRET_ENV]
    if creds is not None:
        with contextlib.suppress(Exception):
            frozen = creds.get_frozen_credentials()
            values += [frozen.access_key or "", frozen.secret_key or "", frozen.token or ""]
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def _redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return text


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip()]
    line = " | ".join(lines[:3]) + (" | ..." if len(lines) > 3 else "")
    return line if len(line) <= _MAX_CHARS else line[: _MAX_CHARS - 3] + "..."


def _message(e: BaseException, kind: str) -> str:
    if kind == "ray":
        inner = _ray_inner(e)
        name = getattr(e, "function_name", None)   # RayTaskError: its text starts with the worker's proctitle
        if name:
            outer = f"{name} failed"
        elif any(c.__name__ == "RayTaskError" for c in type(e).__mro__):   # ray.get's RayTaskError(CauseType)
            outer = "a Ray task failed"
        else:
            outer = _one_line(str(e).splitlines()[0] if str(e).strip() else "")
        if inner is not None:
            first = next((ln.strip() for ln in str(inner).splitlines() if ln.strip()), "")
            return f"{type(e).__name__}: {outer} -> {type(inner).__name__}: {_one_line(first)}"
        return f"{type(e).__name__}: {outer}"
    if kind in ("config", "value", "deferred"):
        return _one_line(str(e))
    return f"{type(e).__name__}: {_one_line(str(e))}"


def _where(e: BaseException, message: str, kind: str) -> str:
    """The input/output to name when the message itself names no location."""
    uris = getattr(e, URIS_ATTR, None) or {}
    filename = getattr(e, "filename", None)
    if filename and str(filename) not in message:
        return f" [file {filename}]"
    if kind == "deferred" and uris.get("input"):
        return f" [input {_join(uris['input'])}]"
    flat = [u for v in uris.values() for u in (v if isinstance(v, (list, tuple)) else [v])]
    if not uris or any(str(u) in message for u in flat):
        return ""
    return " [" + "; ".join(f"{k} {_join(v)}" for k, v in uris.items()) + "]"


def _join(v) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def log_dir() -> Path:
    for base in (os.environ.get("SODKD_ERROR_DIR"),
                 os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sodkd", "errors"),
                 os.path.join(tempfile.gettempdir(), f"sodkd-{os.getuid()}", "errors")):
        if not base:
            continue
        with contextlib.suppress(OSError):
            os.makedirs(base, mode=0o700, exist_ok=True)
            if os.access(base, os.W_OK | os.X_OK):
                return Path(base)
    return Path(tempfile.gettempdir())


def write_log(e: BaseException, command: str, secrets: list[str], extra: str = "") -> Path | None:
    """The full traceback in a new file (mode 0600); None if no file could be written."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"sodkd {command} failed at {datetime.datetime.now().isoformat(timespec='seconds')} "
            f"(pid {os.getpid()})\n{extra}\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    inner = _ray_inner(e) if _from(e, "ray") else None
    if inner is not None:
        text += "\nThe worker's error:\n" + "".join(traceback.format_exception(type(inner), inner,
                                                                               inner.__traceback__))
    path = log_dir() / f"{command}-{stamp}-{os.getpid()}.log"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        try:
            fd, name = tempfile.mkstemp(prefix=f"sodkd-{command}-", suffix=".log")  # mkstemp: mode 0600
            path = Path(name)
        except OSError:
            return None
    with os.fdopen(fd, "w") as f:
        f.write(_redact(text, secrets))
    return path


def report(e: BaseException, command: str, debug: bool = False) -> int | None:
    """Print the one-line report of ``e`` to stderr and return the exit code; None: re-raise it (``debug`` or
    an error sodkd does not know, i.e. a bug)."""
    if debug:
        return None
    known = classify(e)
    if known is None:
        return None
    kind, code = known
    message = _message(e, kind)
    line = f"sodkd {command}: error: {message}{'' if kind == 'config' else _where(e, message, kind)}"
    creds = None
    if kind == "s3" or _is_s3(e, getattr(e, URIS_ATTR, None) or {}):
        source, creds = credential_source()
        line += f" [S3 credentials: {source}]"
    secrets = _secrets(creds)
    if kind != "config":   # a config error is its message; everything else keeps its traceback in a file
        path = write_log(e, command, secrets, extra=line)
        line += f" (traceback: {path})" if path else " (no log written; sodkd -v shows the traceback)"
    print(_redact(line, secrets), file=sys.stderr, flush=True)
    return code
