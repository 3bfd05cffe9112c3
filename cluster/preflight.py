"""Checks a job runs on the driver before it starts Ray: a wrong path, key or file fails in seconds, named.

Without them a typo in a weights path or a bucket the credentials cannot write to surfaces minutes later,
after Ray, the actor pool or the Ray Train workers have started, inside a multi-line worker traceback.
:func:`check_label` (``sodkd label``) and :func:`check_train` (``sodkd train``, ``distill``, ``train-teacher``,
``train-fm``) check, in this order:

1. S3 credentials, when any location of the job is on S3: the AWS default chain must find some (no network);
2. every S3 input (and S3 weights file) is listable: one ``ListObjectsV2`` of at most one key, which checks
   credentials, permissions and the bucket in one cheap call;
3. every output location is writable: a small probe object/file (``.sodkd-preflight-<random>``) is written
   through the same pyarrow filesystem the job writes with, then removed (a local folder the probe had to
   create is removed again; on S3 the probe is deleted through boto3, which leaves no folder marker behind);
4. every weights file the job names is loadable: teacher specs (loaded on the CPU as the job loads them) and
   ``model.backbone_weights`` / ``model.init_weights`` (applied to a throwaway model of ``model.name``).

Failures raise: :class:`PreflightError` (an ``OSError``) for storage and credentials, naming the location;
``ConfigError`` / ``TeacherSpecError`` for a weights file, naming the config key or spec and the file.
Nothing here starts Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from typing import Iterable, Sequence

from cluster import storage
from cluster.storage import S3Config
from kd.config import ConfigError

log = logging.getLogger(__name__)

PROBE_PREFIX = ".sodkd-preflight-"


class PreflightError(OSError):
    """A job's storage location or credentials failed a check before the job started (the message names it)."""


def _error_text(e: BaseException) -> str:
    """``Type: first line of the message`` (botocore's message already names the error code)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}"


# --- S3 -----------------------------------------------------------------------------------------------------

def check_s3_credentials(uris: Sequence[str]) -> str | None:
    """None when no URI is on S3; else the source the AWS chain found credentials in (``env``, ...)."""
    s3_uris = [u for u in uris if storage.is_s3(u)]
    if not s3_uris:
        return None
    import boto3
    try:
        creds = boto3.session.Session().get_credentials()
    except Exception as e:  # noqa: BLE001 - a broken profile/config file
        raise PreflightError(f"S3 credentials for {s3_uris[0]}: the AWS credential chain failed "
                             f"({_error_text(e)})") from e
    if creds is None:
        raise PreflightError(f"S3 credentials for {s3_uris[0]}: none found (environment AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY, shared credentials file, AWS_PROFILE, instance or container "
                             "role)")
    return creds.method


def check_listable(uri: str, s3: S3Config | None, what: str) -> None:
    """One ``ListObjectsV2`` (at most one key) under an S3 ``uri``: credentials, permission, bucket. An empty
    prefix is no error here (the job says what it found)."""
    if not storage.is_s3(uri):
        return
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise PreflightError(f"{what} {uri}: no bucket in the URI")
    client = storage.boto3_client(s3)
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/"), MaxKeys=1)
    except Exception as e:  # noqa: BLE001 - botocore errors: named, with the location
        raise PreflightError(f"{what} {uri}: cannot list it ({_error_text(e)})") from e


# --- writable outputs -------------------------------------------------------------------------------------

def _missing_ancestor(path: str) -> str | None:
    """The topmost folder of ``path`` that does not exist yet (None: it exists)."""
    top = None
    p = os.path.abspath(path)
    while not os.path.exists(p):
        top = p
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return top


def check_writable(uri: str, s3: S3Config | None, what: str) -> None:
    """Write a small probe under ``uri`` and remove it; :class:`PreflightError` naming ``uri`` if that fails."""
    fs, root = storage.get_filesystem(uri, s3)
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    probe = storage.join(root, name)
    data = b"sodkd preflight probe: safe to delete\n"
    if storage.is_s3(uri):
        try:
            with fs.open_output_stream(probe) as f:   # pyarrow, as the job writes
                f.write(data)
        except Exception as e:  # noqa: BLE001
            raise PreflightError(f"{what} {uri}: not writable ({_error_text(e)})") from e
        bucket, _, key = probe.partition("/")
        try:   # boto3: pyarrow's delete_file would put a folder marker in place of the emptied "folder"
            storage.boto3_client(s3).delete_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001
            raise PreflightError(f"{what} {uri}: wrote {storage.to_uri(fs, probe)} but cannot delete it "
                                 f"({_error_text(e)})") from e
        return
    created = _missing_ancestor(root)
    try:
        storage.write_bytes(fs, probe, data)
        os.remove(probe)
    except OSError as e:
        raise PreflightError(f"{what} {uri}: not writable ({_error_text(e)})") from e
    finally:
        if created:   # leave the tree as it was: remove the folders the probe made, if still empty
            d = root
            while True:
                try:
                    os.rmdir(d)
                except OSError:
                    break
                if d == created:
                    break
                d = os.path.dirname(d)


# --- weights files ----------------------------------------------------------------------------------------

def check_teachers(specs: Iterable[str], s3: S3Config | None, input_size: int | None = None,
                   skip: Sequence[str] = ()) -> list[str]:
    """Load every teacher spec on the CPU (fp32), as the job will; returns their ids. Errors name the spec."""
    from cluster.teachers import TeacherSpecError, load_teacher
    ids = []
    for spec in specs:
        if spec in skip:
            continue
        try:
            ids.append(load_teacher(spec, s3=s3, device="cpu", precision="fp32", input_size=input_size).id)
        except (TeacherSpecError, ConfigError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - torch/onnxruntime raise their own types for a broken file
            raise TeacherSpecError(f"teacher spec {spec}: not loadable ({_error_text(e)})") from e
    return ids


def check_start_weights(cfg) -> None:
    """``model.backbone_weights`` and ``model.init_weights`` of a :class:`cluster.training.sections.TrainConfig`,
    each applied to a throwaway model (:func:`cluster.training.image.apply_start_weights`); errors name key and
    file."""
    from cluster.training.image import apply_start_weights
    from models import create_model
    m = cfg.model
    for key in ("backbone_weights", "init_weights"):
        uri = getattr(m, key)
        if not uri:
            continue
        only = dataclasses.replace(m, backbone_weights=uri if key == "backbone_weights" else None,
                                   init_weights=uri if key == "init_weights" else None)
        try:
            apply_start_weights(create_model(m.name, **m.kwargs), dataclasses.replace(cfg, model=only),
                                verbose=False)
        except (ConfigError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - torch.load of a foreign file raises many types
            raise ConfigError(f"model.{key}: {uri}: not loadable ({_error_text(e)})") from e


# --- per job ----------------------------------------------------------------------------------------------

def _run(inputs: Sequence[tuple[str, str]], outputs: Sequence[tuple[str, str]], weights: Sequence[str],
         s3: S3Config | None, load) -> None:
    t0 = time.perf_counter()
    source = check_s3_credentials([u for _, u in inputs] + [u for _, u in outputs] + list(weights))
    for what, uri in inputs:
        check_listable(uri, s3, what)
    for uri in weights:
        check_listable(uri, s3, "weights file")
    for what, uri in outputs:
        check_writable(uri, s3, what)
    load()
    log.info("preflight: %d input(s), %d output(s), %d weights file(s) ok%s in %.1f s", len(inputs), len(outputs),
             len(weights), f" (S3 credentials: {source})" if source else "", time.perf_counter() - t0)


def _weights_path(spec: str) -> str | None:
    from cluster.teachers import parse_teacher_spec
    try:
        return parse_teacher_spec(spec).path
    except ValueError:
        return None   # load_teacher names the bad spec


def check_label(cfg) -> None:
    """Preflight of a :class:`cluster.label.config.LabelConfig` (see the module docstring)."""
    from cluster.label.config import FOUNDATION
    specs = [t for t in cfg.teachers if t != FOUNDATION]
    weights = [p for p in map(_weights_path, specs) if p]
    _run([("input", cfg.input)], [("output", cfg.output)], weights, cfg.s3,
         lambda: check_teachers(specs, cfg.s3, cfg.teacher_size))


def check_train(cfg) -> None:
    """Preflight of a :class:`cluster.training.sections.TrainConfig` (see the module docstring)."""
    d = cfg.data
    inputs = [(f"data.paired[{i}].uri", p.uri) for i, p in enumerate(d.paired)]
    for i, u in enumerate(d.unlabeled):
        inputs += [(f"data.unlabeled[{i}].{k}", v) for k, v in (("uri", u.uri), ("labels", u.labels),
                                                              ("teacher_labels", u.teacher_labels)) if v]
    if cfg.val.uri:
        inputs.append(("val.uri", cfg.val.uri))
    outputs = [("run.storage", cfg.run.storage)] + ([("output.dir", cfg.output.dir)] if cfg.output.dir else [])
    specs = list(d.teacher.teachers)
    weights = [p for p in map(_weights_path, specs) if p]
    weights += [w for w in (cfg.model.backbone_weights, cfg.model.init_weights) if w]

    def load() -> None:
        check_start_weights(cfg)
        check_teachers(specs, cfg.s3, d.teacher.teacher_size)
    _run(inputs, outputs, weights, cfg.s3, load)
