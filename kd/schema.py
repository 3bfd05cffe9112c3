"""Names shared across sodkd: columns of the label shards, dataset keys, metric keys, stable ids.

Defined once here so the labelling job, the trainer and the reports agree; labels are joined to images by
``ID`` (a hash of the source key), never by row order.
"""

from __future__ import annotations

import hashlib

# --- manifest / image rows (Ray Data batches) ---
ID = "id"                  # stable id: sha1 of the source key, 16 hex chars
KEY = "key"                # the source key (path inside the bucket or directory, without scheme)
IMAGE_BYTES = "bytes"      # raw encoded bytes as read from storage
IMAGE = "image"            # decoded uint8 HxWx3 (RGB) array, resized for the teacher
ORIG_H = "orig_h"          # original height of the image, pixels
ORIG_W = "orig_w"          # original width of the image, pixels
SEQUENCE = "sequence"      # video: the sequence (folder or file) a frame belongs to; "" for still images
FRAME = "frame"            # video: the frame index inside its sequence; -1 for still images

# --- label shards (Parquet) ---
TEACHER = "teacher"        # teacher spec id, e.g. "scfnet_r50" or "ensemble(a,b)"
WEIGHTS_HASH = "weights_hash"  # sha256 (16 hex) of the teacher weights file(s)
LABEL_PNG = "label_png"    # uint8 PNG bytes of the soft saliency map (0..255 = probability)
LABEL_H = "label_h"
LABEL_W = "label_w"
CONF_MEAN = "conf_mean"    # mean over pixels of |2p-1|: 1 = every pixel certain, 0 = all at 0.5
CONF_FRAC = "conf_frac"    # fraction of pixels with p < 0.1 or p > 0.9
FG_FRAC = "fg_frac"        # fraction of pixels with p > 0.5
DISAGREEMENT = "disagreement"  # mean over pixels of mean over views |v - p| (ensemble members x flips); NaN for
                               # one view; absent from shards written before it existed (readers fill NaN)
TTA = "tta"                # test-time augmentation used ("none" or "hflip")
LABEL = "label"            # uint8 HxW soft map before PNG encoding (in-flight column of the labelling job)
LABELLED_AT = "labelled_at"  # epoch seconds when the teacher finished the row's batch (in flight: rates)
LABELS_DIR = "labels"      # OUTPUT/labels/*.parquet: one row per labelled image
REVIEW_FILE = "review.csv"  # OUTPUT/review.csv: labelled images worst first (cluster.label.review.write_review)
REJECTS_DIR = "rejects"    # OUTPUT/rejects/*.parquet: one row per image that could not be labelled

# --- rejects table ---
REASON = "reason"          # short machine-readable reason ("truncated", "not_an_image", ...); "" while in flight = ok
DEFERRED = "deferred"      # in-flight REASON of a row that met only transient storage errors: never written as a
                           # reject (not done), the next run retries it
RETRIES = "retries"        # in flight: transient read errors retried for the row (the job's summary counts them)
DETAIL = "detail"          # the human-readable error message behind the reason

# --- foundation-model labels (issue 7) ---
CONF_PNG = "conf_png"      # uint8 PNG of the per-pixel confidence map
CAPTION = "caption"
BOXES = "boxes"            # flat list of x0,y0,x1,y1 in original-image pixels
BOX_SCORES = "box_scores"
MASK_SCORES = "mask_scores"  # per box: box score * SAM predicted IoU * stability (the object quality q_k)
CONF = "conf"              # uint8 HxW confidence map before PNG encoding (in-flight column)

# --- metric keys (sodkd eval / MLflow) ---
METRIC_KEYS = ("mae", "sm", "wfm", "em_adp", "em_mean", "em_max", "fm_adp", "fm_mean", "fm_max")
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
VAL_MAE = "val/mae"
VAL_SM = "val/sm"
VAL_MAXF = "val/maxf"
VAL_EM = "val/em"

# --- training rows (Ray Data batches fed to the trainer) ---
TARGET = "target"          # uint8 HxW training target at the image's size: a mask, or teacher probability x 255
SOFT = "soft"              # bool: True when TARGET is a teacher's soft label (distillation loss), False for a mask

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")  # animated: the first frame
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def stable_id(key: str) -> str:
    """Stable 16-hex id of a source key (sha1), the join key between images and their labels."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
