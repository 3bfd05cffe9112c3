"""The labelling job: the Ray Data pipeline over what the plan left to label, the run (listed rejects recorded,
the pipeline consumed, the review list rewritten), its summary line and its MLflow run."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from cluster import labels as L
from cluster import storage
from cluster.label.config import LabelConfig
from cluster.label.plan import TodoBlocks, plan_run
from cluster.label.review import Review, review_figure, sample_figure, write_review
from cluster.raypool import ensure_ray
from cluster.label.stages import DEFERRED_EXAMPLES, DETAIL_CHARS, TeacherLabeler, load_images, write_label_shards
from kd import schema as S

log = logging.getLogger(__name__)

__all__ = ["LabelSummary", "build_dataset", "DeferredInputs", "run_labelling"]


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


def _teacher_info(cfg: LabelConfig) -> tuple[str, str, int]:
    """Load the teacher once on the driver (CPU, fp32): fails fast on a bad spec; gives id, hash, size.

    The foundation teacher's models load in its stage actors; its hash is per row (see cluster.foundation).
    """
    if cfg.is_foundation:
        from cluster.foundation import teacher_id
        return teacher_id(cfg.foundation), "", cfg.foundation.image_size
    from cluster.teachers import build_teacher
    t = build_teacher(list(cfg.teachers), tta=cfg.tta, s3=cfg.s3, device="cpu", precision="fp32",
                      input_size=cfg.teacher_size, ensemble=cfg.ensemble)
    return t.id, t.weights_hash, t.input_size


def _no_extra_remote_args() -> dict[str, Any]:
    return {}


def build_dataset(cfg: LabelConfig, blocks: TodoBlocks, teacher_size: int):
    """The Ray Data pipeline over the inputs of ``blocks`` (lazy: nothing runs until it is consumed)."""
    ensure_ray(cfg.ray_address)
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
        from cluster.label.foundation import foundation_stages
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
                               "backend": pool.backend, "ensemble": cfg.ensemble,
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


def _label(cfg: LabelConfig, summary: LabelSummary) -> Review | None:
    t_start, run_start = time.perf_counter(), time.time()
    out_fs, out_root = storage.get_filesystem(cfg.output, cfg.s3)

    def put(table: pa.Table):   # a large job's blocks wait in Ray's object store, not in the driver
        import ray
        ensure_ray(cfg.ray_address)
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
                 S.DETAIL: np.array([d[:DETAIL_CHARS] for _, _, d in rejected_now], dtype=object)}
        out = write_label_shards(batch, output_uri=cfg.output, s3=cfg.s3, retry=cfg.retry)
        _count(summary, reasons, out)
    summary.teacher, summary.weights_hash, teacher_size = _teacher_info(cfg)
    log.info("labelling %d images (%d skipped as done) with %s at %d px", plan.blocks.rows, summary.skipped_done,
             summary.teacher, teacher_size)
    if plan.blocks.rows:
        import ray
        ensure_ray(cfg.ray_address)
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
        room = DEFERRED_EXAMPLES - len(summary.deferred_examples)
        summary.deferred_examples += [tuple(x) for x in json.loads(d)[:max(room, 0)]]


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
