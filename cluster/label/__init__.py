"""Teacher labelling at scale (``sodkd label``): images in a folder or bucket -> soft-label Parquet shards, with
Ray Data.

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

The modules, in the order the data goes through them: :mod:`~cluster.label.config` (what a run is told),
:mod:`~cluster.label.plan` (the listing and what is not done yet), :mod:`~cluster.label.stages` (the Ray Data
stages: read + decode, the teacher, the shard writer), :mod:`~cluster.label.job` (the pipeline, the run, its
summary and MLflow run) and :mod:`~cluster.label.review` (the review list and the figures).
"""

from cluster.label.config import (FOUNDATION, DecodeConfig, LabelConfig, PoolConfig, RetryConfig, ReviewConfig,
                                  WriteConfig, load_label_config)
from cluster.label.job import DeferredInputs, LabelSummary, run_labelling
from cluster.label.plan import Manifest, build_manifest, plan_run
from cluster.label.review import REVIEW_COLUMNS, Review, review_figure, review_scores, sample_figure, write_review
from cluster.label.stages import TeacherLabeler, load_images, write_label_shards

__all__ = ["PoolConfig", "DecodeConfig", "WriteConfig", "ReviewConfig", "RetryConfig", "LabelConfig",
           "load_label_config", "Manifest", "build_manifest", "load_images", "TeacherLabeler", "write_label_shards",
           "LabelSummary", "DeferredInputs", "Review", "review_scores", "write_review", "run_labelling",
           "sample_figure", "review_figure", "FOUNDATION", "plan_run", "REVIEW_COLUMNS"]
