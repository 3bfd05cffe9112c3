"""What a person looks at after a labelling run: the review list (``OUTPUT/review.csv``, the labelled images
worst first; the score is described in :mod:`cluster.label`) and the figures the MLflow run gets (sample
labels, the contact sheet of the worst)."""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from cluster import labels as L
from cluster import storage
from cluster.label.config import LabelConfig
from kd import schema as S
from kd.imageio import ImageDecodeError, decode_image, resize

__all__ = ["REVIEW_COLUMNS", "Review", "review_scores", "write_review", "sample_figure", "review_figure"]

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
