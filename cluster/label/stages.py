"""The stages of the labelling pipeline, each a plain callable that Ray Data maps over batches (and a unit
test calls directly): :func:`load_images` (read + decode + resize, CPU tasks), :class:`TeacherLabeler` (the
teacher actor pool) and :func:`write_label_shards` (PNG-encode, write the label and reject shards)."""

from __future__ import annotations

import collections
import json
import logging
import posixpath
import time
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from cluster import labels as L
from cluster import storage
from cluster.raypool import cached_filesystem
from cluster.storage import RetryConfig, S3Config
from cluster.teacher_actor import TeacherActor
from cluster.teachers.spec import EnsembleConfig
from kd import schema as S
from kd.imageio import ImageDecodeError, decode_image, encode_png, oriented_size, resize

log = logging.getLogger(__name__)

__all__ = ["load_images", "TeacherLabeler", "write_label_shards", "DETAIL_CHARS", "DEFERRED_EXAMPLES"]

DETAIL_CHARS = 300       # characters of an error message kept in a reject row or summary
DEFERRED_EXAMPLES = 5    # deferred keys named in the summary


# --- read + decode + resize (CPU tasks) ------------------------------------------------------------------

def _read_rounds(keys: Sequence[str], read: Any, retry: RetryConfig) -> tuple[dict[str, Any], dict[str, int]]:
    """``read(keys) -> {key: value or exception}``, called again for the keys whose exception is transient
    (:func:`cluster.storage.is_transient`) after a backoff, up to ``retry.attempts`` rounds: one wait per
    round for the whole batch, so an outage costs a batch the retry window once, not once per image.
    Returns the last result per key and how many times each key was retried."""
    results: dict[str, Any] = {}
    retried: dict[str, int] = collections.Counter()
    pending = list(keys)
    for attempt in range(1, retry.attempts + 1):
        got = read(pending)
        results.update(got)
        pending = [k for k in pending if isinstance(got.get(k), Exception) and storage.is_transient(got[k])]
        if not pending or attempt == retry.attempts:
            break
        wait = retry.delay(attempt + 1)
        log.warning("%d reads met a transient error (attempt %d of %d, next in %.1f s), e.g. %s: %s",
                    len(pending), attempt, retry.attempts, wait, pending[0], got[pending[0]])
        for k in pending:
            retried[k] += 1
        time.sleep(wait)
    return results, retried


def _read_objects(fs, root: str, s3: S3Config | None, keys: Sequence[str]) -> dict[str, bytes | Exception]:
    out: dict[str, bytes | Exception] = {}
    for key in keys:
        try:
            out[key] = storage.read_bytes(fs, storage.join(root, key), s3)
        except OSError as e:
            out[key] = e
    return out


def load_images(batch: Mapping[str, np.ndarray], *, input_uri: str, s3: S3Config | None,
                size: int, retry: RetryConfig | None = None) -> dict[str, np.ndarray]:
    """Manifest rows -> rows with ``image`` uint8 (N, size, size, 3) and ``reason`` ("" when decodable).

    A row whose bytes cannot be read or decoded keeps a black placeholder image and gets the machine
    reason (``empty``, ``truncated``, ``not_an_image``, ``too_large``, ``read_error`` ...) and the message.
    A read that fails with a transient storage error is retried (``retry``, whole batch per round); a row
    still failing so gets the reason :data:`kd.schema.DEFERRED` (never written, so not done). ``retries``
    counts each row's retried reads. ``orig_h``/``orig_w`` are the source image's displayed size (EXIF
    orientation applied; not the draft-decoded size).
    """
    retry = retry or RetryConfig()
    fs, root = cached_filesystem(input_uri, s3)
    keys = [str(k) for k in batch[S.KEY]]
    n = len(keys)
    images = np.zeros((n, size, size, 3), np.uint8)
    orig_h = np.zeros(n, np.int32)
    orig_w = np.zeros(n, np.int32)
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    from cluster.video_data import read_video_frames
    from kd.videoio import parse_frame_key
    frame_keys = [k for k in keys if parse_frame_key(k) is not None]
    # frames of video files, each file decoded once (per round)
    video_frames, retried = _read_rounds(frame_keys, lambda ks: read_video_frames(fs, root, ks), retry)
    files, retried_files = _read_rounds([k for k in keys if k not in video_frames],
                                        lambda ks: _read_objects(fs, root, s3, ks), retry)
    retried.update(retried_files)
    for i, key in enumerate(keys):
        got = video_frames[key] if key in video_frames else files[key]
        if isinstance(got, Exception):
            if storage.is_transient(got):
                reasons[i] = S.DEFERRED
            else:
                reasons[i] = "video_decode" if key in video_frames else "read_error"
            details[i] = f"{type(got).__name__}: {got}"[:DETAIL_CHARS]
            continue
        if key in video_frames:
            orig_h[i], orig_w[i] = got.shape[:2]
            images[i] = resize(got, (size, size))
            continue
        try:
            rgb = decode_image(got, max_side=size)
            orig_h[i], orig_w[i] = oriented_size(got)
            images[i] = resize(rgb, (size, size))
        except ImageDecodeError as e:
            reasons[i], details[i] = e.reason, str(e)[:DETAIL_CHARS]
        except MemoryError as e:
            reasons[i], details[i] = "too_large", f"MemoryError: {e}"[:DETAIL_CHARS]
        except Exception as e:  # noqa: BLE001 - any decoder failure is a reject, never a job failure
            reasons[i], details[i] = "decode_error", f"{type(e).__name__}: {e}"[:DETAIL_CHARS]
    return {S.ID: batch[S.ID], S.KEY: batch[S.KEY], S.SEQUENCE: batch[S.SEQUENCE], S.FRAME: batch[S.FRAME],
            S.ORIG_H: orig_h, S.ORIG_W: orig_w, S.IMAGE: images, S.REASON: reasons, S.DETAIL: details,
            S.RETRIES: np.array([retried.get(k, 0) for k in keys], np.int32)}


# --- teacher (actor pool) --------------------------------------------------------------------------

class TeacherLabeler(TeacherActor):
    """Ray Data callable class: decoded batch -> soft labels. Also callable directly (unit tests).

    A :class:`cluster.teacher_actor.TeacherActor` (the same actor as online distillation's
    :class:`cluster.training.data.OnlineLabeler`). ``__init__`` loads the teacher(s) once per actor; ``__call__`` runs the network on the rows whose
    ``reason`` is empty, resizes the probabilities to ``label_size`` (bilinear), quantises them to uint8
    (``round(255 p)``) and computes the confidence summary on the float map:

        conf_mean = mean |2p - 1|,   conf_frac = mean [p < 0.1 or p > 0.9],   fg_frac = mean [p > 0.5]

    and, from the same forward pass, the disagreement of the teacher's views ``v`` (ensemble members x flips,
    :meth:`cluster.teachers.Teacher.probs_views`) at the teacher's resolution:

        disagreement = mean over pixels of (1/V) sum_v |v - p|     (NaN when V = 1)

    Reject rows pass through with an all-zero label and NaN statistics. The ``image`` column is dropped.
    With ``decode`` (the keyword arguments of :func:`load_images` but the batch), manifest rows without an
    ``image`` column are read and decoded here first (decode placement ``actor``).
    """

    def __init__(self, teachers: Sequence[str], *, s3: S3Config | None = None, tta: str = "none",
                 label_size: int | None = None, teacher_size: int | None = None, device: str = "auto",
                 precision: str = "auto", threads: int = 1, decode: Mapping[str, Any] | None = None,
                 backend: str = "auto", ensemble: EnsembleConfig | None = None):
        super().__init__(teachers, s3=s3, tta=tta, teacher_size=teacher_size, device=device, precision=precision,
                         threads=threads, backend=backend, ensemble=ensemble)
        self.label_size = int(label_size or self.teacher.input_size)
        self.decode = dict(decode) if decode else None

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        if S.IMAGE not in batch:  # decode placement "actor": manifest rows come straight here
            if self.decode is None:
                raise ValueError("TeacherLabeler: the batch has no 'image' column and no decode settings were given")
            batch = load_images(batch, **self.decode)
        reasons = np.asarray(batch[S.REASON])
        n, size = len(reasons), self.label_size
        ok = reasons == ""
        label = np.zeros((n, size, size), np.uint8)
        conf_mean = np.full(n, np.nan, np.float32)
        conf_frac = np.full(n, np.nan, np.float32)
        fg_frac = np.full(n, np.nan, np.float32)
        disagreement = np.full(n, np.nan, np.float32)
        if ok.any():
            images = batch[S.IMAGE] if ok.all() else batch[S.IMAGE][ok]
            p, spread = self.maps(images, size, views=True)
            if spread is not None:
                disagreement[ok] = spread
            with torch.inference_mode():
                q = (p * 255.0).round_().to(torch.uint8)
                stats = torch.stack([(2.0 * p - 1.0).abs().mean((1, 2)),
                                     ((p < 0.1) | (p > 0.9)).float().mean((1, 2)),
                                     (p > 0.5).float().mean((1, 2))], 1).cpu().numpy()
            label[ok] = q.cpu().numpy()
            conf_mean[ok], conf_frac[ok], fg_frac[ok] = stats[:, 0], stats[:, 1], stats[:, 2]
        out = {k: batch[k] for k in (S.ID, S.KEY, S.SEQUENCE, S.FRAME, S.ORIG_H, S.ORIG_W, S.REASON, S.DETAIL,
                                     S.RETRIES) if k in batch}
        out.update({
            S.LABEL: label, S.CONF_MEAN: conf_mean, S.CONF_FRAC: conf_frac, S.FG_FRAC: fg_frac,
            S.DISAGREEMENT: disagreement, S.TEACHER: np.full(n, self.teacher.id, dtype=object),
            S.WEIGHTS_HASH: np.full(n, self.teacher.weights_hash, dtype=object),
            S.TTA: np.full(n, self.tta, dtype=object),
            S.LABELLED_AT: np.full(n, time.time(), np.float64),
        })
        return out


# --- encode + write (CPU tasks) --------------------------------------------------------------------

def _col(batch: Mapping[str, np.ndarray], name: str, idx: np.ndarray) -> list:
    return np.asarray(batch[name])[idx].tolist()


def write_label_shards(batch: Mapping[str, np.ndarray], *, output_uri: str, s3: S3Config | None,
                       retry: RetryConfig | None = None) -> dict[str, np.ndarray]:
    """PNG-encode the labels and write one label shard and/or one reject shard; returns one row of counts.

    Rows with reason :data:`kd.schema.DEFERRED` are written nowhere. A shard write is retried on transient
    storage errors (``retry``); when it still fails so, its rows become deferred too (not done: the next run
    labels them again); any other write error is raised.

    The returned row: ``labelled``, ``rejected``, ``deferred``, ``retried`` (transient errors retried: the
    rows' reads and this task's writes), ``reasons`` (JSON ``{reason: count}`` of the rejects),
    ``deferred_keys`` (JSON ``[[key, detail], ...]``, the first few), ``shards``, ``labelled_at``.
    """
    fs, root = cached_filesystem(output_uri, s3)
    reasons = np.asarray(batch[S.REASON])
    ok = np.flatnonzero(reasons == "")
    bad = np.flatnonzero((reasons != "") & (reasons != S.DEFERRED))
    deferred = [(str(batch[S.KEY][i]), str(batch[S.DETAIL][i])) for i in np.flatnonzero(reasons == S.DEFERRED)]
    retried = int(np.sum(batch[S.RETRIES])) if S.RETRIES in batch else 0

    def count_retry(_e: BaseException) -> None:
        nonlocal retried
        retried += 1

    def write(kind: str, table: pa.Table, idx: np.ndarray) -> bool:
        try:
            shards.append(L.write_shard(fs, root, kind, table, retry, on_retry=count_retry))
            return True
        except Exception as e:  # noqa: BLE001 - transient: deferred; anything else fails the task
            if not storage.is_transient(e):
                raise
            log.warning("%s shard of %d rows not written after retries (deferred to the next run): %s",
                        kind, len(idx), e)
            deferred.extend((str(batch[S.KEY][i]), f"writing the {kind} shard: {type(e).__name__}: {e}"[:DETAIL_CHARS])
                            for i in idx)
            return False

    shards: list[str] = []
    labelled = rejected = 0
    if len(ok):
        labels = np.asarray(batch[S.LABEL])
        h, w = labels.shape[1:3]
        table = pa.table({
            S.ID: _col(batch, S.ID, ok), S.KEY: _col(batch, S.KEY, ok),
            S.SEQUENCE: _col(batch, S.SEQUENCE, ok), S.FRAME: _col(batch, S.FRAME, ok),
            S.ORIG_H: _col(batch, S.ORIG_H, ok), S.ORIG_W: _col(batch, S.ORIG_W, ok),
            S.TEACHER: _col(batch, S.TEACHER, ok), S.WEIGHTS_HASH: _col(batch, S.WEIGHTS_HASH, ok),
            S.TTA: _col(batch, S.TTA, ok),
            S.LABEL_H: [int(h)] * len(ok), S.LABEL_W: [int(w)] * len(ok),
            S.LABEL_PNG: [encode_png(labels[i]) for i in ok],
            S.CONF_MEAN: _col(batch, S.CONF_MEAN, ok), S.CONF_FRAC: _col(batch, S.CONF_FRAC, ok),
            S.FG_FRAC: _col(batch, S.FG_FRAC, ok),
            S.DISAGREEMENT: (_col(batch, S.DISAGREEMENT, ok) if S.DISAGREEMENT in batch  # foundation: one view
                             else [float("nan")] * len(ok)),
        }, schema=L.LABEL_SCHEMA)
        if S.CONF in batch:  # foundation labels: + confidence map, caption, boxes (cluster.foundation)
            from cluster.foundation import foundation_columns, foundation_fields
            values = foundation_columns(batch, ok)
            for f in foundation_fields():
                table = table.append_column(f, pa.array(values[f.name], f.type))
        labelled = len(ok) if write(S.LABELS_DIR, table, ok) else 0
    counts: collections.Counter = collections.Counter()
    if len(bad) and write(S.REJECTS_DIR, _reject_table(batch, bad), bad):
        rejected = len(bad)
        counts.update(reasons[bad].tolist())
    return {"labelled": np.array([labelled], np.int64), "rejected": np.array([rejected], np.int64),
            "deferred": np.array([len(deferred)], np.int64), "retried": np.array([retried], np.int64),
            "reasons": np.array([json.dumps(counts)], dtype=object),
            "deferred_keys": np.array([json.dumps(deferred[:DEFERRED_EXAMPLES])], dtype=object),
            "shards": np.array([",".join(posixpath.basename(s) for s in shards)], dtype=object),
            "labelled_at": np.array([_when_labelled(batch)], dtype=object)}


def _when_labelled(batch: Mapping[str, np.ndarray]) -> str:
    """JSON ``[[t, n], ...]``: how many rows of this shard the teacher finished at time t (one t per teacher
    batch); stages without that column count the write time. The driver derives the steady rate from it."""
    if S.LABELLED_AT in batch:
        t, n = np.unique(np.asarray(batch[S.LABELLED_AT], np.float64), return_counts=True)
        return json.dumps([[float(a), int(b)] for a, b in zip(t, n)])
    return json.dumps([[time.time(), len(batch[S.REASON])]])


def _reject_table(batch: Mapping[str, np.ndarray], idx: np.ndarray) -> pa.Table:
    return pa.table({
        S.ID: _col(batch, S.ID, idx), S.KEY: _col(batch, S.KEY, idx),
        S.SEQUENCE: _col(batch, S.SEQUENCE, idx), S.FRAME: _col(batch, S.FRAME, idx),
        S.REASON: _col(batch, S.REASON, idx), S.DETAIL: _col(batch, S.DETAIL, idx),
    }, schema=L.REJECT_SCHEMA)
