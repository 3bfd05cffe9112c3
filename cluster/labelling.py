"""Teacher labelling at scale: images in a folder or bucket -> soft-label Parquet shards, with Ray Data.

The pipeline (one streaming Ray Data job)::

    manifest (driver)   list keys; stable id = sha1(key); video frame folders carry sequence and frame;
                        a video file gives one row per frame (key "<file>#<index>", decoded with PyAV);
                        ids already in OUTPUT/labels or OUTPUT/rejects are skipped ("skipped as done")
    load_images         CPU tasks: read bytes, decode robustly, resize to the teacher's input size;
                        an image that cannot be decoded becomes a reject row (reason, detail), not a crash
    TeacherLabeler      an actor pool (ActorPoolStrategy: fixed size or min/max autoscaling; num_cpus and
                        num_gpus per actor; explicit batch size; fp16 on GPU): probabilities, resized to
                        the label size, quantised to uint8, plus a per-image confidence summary and, for
                        an ensemble and/or flip TTA, the disagreement of the views averaged
    write_label_shards  CPU tasks: PNG-encode the maps, write OUTPUT/labels/part-*.parquet and
                        OUTPUT/rejects/part-*.parquet atomically (a shard is complete or absent)
    write_review        driver, at the end: OUTPUT/review.csv, the labelled images worst first

Nothing lost, nothing twice: every object under the input is accounted for -- an input (an image file, a
video frame) ends in a label shard, in a reject shard (with its reason: undecodable, missing, a broken link,
a FIFO or other special file, ...) or *deferred*; any other object (another file type, a hidden name, an S3
folder marker, a mask) is counted in the summary's ``ignored``. A rerun skips every id already present in a
label or reject shard, so rerunning a finished job labels nothing and rerunning a killed job labels exactly
the rest. Readers dedupe by id in case Ray retried a task that had already written.

Transient is not final: a read or shard write that fails with a transient storage error (network, timeout,
throttling, 5xx) is retried with backoff (``retry``); an input that still fails is *deferred* -- written
nowhere, so not done -- counted in the summary, and the run raises :class:`DeferredInputs` (``sodkd label``
exits non-zero); the next run labels it. A missing object is a reject (``read_error``), not deferred.

Keys are data: the key listed is the key read, hashed and stored, byte for byte (:mod:`cluster.catalog`);
output names never derive from keys. Images are labelled as a viewer shows them: EXIF orientation applied,
``orig_h``/``orig_w`` the displayed size; an animated GIF is labelled from its first frame.

Reject rows travel through the teacher stage untouched (the actor only runs the network on decodable
images) so both tables come out of one pass over the data.

The review list: the images a person should look at (and label by hand) first. A teacher that averages
several *views* -- ensemble members x flips, see :mod:`cluster.teachers` -- stores per image

    disagreement = mean over pixels of (1/V) sum_v |v - p|,   p = (1/V) sum_v v

(NaN for a single view). At the end of every run the job reads ``key, conf_mean, disagreement`` of the whole
output (earlier runs' shards included) and scores each image

    score = disagreement          when the image has one (the views disagree: higher = worse)
    score = 1 - conf_mean         otherwise (single teacher, foundation teacher, shards older than the
                                  column: a map far from 0/1 = worse)

The two are on different scales: an output mixing both kinds of rows ranks them on one list anyway.
``OUTPUT/review.csv`` holds ``rank, key, score, conf_mean, disagreement`` worst first (ties by key), the worst
``review.top`` images (all with ``top: null``); it is rewritten by each run through the output's filesystem
(local or S3, atomically). The MLflow run gets it as ``review/review.csv`` and a contact sheet of the worst
``review.sheet`` images beside their soft labels as ``review/worst.png``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import posixpath
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster import catalog, storage
from cluster import labels as L
from cluster.foundation import FoundationConfig
from cluster.raypool import actor_pool, cached_filesystem, torch_threads
from cluster.storage import RetryConfig, S3Config
from cluster.tracking import TrackingConfig
from kd import schema as S
from kd.config import ConfigError, load_config
from kd.imageio import ImageDecodeError, decode_image, encode_png, oriented_size, resize

log = logging.getLogger(__name__)

__all__ = ["PoolConfig", "DecodeConfig", "WriteConfig", "ReviewConfig", "RetryConfig", "LabelConfig",
           "load_label_config", "Manifest", "build_manifest", "load_images", "TeacherLabeler", "write_label_shards",
           "LabelSummary", "DeferredInputs", "Review", "review_scores", "write_review", "run_labelling",
           "sample_figure", "review_figure"]

_DETAIL_CHARS = 300
_DEFERRED_EXAMPLES = 5   # deferred keys named in the summary


def _finite(section: str, **values: float) -> None:
    """Reject NaN and infinite values, naming the dotted key."""
    for name, v in values.items():
        if v is not None and not math.isfinite(v):
            raise ConfigError(f"{section}.{name}: must be a finite number, got {v}")
FOUNDATION = "foundation"  # teacher spec of the staged BLIP -> GroundingDINO -> SAM teacher


# --- configuration ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """The teacher actor pool.

    Attributes:
        size: a fixed number of actors; set it to None to autoscale between ``min_size`` and ``max_size``.
        min_size, max_size: autoscaling bounds (used when ``size`` is None).
        num_cpus, num_gpus: Ray resources per actor. Keep ``num_cpus`` fractional on small machines, or the
            actors can take every CPU and starve the decode tasks.
        batch_size: images per forward pass.
        torch_threads: intra-op threads per actor; 0 = one per whole CPU asked for (at least 1).
        device: ``auto`` (CUDA when the actor has a GPU), ``cpu`` or ``cuda``.
        precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32`` or ``fp16``.
    """

    size: int | None = 1
    min_size: int | None = None
    max_size: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 16
    torch_threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16"] = "auto"

    def __post_init__(self) -> None:
        _finite("pool", num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        if self.size is None:
            if self.min_size is None or self.max_size is None:
                raise ConfigError("pool: set size, or min_size and max_size for autoscaling")
            if not 1 <= self.min_size <= self.max_size:
                raise ConfigError(f"pool: need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        elif self.size < 1:
            raise ConfigError(f"pool.size: must be >= 1, got {self.size}")
        elif self.min_size is not None or self.max_size is not None:
            raise ConfigError("pool: give either size or min_size/max_size, not both")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("pool: num_cpus and num_gpus must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"pool.batch_size: must be >= 1, got {self.batch_size}")
        if self.torch_threads < 0:
            raise ConfigError(f"pool.torch_threads: must be >= 0, got {self.torch_threads}")

    def threads(self) -> int:
        return torch_threads(self.torch_threads, self.num_cpus)

    def compute(self):
        """The ``ActorPoolStrategy`` of this pool: ``size`` actors, or ``min_size`` up to ``max_size``."""
        return actor_pool(self.size) if self.size is not None else actor_pool(self.min_size, self.max_size)

    def resolved_device(self) -> str:
        """``device``, with ``auto`` resolved: CUDA when the actor has a GPU."""
        return self.device if self.device != "auto" else ("cuda" if self.num_gpus > 0 else "cpu")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Read + decode + resize: where it runs, Ray CPUs per task and images per task batch.

    ``placement``: ``tasks`` runs it in separate CPU tasks that overlap the teacher (what a GPU pool needs:
    the GPU never waits for JPEG decoding); ``actor`` runs it inside the teacher actors, before each forward
    pass (no hand-off of decoded images through the object store, and no decode tasks competing with the
    forward pass's threads for the same cores); ``auto`` = ``tasks`` for GPU pools, ``actor`` for CPU pools.
    On 2 CPU cores ``actor`` ran 1.4x faster than ``tasks`` (benchmarks/RESULTS.md, section labelling).
    ``num_cpus`` applies to ``tasks`` only.
    """

    num_cpus: float = 0.5
    batch_size: int = 16
    placement: Literal["auto", "tasks", "actor"] = "auto"

    def resolved_placement(self, num_gpus: float) -> str:
        if self.placement != "auto":
            return self.placement
        return "tasks" if num_gpus > 0 else "actor"

    def __post_init__(self) -> None:
        _finite("decode", num_cpus=self.num_cpus)
        if self.num_cpus <= 0 or self.batch_size < 1:
            raise ConfigError(f"decode: need num_cpus > 0 and batch_size >= 1, got {self.num_cpus}, {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    """Shard-writing tasks: Ray CPUs per task and rows per shard (the unit a kill can lose)."""

    num_cpus: float = 0.25
    shard_rows: int = 256

    def __post_init__(self) -> None:
        _finite("write", num_cpus=self.num_cpus)
        if self.num_cpus <= 0 or self.shard_rows < 1:
            raise ConfigError(f"write: need num_cpus > 0 and shard_rows >= 1, got {self.num_cpus}, {self.shard_rows}")


@dataclasses.dataclass(frozen=True)
class ReviewConfig:
    """The review list written at the end of each run (see the module docstring for the score).

    Attributes:
        top: rows of ``OUTPUT/review.csv``, the worst images; None = every labelled image.
        sheet: images in the MLflow contact sheet ``review/worst.png`` (0 = no sheet).
    """

    top: int | None = 200
    sheet: int = 12

    def __post_init__(self) -> None:
        if self.top is not None and self.top < 1:
            raise ConfigError(f"review.top: must be >= 1 or null, got {self.top}")
        if self.sheet < 0:
            raise ConfigError(f"review.sheet: must be >= 0, got {self.sheet}")


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """``sodkd label``: what to label, with which teacher(s), where to, and how to spread the work.

    Attributes:
        input: local folder or ``s3://bucket/prefix`` of images or video frame folders.
        output: where ``labels/`` and ``rejects/`` go (local or ``s3://``); may be inside the input bucket.
        teachers: teacher specs (see :mod:`cluster.teachers`); several make an ensemble (mean probability).
        layout: ``images`` (any tree of images), ``video`` (``ROOT/<seq>/images/*.jpg``,
            ``ROOT/<seq>/*.jpg`` or video files ``ROOT/<name>.mp4``: rows carry sequence and frame) or
            ``auto`` (video when every file sits
            under ``<seq>/images/`` or ``<seq>/masks/``, else images).
        s3: S3 endpoint and region (credentials always come from the AWS chain, never from here).
        label_size: side of the square soft label stored; None = the teacher's input size.
        teacher_size: input side for registered-model teachers; None = the model's own ``input_size``.
        tta: ``none`` or ``hflip`` (average with the mirrored prediction).
        ray_address: Ray cluster to join; None = ``$RAY_ADDRESS`` (set by ``sodkd submit``) or a private
            local instance.
        limit: label at most this many new images in this run (the rest stay for a later run); video
            files that cannot be read, which are only recorded as rejects, do not count.
        progress: show Ray Data progress bars.
        review: the review list (``OUTPUT/review.csv``) and its MLflow contact sheet.
        retry: job-level retries of reads and shard writes that met a transient storage error (network,
            timeout, throttling, 5xx; :func:`cluster.storage.is_transient`); an input still failing after
            them is *deferred*: not written anywhere, so not done, counted in the summary, retried by the
            next run, and the run raises :class:`DeferredInputs` (``sodkd label`` exits non-zero).
            ``s3.request_attempts`` sets the S3 clients' own per-request retries beneath these.
    """

    input: str
    output: str
    teachers: tuple[str, ...]
    layout: Literal["auto", "images", "video"] = "auto"
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    label_size: int | None = None
    teacher_size: int | None = None
    tta: Literal["none", "hflip"] = "none"
    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    write: WriteConfig = dataclasses.field(default_factory=WriteConfig)
    review: ReviewConfig = dataclasses.field(default_factory=ReviewConfig)
    retry: RetryConfig = dataclasses.field(default_factory=RetryConfig)
    limit: int | None = None
    progress: bool = True
    ray_address: str | None = None
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="sodkd-label"))
    foundation: FoundationConfig | None = None

    @property
    def is_foundation(self) -> bool:
        return self.teachers == (FOUNDATION,)

    def __post_init__(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("input and output: both are required")
        if not self.teachers:
            raise ConfigError("teachers: at least one teacher spec is required")
        if FOUNDATION in self.teachers:  # the staged foundation teacher (cluster.foundation), not a SOD model
            if len(self.teachers) > 1:
                raise ConfigError("teachers: 'foundation' cannot be ensembled with other teachers (fuse a SOD "
                                  "teacher's labels at training time: sodkd train-fm --teacher-labels)")
            if self.foundation is None:
                object.__setattr__(self, "foundation", FoundationConfig())
        elif self.foundation is not None:
            raise ConfigError("foundation: only used with teachers: [foundation]")
        for name in ("label_size", "teacher_size", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {v}")


def load_label_config(source: Any = None, overrides: Any = None) -> LabelConfig:
    """YAML path or mapping + dotted overrides -> :class:`LabelConfig` (strict, see :mod:`kd.config`)."""
    return load_config(LabelConfig, source, overrides)


# --- manifest --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Manifest:
    """What the input holds, all of it: ``items`` to label; ``rejected`` -- inputs known unlabellable from the
    listing alone, ``(item, reason, detail)`` (broken links, special files, links to folders, unreadable
    folders, video files PyAV cannot open), written as reject rows; ``ignored`` -- counts of the objects that
    are no input of the layout, by kind (:attr:`cluster.catalog.Catalog.ignored`)."""
    items: list[catalog.Item]
    rejected: list[tuple[catalog.Item, str, str]]
    layout: str
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)


def _manifest_entries(m: Manifest) -> Iterator[tuple[catalog.Item, str | None, str]]:
    return itertools.chain(((it, None, "") for it in m.items), m.rejected)


@dataclasses.dataclass
class Inputs:
    """What the input holds, streamed: ``entries`` give ``(item, reason, detail)`` in key order (``reason`` None
    for an input to label, else a listed reject, as :attr:`Manifest.rejected`); ``ignored`` is complete once
    they are consumed. Iterate once."""
    layout: str
    entries: Iterator[tuple[catalog.Item, str | None, str]]
    ignored: collections.Counter
    manifest: Manifest | None = None   # a video layout: listed whole


def _looks_like_video(keys: Iterable[str]) -> bool:
    """Every key is ``<seq>/images/<file>`` or ``<seq>/masks/<file>``, at least one under ``images`` (one pass
    that stops at the first other key: no split copy of the listing)."""
    images = False
    for k in keys:
        p = k.split("/")
        if len(p) != 3 or p[1] not in ("images", "masks"):
            return False
        images = images or p[1] == "images"
    return images


def open_inputs(cfg: LabelConfig) -> Inputs:
    """List the input, streamed for still images (a listing page at a time). ``layout: auto`` holds the first
    entries while every input key has the video layout's form: at the first that does not, the layout is images
    and the held entries go first; if the listing ends first, it is video. Video layouts are listed whole
    (:func:`build_manifest`): frames are numbered per sequence and video files expanded."""
    if cfg.layout != "video":
        stream = catalog.image_stream(cfg.input, cfg.s3, retry=cfg.retry)
        entries = iter(stream)
        if cfg.layout == "images":
            return Inputs("images", entries, stream.ignored)
        head: list[tuple[catalog.Item, str | None, str]] = []

        def keys() -> Iterator[str]:   # the input keys, each entry held as it is read
            for e in entries:
                head.append(e)
                if e[1] is None:
                    yield e[0].key
        if not _looks_like_video(keys()):   # stops at the first key that is no video frame
            return Inputs("images", itertools.chain(head, entries), stream.ignored)
    m = _video_manifest(cfg)
    return Inputs(m.layout, _manifest_entries(m), collections.Counter(m.ignored), m)


def build_manifest(cfg: LabelConfig) -> Manifest:
    """List the input once, whole: every image (or video frame) with its stable id, sorted by key."""
    inputs = open_inputs(cfg)
    if inputs.manifest is not None:
        return inputs.manifest
    items, rejected = [], []
    for it, reason, detail in inputs.entries:
        if reason is None:
            items.append(it)
        else:
            rejected.append((it, reason, detail))
    return Manifest(items, rejected, "images", dict(inputs.ignored))


def _video_manifest(cfg: LabelConfig) -> Manifest:
    cat = catalog.video_folders(cfg.input, cfg.s3)
    frames = [i for i in cat.items if i.frame >= 0]
    # video files: one row per frame (key "<file>#<index>", decoded with PyAV in load_images); a file that
    # cannot be opened as a video is recorded as a reject
    from cluster.video_data import expand_videos
    video_frames, unreadable = expand_videos(cat.fs, [i for i in cat.items if i.frame < 0])
    for it in unreadable:  # a final reject only if the file reads now: an outage raises, recording nothing
        storage.retrying(lambda it=it: _probe(cat.fs, it.path), cfg.retry, f"reading {it.key}")
    rejected = cat.rejected + [(i, "video_file", "not a readable video file (PyAV could not open or demux it)")
                               for i in unreadable]
    return Manifest(frames + video_frames, rejected, "video", cat.ignored)


def _probe(fs, path: str) -> None:
    """Open ``path`` as the video reader does and read a few bytes; a missing or odd object is no error here."""
    try:
        with fs.open_input_file(path) as f:
            f.read(16)
    except (FileNotFoundError, pa.ArrowInvalid):
        pass


def _manifest_table(items: Sequence[catalog.Item]) -> pa.Table:
    return pa.table({
        S.ID: pa.array([i.id for i in items], pa.string()),
        S.KEY: pa.array([i.key for i in items], pa.string()),
        S.SEQUENCE: pa.array([i.sequence for i in items], pa.string()),
        S.FRAME: pa.array([i.frame for i in items], pa.int32()),
    })


# --- stage: read + decode + resize (CPU tasks) -------------------------------------------------------------

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
            details[i] = f"{type(got).__name__}: {got}"[:_DETAIL_CHARS]
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
            reasons[i], details[i] = e.reason, str(e)[:_DETAIL_CHARS]
        except MemoryError as e:
            reasons[i], details[i] = "too_large", f"MemoryError: {e}"[:_DETAIL_CHARS]
        except Exception as e:  # noqa: BLE001 - any decoder failure is a reject, never a job failure
            reasons[i], details[i] = "decode_error", f"{type(e).__name__}: {e}"[:_DETAIL_CHARS]
    return {S.ID: batch[S.ID], S.KEY: batch[S.KEY], S.SEQUENCE: batch[S.SEQUENCE], S.FRAME: batch[S.FRAME],
            S.ORIG_H: orig_h, S.ORIG_W: orig_w, S.IMAGE: images, S.REASON: reasons, S.DETAIL: details,
            S.RETRIES: np.array([retried.get(k, 0) for k in keys], np.int32)}


# --- stage: teacher (actor pool) --------------------------------------------------------------------------

class TeacherLabeler:
    """Ray Data callable class: decoded batch -> soft labels. Also callable directly (unit tests).

    ``__init__`` loads the teacher(s) once per actor; ``__call__`` runs the network on the rows whose
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
                 precision: str = "auto", threads: int = 1, decode: Mapping[str, Any] | None = None):
        import torch

        from cluster.teachers import build_teacher
        if threads:
            torch.set_num_threads(int(threads))
        self.teacher = build_teacher(list(teachers), tta=tta, s3=s3, device=device, precision=precision,
                                     input_size=teacher_size, threads=threads or None)
        self.tta = tta
        self.label_size = int(label_size or self.teacher.input_size)
        self.decode = dict(decode) if decode else None

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F
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
            with torch.inference_mode():
                p, views = self.teacher.predict_views(images)
                if len(views) > 1:
                    spread = sum((v - p).abs_().mean((1, 2)) for v in views) / len(views)
                    disagreement[ok] = spread.float().cpu().numpy()
                del views
                if p.shape[-1] != size or p.shape[-2] != size:
                    p = F.interpolate(p[:, None], size=(size, size), mode="bilinear", align_corners=False,
                                      antialias=size < p.shape[-1])[:, 0].clamp_(0.0, 1.0)
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


# --- stage: encode + write (CPU tasks) --------------------------------------------------------------------

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
            deferred.extend((str(batch[S.KEY][i]), f"writing the {kind} shard: {type(e).__name__}: {e}"[:_DETAIL_CHARS])
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
            "deferred_keys": np.array([json.dumps(deferred[:_DEFERRED_EXAMPLES])], dtype=object),
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


# --- the job ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LabelSummary:
    """What one run of the job did.

    ``images_per_s`` counts labelled + rejected images over ``wall_s``, the whole run (listing, the driver's
    teacher check, actor start-up included). ``steady_images_per_s`` is the rate once the pipeline is full:
    images the teacher finished after its first batch, over the time from the end of that batch to the end
    of the last -- the rate a long job runs at, where start-up is amortised. ``startup_s`` is run start to
    the end of the first teacher batch.

    Every object under the input is counted once: ``total`` inputs (= ``labelled + rejected + skipped_done +
    deferred + deferred_transient``) plus ``sum(ignored.values())`` objects that are no input of the layout
    (other file types, hidden names, S3 folder markers, masks). ``deferred_transient`` inputs met only
    transient storage errors (after ``retry``): nothing was written for them, the next run retries them;
    ``deferred_examples`` names a few (key, error). ``retried`` counts the transient errors that were retried.
    """

    total: int = 0
    labelled: int = 0
    rejected: int = 0
    skipped_done: int = 0
    deferred: int = 0                 # left for a later run by ``limit``
    deferred_transient: int = 0       # transient storage errors after every retry: not done, next run retries
    retried: int = 0
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)
    deferred_examples: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    images_per_s: float = 0.0
    steady_images_per_s: float = 0.0
    startup_s: float = 0.0
    first_batch_at: float = 0.0       # epoch seconds when the teacher finished its first / last batch
    last_batch_at: float = 0.0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    teacher: str = ""
    weights_hash: str = ""
    layout: str = ""
    run_id: str | None = None

    def line(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        ignored = ", ".join(f"{k} {v}" for k, v in sorted(self.ignored.items()))
        transient = (f", DEFERRED after transient storage errors {self.deferred_transient} (not done; rerun to "
                     f"label them)" if self.deferred_transient else "")
        return (f"sodkd label: {self.total} inputs: labelled {self.labelled}, rejected {self.rejected}"
                f"{f' ({reasons})' if reasons else ''}, skipped as done {self.skipped_done}"
                f"{f', deferred by limit {self.deferred}' if self.deferred else ''}{transient}"
                f"{f'; not inputs: {ignored}' if ignored else ''}"
                f"{f'; {self.retried} transient errors retried' if self.retried else ''}; "
                f"{self.wall_s:.1f} s, {self.images_per_s:.2f} images/s"
                f"{f' (steady {self.steady_images_per_s:.2f})' if self.steady_images_per_s else ''}; teacher {self.teacher} "
                f"({self.weights_hash})")


def _ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, as set by the Ray Jobs API), else start a local instance.

    A bare ``ray.init()`` would attach to whatever cluster ``ray start`` last left on this machine (even a
    dead one); a job must not depend on that, so the default is an explicit private local instance.
    """
    import ray
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", logging_level=logging.WARNING)


def _teacher_info(cfg: LabelConfig) -> tuple[str, str, int]:
    """Load the teacher once on the driver (CPU, fp32): fails fast on a bad spec; gives id, hash, size.

    The foundation teacher's models load in its stage actors; its hash is per row (see cluster.foundation).
    """
    if cfg.is_foundation:
        from cluster.foundation import teacher_id
        return teacher_id(cfg.foundation), "", cfg.foundation.image_size
    from cluster.teachers import build_teacher
    t = build_teacher(list(cfg.teachers), tta=cfg.tta, s3=cfg.s3, device="cpu", precision="fp32",
                      input_size=cfg.teacher_size)
    return t.id, t.weights_hash, t.input_size


def _no_extra_remote_args() -> dict[str, Any]:
    return {}


def build_dataset(cfg: LabelConfig, blocks: TodoBlocks, teacher_size: int):
    """The Ray Data pipeline over the inputs of ``blocks`` (lazy: nothing runs until it is consumed)."""
    _ensure_ray(cfg.ray_address)
    step = cfg.decode.batch_size
    ds = blocks.dataset()
    decode_kwargs = {"input_uri": cfg.input, "s3": cfg.s3, "size": teacher_size, "retry": cfg.retry}
    in_actor = cfg.decode.resolved_placement(cfg.pool.num_gpus) == "actor" and not cfg.is_foundation
    if not in_actor:
        # ray_remote_args_fn keeps Ray Data from fusing these tasks into the actor stage below when the
        # resources happen to match: the placement is our decision, not the optimiser's
        ds = ds.map_batches(load_images, batch_size=step, num_cpus=cfg.decode.num_cpus,
                            ray_remote_args_fn=_no_extra_remote_args, fn_kwargs=decode_kwargs)
    if cfg.is_foundation:
        from cluster.foundation import foundation_stages
        ds = foundation_stages(ds, cfg.foundation, cfg.label_size or teacher_size)
        return ds.map_batches(write_label_shards, batch_size=cfg.write.shard_rows, num_cpus=cfg.write.num_cpus,
                              fn_kwargs={"output_uri": cfg.output, "s3": cfg.s3, "retry": cfg.retry})
    pool = cfg.pool
    device = pool.resolved_device()
    ds = ds.map_batches(
        TeacherLabeler, batch_size=pool.batch_size, compute=pool.compute(), num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        fn_constructor_kwargs={"teachers": list(cfg.teachers), "s3": cfg.s3, "tta": cfg.tta,
                               "label_size": cfg.label_size, "teacher_size": cfg.teacher_size,
                               "device": device, "precision": pool.precision, "threads": pool.threads(),
                               "decode": decode_kwargs if in_actor else None})
    return ds.map_batches(write_label_shards, batch_size=cfg.write.shard_rows, num_cpus=cfg.write.num_cpus,
                          fn_kwargs={"output_uri": cfg.output, "s3": cfg.s3, "retry": cfg.retry})


class DeferredInputs(OSError):
    """A labelling run ended with inputs deferred after transient storage errors (``summary`` says how many
    and names a few): they are not done, and the next run retries them."""

    def __init__(self, summary: LabelSummary):
        examples = "; ".join(f"{k}: {d}" for k, d in summary.deferred_examples[:2])
        super().__init__(f"{summary.deferred_transient} inputs deferred after transient storage errors (not done; "
                         f"rerun the same command to label them){f', e.g. {examples}' if examples else ''}")
        self.summary = summary


_ID_CHUNK = 65536     # listed entries planned at a time (their Item objects and id strings exist for one chunk)
_INLINE_ROWS = 65536  # inputs to label held by the driver; past this they go to Ray's object store
_BLOCK_ROWS = 1024    # rows per object-store block of a large job (small jobs: decode.batch_size rows a block)


def _check_ids(cfg: LabelConfig, items: Iterable[catalog.Item]) -> None:
    seen: dict[str, str] = {}
    for it in items:
        other = seen.setdefault(it.id, it.key)
        if other != it.key:
            raise ValueError(f"{cfg.input}: the keys {other!r} and {it.key!r} hash to the same id {it.id}")


def _sorted_isin(sorted_values: np.ndarray, x: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """``x[i] in sorted_values`` for every ``i`` (binary search, ``chunk`` at a time)."""
    hit = np.zeros(len(x), bool)
    if len(sorted_values):
        for i in range(0, len(x), chunk):
            part = x[i:i + chunk]
            pos = np.searchsorted(sorted_values, part)
            np.minimum(pos, len(sorted_values) - 1, out=pos)
            hit[i:i + chunk] = sorted_values[pos] == part
    return hit


Entry = tuple[catalog.Item, "str | None", str]   # (item, reject reason or None, detail), as Inputs give them


@dataclasses.dataclass
class Chunk:
    """One planned chunk of the listing: how many entries it had, those not done yet (``todo`` to label,
    ``rejected`` listed rejects to record)."""
    listed: int
    todo: list[catalog.Item]
    rejected: list[tuple[catalog.Item, str, str]]


def _plan_chunks(cfg: LabelConfig, entries: Iterable[Entry], out_fs, out_root: str,
                 relist: Callable[[], Iterable[catalog.Item]]) -> Iterator[Chunk]:
    """What this run labels, streamed: ``entries`` ``_ID_CHUNK`` at a time, each chunk's entries whose id is in
    no label or reject shard under the output. Before the first chunk the temporaries an interrupted run left
    are removed; after the last, no two listed keys may share an id (``relist`` gives the listing again to name
    them: :func:`_check_ids`), so a consumer must not act on the chunks before the iteration ends.

    Memory: the done-set (:func:`cluster.labels.done_packed`) and every listed id, packed to 8 bytes each
    (:func:`cluster.labels.pack_any`), plus one chunk's Python objects. Filtering is ``np.searchsorted`` on the
    sorted done-set; the id check sorts the listed ids and compares neighbours.
    """
    stale = L.remove_stale_temporaries(out_fs, out_root)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", stale)
    done = L.done_packed(out_fs, out_root)
    seen: list[np.ndarray] = []
    entries = iter(entries)
    while True:
        chunk = list(itertools.islice(entries, _ID_CHUNK))
        if not chunk:
            break
        ids = L.pack_any([it.id for it, _, _ in chunk])
        seen.append(ids)
        keep = np.logical_not(_sorted_isin(done, ids)).tolist()
        yield Chunk(len(chunk), [it for (it, r, _), k in zip(chunk, keep) if k and r is None],
                    [e for e, k in zip(chunk, keep) if k and e[1] is not None])
    del done
    listed = np.concatenate(seen) if seen else np.empty(0, np.uint64)
    del seen
    listed.sort()
    if np.any(listed[1:] == listed[:-1]):
        del listed
        _check_ids(cfg, relist())   # names the two keys (or passes: one key listed twice)


def _plan(cfg: LabelConfig, manifest: Manifest, out_fs, out_root: str
          ) -> tuple[list[catalog.Item], list[tuple[catalog.Item, str, str]]]:
    """:func:`_plan_chunks` over a whole :class:`Manifest`: ``(todo, rejected_now)``."""
    todo: list[catalog.Item] = []
    rejected: list[tuple[catalog.Item, str, str]] = []
    for c in _plan_chunks(cfg, _manifest_entries(manifest), out_fs, out_root,
                          lambda: itertools.chain(manifest.items, (it for it, _, _ in manifest.rejected))):
        todo += c.todo
        rejected += c.rejected
    return todo, rejected


class TodoBlocks:
    """The inputs a run labels as the Arrow blocks Ray Data starts from. While at most ``_INLINE_ROWS``, the
    driver holds them and hands them over as blocks of ``step`` rows (small jobs: one decode task a batch);
    past that, each ``_BLOCK_ROWS`` goes to Ray's object store through ``put`` as soon as it is full, so the
    driver holds at most ``_INLINE_ROWS`` items (Ray spills the store to disk)."""

    def __init__(self, step: int, put: Callable[[pa.Table], Any]):
        self.step, self.put = step, put
        self.rows = 0
        self.pending: list[catalog.Item] = []
        self.refs: list[Any] = []

    def add(self, items: Sequence[catalog.Item]) -> None:
        self.pending += items
        self.rows += len(items)
        if self.refs or len(self.pending) > _INLINE_ROWS:
            self._spill(final=False)

    def _spill(self, final: bool) -> None:
        n = len(self.pending) if final else len(self.pending) - len(self.pending) % _BLOCK_ROWS
        for i in range(0, n, _BLOCK_ROWS):   # fresh buffers per block: a slice would carry its parent's
            self.refs.append(self.put(_manifest_table(self.pending[i:i + _BLOCK_ROWS])))
        del self.pending[:n]

    def dataset(self):
        import ray
        if self.refs:
            self._spill(final=True)
            return ray.data.from_arrow_refs(self.refs)
        table = _manifest_table(self.pending)
        return ray.data.from_arrow([table.slice(i, self.step) for i in range(0, table.num_rows, self.step)])


@dataclasses.dataclass
class RunPlan:
    """What one run does: the inputs to label (``blocks``), listed rejects to record, and the counts."""
    layout: str
    total: int
    ignored: dict[str, int]
    blocks: TodoBlocks
    rejected_now: list[tuple[catalog.Item, str, str]]
    deferred: int            # past ``cfg.limit``: not labelled by this run

    @property
    def skipped_done(self) -> int:
        return self.total - self.blocks.rows - self.deferred - len(self.rejected_now)


def plan_run(cfg: LabelConfig, out_fs, out_root: str, put: Callable[[pa.Table], Any]) -> RunPlan:
    """List the input once, streamed (:func:`open_inputs`), and keep what is not done (:func:`_plan_chunks`),
    up to ``cfg.limit``: the driver's whole plan in memory bounded by the packed ids (8 bytes a listed key and
    a done id) plus ``_INLINE_ROWS`` items; ``put`` moves a block into Ray's object store."""
    inputs = open_inputs(cfg)
    blocks = TodoBlocks(cfg.decode.batch_size, put)
    rejected_now: list[tuple[catalog.Item, str, str]] = []
    total = deferred = 0
    for c in _plan_chunks(cfg, inputs.entries, out_fs, out_root,
                          lambda: (it for it, _, _ in open_inputs(cfg).entries)):
        total += c.listed
        rejected_now += c.rejected
        take = c.todo if cfg.limit is None else c.todo[:max(0, cfg.limit - blocks.rows)]
        deferred += len(c.todo) - len(take)
        blocks.add(take)
    return RunPlan(inputs.layout, total, dict(inputs.ignored), blocks, rejected_now, deferred)


def _label(cfg: LabelConfig, summary: LabelSummary) -> Review | None:
    t_start, run_start = time.perf_counter(), time.time()
    out_fs, out_root = storage.get_filesystem(cfg.output, cfg.s3)

    def put(table: pa.Table):   # a large job's blocks wait in Ray's object store, not in the driver
        import ray
        _ensure_ray(cfg.ray_address)
        return ray.put(table)
    plan = plan_run(cfg, out_fs, out_root, put)
    summary.layout, summary.ignored, summary.total = plan.layout, plan.ignored, plan.total
    summary.skipped_done, summary.deferred = plan.skipped_done, plan.deferred
    reasons: collections.Counter = collections.Counter()
    rejected_now = plan.rejected_now
    if rejected_now:  # known from the listing alone: recorded without Ray
        batch = {S.ID: np.array([i.id for i, _, _ in rejected_now], dtype=object),
                 S.KEY: np.array([i.key for i, _, _ in rejected_now], dtype=object),
                 S.SEQUENCE: np.array([i.sequence for i, _, _ in rejected_now], dtype=object),
                 S.FRAME: np.array([i.frame for i, _, _ in rejected_now], np.int32),
                 S.REASON: np.array([r for _, r, _ in rejected_now], dtype=object),
                 S.DETAIL: np.array([d[:_DETAIL_CHARS] for _, _, d in rejected_now], dtype=object)}
        out = write_label_shards(batch, output_uri=cfg.output, s3=cfg.s3, retry=cfg.retry)
        _count(summary, reasons, out)
    summary.teacher, summary.weights_hash, teacher_size = _teacher_info(cfg)
    log.info("labelling %d images (%d skipped as done) with %s at %d px", plan.blocks.rows, summary.skipped_done,
             summary.teacher, teacher_size)
    if plan.blocks.rows:
        import ray
        _ensure_ray(cfg.ray_address)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
        ds = build_dataset(cfg, plan.blocks, teacher_size)
        finished: collections.Counter = collections.Counter()  # teacher batch end time -> images
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            _count(summary, reasons, out)
            for when in out["labelled_at"]:
                for t, n in json.loads(when):
                    finished[t] += n
        _steady_rate(summary, sorted(finished.items()), run_start)
    summary.reasons = dict(reasons)
    if cfg.is_foundation and summary.labelled:
        summary.weights_hash = L.read_labels(cfg.output, cfg.s3, [S.WEIGHTS_HASH]).column(S.WEIGHTS_HASH)[0].as_py()
    summary.wall_s = time.perf_counter() - t_start
    processed = summary.labelled + summary.rejected
    summary.images_per_s = processed / summary.wall_s if summary.wall_s > 0 else 0.0
    try:
        return write_review(cfg)  # after the timing: the rates describe the labelling itself
    except OSError as e:  # the list is derived data, rewritten by every run: an outage must not hide the counts
        if not storage.is_transient(e):
            raise
        log.warning("review list not rewritten (transient storage error; the next run rewrites it): %s", e)
        return None


def _count(summary: LabelSummary, reasons: collections.Counter, out: Mapping[str, np.ndarray]) -> None:
    """Add the count rows of :func:`write_label_shards` to ``summary`` and ``reasons``."""
    summary.labelled += int(np.sum(out["labelled"]))
    summary.rejected += int(np.sum(out["rejected"]))
    summary.deferred_transient += int(np.sum(out["deferred"]))
    summary.retried += int(np.sum(out["retried"]))
    for r in out["reasons"]:
        reasons.update(json.loads(r))
    for d in out["deferred_keys"]:
        room = _DEFERRED_EXAMPLES - len(summary.deferred_examples)
        summary.deferred_examples += [tuple(x) for x in json.loads(d)[:max(room, 0)]]


# --- the review list -------------------------------------------------------------------------------------

REVIEW_COLUMNS = ("rank", "key", "score", "conf_mean", "disagreement")


@dataclasses.dataclass
class Review:
    """The review list a run wrote: ``rows`` worst first (dicts with :data:`REVIEW_COLUMNS` and ``id``), the
    file's URI, its CSV text, and how many labelled images were scored (``total``, >= ``len(rows)``)."""

    uri: str
    rows: list[dict[str, Any]]
    total: int
    text: str

    def line(self) -> str:
        if not self.rows:
            return f"sodkd label: review list {self.uri}: no labelled images"
        w = self.rows[0]
        basis = "disagreement" if np.isfinite(w["disagreement"]) else "1 - conf_mean"
        return (f"sodkd label: review list {self.uri} ({len(self.rows)} of {self.total} labelled images, worst "
                f"first): worst {w['key']} (score {w['score']:.4f} = {basis})")


def review_scores(conf_mean: np.ndarray, disagreement: np.ndarray) -> np.ndarray:
    """Per image: ``disagreement`` where it is finite, else ``1 - conf_mean`` (higher = review first)."""
    conf_mean = np.asarray(conf_mean, np.float64)
    disagreement = np.asarray(disagreement, np.float64)
    return np.where(np.isfinite(disagreement), disagreement, 1.0 - conf_mean)


def _fmt(v: float) -> str:
    return f"{v:.6g}" if np.isfinite(v) else ""


def write_review(cfg: LabelConfig) -> Review | None:
    """Score every labelled image of ``cfg.output`` and write ``OUTPUT/review.csv``, worst first.

    Reads only ``id, key, conf_mean, disagreement`` of the label shards (all runs'). Rows: the worst
    ``cfg.review.top`` (every image when None); scores as :func:`review_scores`; ties by key; an image whose
    score is NaN comes last. Returns None (and writes nothing) when the output holds no label shards.
    """
    import csv

    fs, root = storage.get_filesystem(cfg.output, cfg.s3)
    if not L.shard_paths(fs, root, S.LABELS_DIR):
        return None
    import pyarrow.compute as pc

    t = L.read_label_table(fs, root, [S.KEY, S.CONF_MEAN, S.DISAGREEMENT])
    conf = t.column(S.CONF_MEAN).to_numpy(zero_copy_only=False).astype(np.float64)
    dis = t.column(S.DISAGREEMENT).to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
    score = review_scores(conf, dis)
    ranked = pa.table({"score": np.nan_to_num(score, nan=-np.inf), S.KEY: t.column(S.KEY)})  # NaN last
    order = pc.sort_indices(ranked, sort_keys=[("score", "descending"), (S.KEY, "ascending")]).to_numpy()
    if cfg.review.top is not None:
        order = order[: cfg.review.top]
    picked = t.take(pa.array(order, pa.int64())).select([S.ID, S.KEY]).to_pylist()
    rows = [{"rank": r + 1, "key": row[S.KEY], "score": float(score[i]), "conf_mean": float(conf[i]),
             "disagreement": float(dis[i]), "id": row[S.ID]} for r, (i, row) in enumerate(zip(order, picked))]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(REVIEW_COLUMNS)
    for row in rows:
        w.writerow([row["rank"], row["key"], _fmt(row["score"]), _fmt(row["conf_mean"]),
                    _fmt(row["disagreement"])])
    text = buf.getvalue()
    path = storage.join(root, S.REVIEW_FILE)
    L.write_file_atomic(fs, path, text.encode("utf-8"))
    return Review(storage.to_uri(fs, path), rows, t.num_rows, text)


def _steady_rate(summary: LabelSummary, finished: list[tuple[float, int]], run_start: float) -> None:
    """Steady-state rate from the teacher batches' end times: images finished after the first batch, over
    the time from the end of the first batch to the end of the last (needs >= 2 batches)."""
    if not finished:
        return
    summary.startup_s = max(0.0, finished[0][0] - run_start)
    summary.first_batch_at, summary.last_batch_at = finished[0][0], finished[-1][0]
    if len(finished) >= 2 and finished[-1][0] > finished[0][0]:
        summary.steady_images_per_s = sum(n for _, n in finished[1:]) / (finished[-1][0] - finished[0][0])


def run_labelling(cfg: LabelConfig, samples: int = 6) -> LabelSummary:
    """Run the labelling job described by ``cfg``; print a summary line; record an MLflow run.

    The MLflow run (when ``cfg.tracking.enabled``) gets the flattened config as params, the teacher id and
    weights hash as tags, the counts and images/s as metrics, ``samples/labels.png`` (sample images
    beside their labels), and the review list: ``review/review.csv`` and ``review/worst.png`` (the worst
    ``cfg.review.sheet`` images beside their labels). A second stderr line names the review file and the
    worst key.

    Raises :class:`DeferredInputs` (its ``summary`` is the run's) after all of that when inputs were deferred
    after transient storage errors: the run is incomplete, the next one retries them.
    """
    summary = LabelSummary()
    if not cfg.tracking.enabled:
        review = _label(cfg, summary)
        return _finish(summary, review)
    from cluster import tracking
    # the job is its output: an earlier run of it still RUNNING was killed (it would have ended its run)
    job_tags = {"sodkd.job": "label", "sodkd.output": tracking.sanitize_params({"o": cfg.output})["o"]}
    stale = tracking.end_stale_runs(cfg.tracking, job_tags)
    if stale:
        log.info("marked %d earlier run(s) of this job KILLED (they ended without closing): %s", len(stale),
                 ", ".join(stale))
    with tracking.start_run(cfg.tracking, run_name=cfg.tracking.run_name or "label", tags=job_tags) as run:
        summary.run_id = run.info.run_id
        tracking.log_params(cfg)
        review = _label(cfg, summary)
        import mlflow
        mlflow.set_tags({"teacher": summary.teacher, "weights_hash": summary.weights_hash,
                         "layout": summary.layout})
        tracking.log_metrics({
            "label/total": summary.total, "label/labelled": summary.labelled,
            "label/rejected": summary.rejected, "label/skipped_done": summary.skipped_done,
            "label/deferred": summary.deferred, "label/deferred_transient": summary.deferred_transient,
            "label/retried": summary.retried, "label/ignored": sum(summary.ignored.values()),
            "label/wall_s": summary.wall_s,
            "label/images_per_s": summary.images_per_s,
            "label/images_per_s_steady": summary.steady_images_per_s, "label/startup_s": summary.startup_s,
            **{f"label/rejected.{k}": v for k, v in summary.reasons.items()},
        })
        if samples > 0:
            fig = sample_figure(cfg, samples)
            if fig is not None:
                tracking.log_figure(fig, "samples/labels.png")
        if review is not None:
            mlflow.log_text(review.text, f"review/{S.REVIEW_FILE}")
            if cfg.review.sheet > 0 and review.rows:
                fig = review_figure(cfg, review.rows[: cfg.review.sheet])
                if fig is not None:
                    tracking.log_figure(fig, "review/worst.png")
    return _finish(summary, review)


def _finish(summary: LabelSummary, review: Review | None) -> LabelSummary:
    print(summary.line(), file=sys.stderr, flush=True)
    if review is not None:
        print(review.line(), file=sys.stderr, flush=True)
    for key, detail in summary.deferred_examples:
        log.warning("deferred %s: %s", key, detail)
    if summary.deferred_transient:
        raise DeferredInputs(summary)
    return summary


def sample_figure(cfg: LabelConfig, n: int = 6):
    """A matplotlib figure: ``n`` labelled images (from the first label shard) beside their soft labels.

    Returns None when the output holds no labels yet.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    out_fs, out_root = storage.get_filesystem(cfg.output, cfg.s3)
    shards = L.shard_paths(out_fs, out_root, S.LABELS_DIR)
    if not shards:
        return None
    rows = pq.read_table(shards[0], filesystem=out_fs).slice(0, n).to_pylist()
    in_fs, in_root = storage.get_filesystem(cfg.input, cfg.s3)
    fig, axes = plt.subplots(len(rows), 2, figsize=(5, 2.5 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        try:
            image = decode_image(storage.read_bytes(in_fs, storage.join(in_root, row[S.KEY]), cfg.s3), max_side=512)
        except (OSError, ImageDecodeError):
            image = np.zeros((8, 8, 3), np.uint8)
        label = resize((L.decode_label(row) * 255).astype(np.uint8), image.shape[:2])
        ax_row[0].imshow(image)
        ax_row[0].set_title(row[S.KEY][-40:], fontsize=7)
        ax_row[1].imshow(label, cmap="gray", vmin=0, vmax=255)
        ax_row[1].set_title(f"conf {row[S.CONF_MEAN]:.2f}  fg {row[S.FG_FRAC]:.2f}", fontsize=7)
        for ax in ax_row:
            ax.axis("off")
    fig.suptitle(f"{rows[0][S.TEACHER]} ({rows[0][S.WEIGHTS_HASH]})", fontsize=8)
    fig.tight_layout()
    return fig


def _read_inputs(cfg: LabelConfig, keys: Sequence[str], max_side: int) -> list[np.ndarray]:
    """The source images of ``keys`` for a figure (video-file frames decoded); black where unreadable."""
    from cluster.video_data import read_video_frames
    fs, root = storage.get_filesystem(cfg.input, cfg.s3)
    try:
        frames = read_video_frames(fs, root, keys)
    except Exception:  # noqa: BLE001 - a figure never fails the job
        frames = {}
    out = []
    for key in keys:
        image = frames.get(key)
        if image is None:
            try:
                image = decode_image(storage.read_bytes(fs, storage.join(root, key), cfg.s3), max_side=max_side)
            except (OSError, ImageDecodeError):
                image = None
        out.append(image if isinstance(image, np.ndarray) else np.zeros((8, 8, 3), np.uint8))
    return out


def review_figure(cfg: LabelConfig, rows: Sequence[Mapping[str, Any]], per_row: int = 3):
    """A matplotlib contact sheet of review rows (:class:`Review` ``rows``, worst first): each image beside its
    soft label, titled with rank, key and score; ``per_row`` pairs a row. None when no row's label is found."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fs, root = storage.get_filesystem(cfg.output, cfg.s3)
    found = L.read_label_rows(fs, root, [r["id"] for r in rows], [S.LABEL_PNG, S.LABEL_H, S.LABEL_W])
    labels = dict(zip(found.column(S.ID).to_pylist(), found.to_pylist()))
    rows = [r for r in rows if r["id"] in labels]
    if not rows:
        return None
    images = _read_inputs(cfg, [r["key"] for r in rows], max_side=256)
    n_rows = -(-len(rows) // per_row)
    cols = 2 * min(per_row, len(rows))
    fig, axes = plt.subplots(n_rows, cols, figsize=(1.9 * cols, 2.2 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (row, image) in enumerate(zip(rows, images)):
        ax_img, ax_lab = axes[j // per_row, 2 * (j % per_row)], axes[j // per_row, 2 * (j % per_row) + 1]
        label = resize(np.round(L.decode_label(labels[row["id"]]) * 255).astype(np.uint8), image.shape[:2])
        ax_img.imshow(image)
        ax_img.set_title(f"#{row['rank']} {row['key'][-28:]}", fontsize=6)
        ax_lab.imshow(label, cmap="gray", vmin=0, vmax=255)
        dis = row["disagreement"]
        ax_lab.set_title(f"score {row['score']:.3f}" + (" (dis)" if np.isfinite(dis) else " (1-conf)"),
                         fontsize=6)
    where = cfg.output if len(cfg.output) <= 70 else "..." + cfg.output[-67:]
    fig.suptitle(f"review: worst {len(rows)} labels of {where}", fontsize=8)
    fig.tight_layout()
    return fig
