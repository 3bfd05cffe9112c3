"""What a labelling run is told (``sodkd label``'s config): input, output, teachers, and how the work is spread.

The sections are frozen dataclasses, loaded strictly from YAML + dotted overrides (:mod:`kd.config`); the pool
of teacher actors is :class:`cluster.raypool.PoolConfig`, the retries of storage errors
:class:`cluster.storage.RetryConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from cluster.foundation import FoundationConfig
from cluster.raypool import PoolConfig, finite_resources
from cluster.storage import RetryConfig, S3Config
from cluster.teachers.spec import EnsembleConfig
from cluster.tracking import TrackingConfig
from kd.config import ConfigError, load_config

__all__ = ["FOUNDATION", "PoolConfig", "DecodeConfig", "WriteConfig", "ReviewConfig", "RetryConfig", "LabelConfig",
           "load_label_config"]

FOUNDATION = "foundation"  # teacher spec of the staged BLIP -> GroundingDINO -> SAM teacher


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Read + decode + resize: where it runs, Ray CPUs per task and images per task batch.

    ``placement``: ``tasks`` runs it in separate CPU tasks that overlap the teacher (what a GPU pool needs:
    the GPU never waits for JPEG decoding); ``actor`` runs it inside the teacher actors, before each forward
    pass (no hand-off of decoded images through the object store, and no decode tasks competing with the
    forward pass's threads for the same cores); ``auto`` = ``tasks`` for GPU pools, ``actor`` for CPU pools.
    benchmarks/RESULTS.md (section labelling) compares the two on a small machine.
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
        finite_resources("decode", num_cpus=self.num_cpus)
        if self.num_cpus <= 0 or self.batch_size < 1:
            raise ConfigError(f"decode: need num_cpus > 0 and batch_size >= 1, got {self.num_cpus}, {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class WriteConfig:
    """Shard-writing tasks: Ray CPUs per task and rows per shard (the unit a kill can lose)."""

    num_cpus: float = 0.25
    shard_rows: int = 256

    def __post_init__(self) -> None:
        finite_resources("write", num_cpus=self.num_cpus)
        if self.num_cpus <= 0 or self.shard_rows < 1:
            raise ConfigError(f"write: need num_cpus > 0 and shard_rows >= 1, got {self.num_cpus}, {self.shard_rows}")


@dataclasses.dataclass(frozen=True)
class ReviewConfig:
    """The review list written at the end of each run (see :mod:`cluster.label` for the score).

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
        teachers: teacher specs (see :mod:`cluster.teachers`); several make an ensemble (mean probability, or as
            ``ensemble`` says).
        ensemble: how several teachers are combined (:class:`cluster.teachers.EnsembleConfig`: ``combine`` mean or
            logit, ``weights`` one per spec); a second-round teacher is ``teachers: [TEACHER, STUDENT]`` with
            ``ensemble: {combine: logit, weights: [0.8, 0.2]}``.
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
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)
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
        self.ensemble.check_members(len(self.teachers))
        for name in ("label_size", "teacher_size", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {v}")


def load_label_config(source: Any = None, overrides: Any = None) -> LabelConfig:
    """YAML path or mapping + dotted overrides -> :class:`LabelConfig` (strict, see :mod:`kd.config`)."""
    return load_config(LabelConfig, source, overrides)
