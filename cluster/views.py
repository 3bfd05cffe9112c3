"""Synthetic views of an unlabeled folder or bucket (``sodkd views``): more images for a teacher to label.

:func:`make_views` lists the images under ``input`` (local folder or ``s3://`` prefix, as ``sodkd label`` does),
draws ``count`` views with :func:`kd.views.synthesize` and writes them as JPEG under ``output`` with
``sources.csv`` (view, kind, source keys). Paste views need the objects of the pool: given ``labels`` (what
``sodkd label`` wrote for ``input``), an image's soft label is its object map when it shows one clear object
(salient share in ``[min_fg, max_fg]``, mean confidence at least ``min_conf``). Without labels only zoom views are
made.

:func:`run_views` (what ``sodkd views`` calls) does the same inside an MLflow run: the settings as params, the
counts and rate as metrics, ``sources.csv`` / ``rejects.csv`` and a contact sheet of the first views
(``views/sheet.png``, each titled with its kind and source keys) as artifacts.

The draw is seeded: a rerun with the same input, labels, seed and settings makes the same views and skips the
files already written (a killed run resumes). An image that cannot be read or decoded is skipped, never drawn
again, and listed in ``rejects.csv`` with the reason.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections import Counter
from typing import Callable

import numpy as np
from PIL import Image

from cluster import storage
from cluster.catalog import image_folder
from cluster.labels import decode_label, read_labels, write_file_atomic
from cluster.tracking import TrackingConfig
from kd import schema as S
from kd.imageio import ImageDecodeError, decode_image
from kd.views import ViewConfig, synthesize

log = logging.getLogger(__name__)

__all__ = ["ObjectFilter", "ViewsConfig", "ViewsSummary", "object_maps", "make_views", "run_views", "views_figure"]


@dataclasses.dataclass(frozen=True)
class ObjectFilter:
    """Which labelled images lend their object to paste views (the label's statistics, as ``sodkd label``
    stores them: ``fg_frac`` = share above 0.5, ``conf_mean`` = mean of ``|2p - 1|``)."""

    min_fg: float = 0.03
    max_fg: float = 0.5
    min_conf: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.min_fg <= self.max_fg <= 1.0:
            raise ValueError(f"min_fg, max_fg: need 0 <= min_fg <= max_fg <= 1, got {self.min_fg}, {self.max_fg}")
        if not 0.0 <= self.min_conf <= 1.0:
            raise ValueError(f"min_conf: need a value in [0, 1], got {self.min_conf}")


@dataclasses.dataclass(frozen=True)
class ViewsConfig:
    """``sodkd views`` settings (dotted overrides: ``view.paste_p=0.3``, ``objects.min_conf=0.8``, ...).

    Attributes:
        sheet: views on the MLflow contact sheet ``views/sheet.png`` (the first ones drawn; 0 = no sheet).
        tracking: where :func:`run_views` records its MLflow run (``tracking.enabled=false``: none).
    """

    view: ViewConfig = dataclasses.field(default_factory=ViewConfig)
    objects: ObjectFilter = dataclasses.field(default_factory=ObjectFilter)
    quality: int = 92
    progress_every: int = 500
    sheet: int = 24
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(experiment="sodkd-views"))

    def __post_init__(self):
        if self.sheet < 0:
            raise ValueError(f"sheet: must be >= 0, got {self.sheet}")


@dataclasses.dataclass
class ViewsSummary:
    output: str
    written: int = 0
    existing: int = 0
    kinds: Counter = dataclasses.field(default_factory=Counter)
    pool: int = 0
    objects: int = 0
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    samples: list[tuple[str, str, np.ndarray]] = dataclasses.field(default_factory=list)   # (name, sources, view)
    sources_csv: bytes = b""
    rejects_csv: bytes = b""


def object_maps(labels_uri: str, keys: set[str], objects: ObjectFilter,
                s3: storage.S3Config | None = None) -> dict[str, bytes]:
    """key -> label PNG of the images among ``keys`` whose label under ``labels_uri`` shows one clear object."""
    table = read_labels(labels_uri, s3, columns=[S.KEY, S.LABEL_PNG, S.FG_FRAC, S.CONF_MEAN])
    if table.num_rows == 0:
        raise FileNotFoundError(f"{labels_uri}: no label shards (write them with sodkd label)")
    return {r[S.KEY]: r[S.LABEL_PNG] for r in table.to_pylist()
            if r[S.KEY] in keys and objects.min_fg <= r[S.FG_FRAC] <= objects.max_fg
            and r[S.CONF_MEAN] >= objects.min_conf}


def make_views(input_uri: str, output_uri: str, count: int, labels_uri: str | None = None, seed: int = 0,
               cfg: ViewsConfig = ViewsConfig(), s3: storage.S3Config | None = None,
               progress: Callable[[str], None] = print) -> ViewsSummary:
    """Write ``count`` views of the images under ``input_uri`` to ``output_uri`` (see the module docstring)."""
    if count < 1:
        raise ValueError(f"count: need at least 1 view, got {count}")
    t0 = time.perf_counter()
    cat = image_folder(input_uri, s3)
    keys = [it.key for it in cat.items]
    summary = ViewsSummary(output=output_uri, pool=len(keys))
    for it, reason, detail in cat.rejected:
        summary.rejected[it.key] = f"{reason}: {detail}" if detail else reason
    maps = object_maps(labels_uri, set(keys), cfg.objects, s3) if labels_uri else None
    summary.objects = len(maps) if maps is not None else 0
    if maps is not None and not maps:
        raise ValueError(f"{labels_uri}: no label of an image under {input_uri} shows one clear object "
                         f"(objects.min_fg={cfg.objects.min_fg}, max_fg={cfg.objects.max_fg}, "
                         f"min_conf={cfg.objects.min_conf}): are these the labels of this input?")
    progress(f"views: {len(keys)} images under {input_uri}"
             + (f", {summary.objects} with one clear object in their label" if maps is not None else
                " (no --labels: zoom views only)"))

    def load(i: int) -> np.ndarray | None:
        if keys[i] in summary.rejected:
            return None
        try:
            return decode_image(storage.read_bytes(cat.fs, cat.items[i].path, s3))
        except (ImageDecodeError, OSError) as e:
            summary.rejected[keys[i]] = f"{type(e).__name__}: {e}"
            log.warning("views: skipping %s (%s)", keys[i], e)
            return None

    def load_alpha(i: int) -> np.ndarray | None:
        png = maps.get(keys[i])
        return None if png is None else decode_label(png)

    fs, out = storage.get_filesystem(output_uri, s3)
    done = set(storage.list_files(fs, out, [".jpg"], recursive=False)) if storage.is_dir(fs, out) else set()
    rows = []
    for k, (kind, src, img) in enumerate(synthesize(len(keys), count, load, load_alpha if maps else None,
                                                    seed=seed, cfg=cfg.view)):
        name = f"{kind}-{k:05d}.jpg"
        path = storage.join(out, name)
        if path in done:
            summary.existing += 1
        else:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=cfg.quality)
            write_file_atomic(fs, path, buf.getvalue())     # whole or absent: a killed run resumes cleanly
            summary.written += 1
        summary.kinds[kind] += 1
        rows.append([name, kind, " ".join(keys[i] for i in src)])
        if len(summary.samples) < cfg.sheet:
            summary.samples.append((name, rows[-1][2], img))
        if cfg.progress_every and (k + 1) % cfg.progress_every == 0:
            progress(f"views: {k + 1}/{count} ({time.perf_counter() - t0:.0f} s)")
    summary.sources_csv = _csv([["view", "kind", "sources"], *rows])
    write_file_atomic(fs, storage.join(out, "sources.csv"), summary.sources_csv)
    if summary.rejected:
        summary.rejects_csv = _csv([["key", "reason"], *sorted(summary.rejected.items())])
        write_file_atomic(fs, storage.join(out, "rejects.csv"), summary.rejects_csv)
    summary.wall_s = time.perf_counter() - t0
    return summary


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def run_views(input_uri: str, output_uri: str, count: int, labels_uri: str | None = None, seed: int = 0,
              cfg: ViewsConfig = ViewsConfig(), s3: storage.S3Config | None = None,
              progress: Callable[[str], None] = print) -> tuple[ViewsSummary, str | None]:
    """:func:`make_views` recorded as an MLflow run (see the module docstring); returns the summary and the run
    id (None with ``cfg.tracking.enabled`` false). The run is FAILED when the job raises."""
    if not cfg.tracking.enabled:
        return make_views(input_uri, output_uri, count, labels_uri, seed, cfg, s3, progress), None
    import mlflow

    from cluster import tracking
    tags = {"sodkd.job": "views", "sodkd.output": tracking.sanitize_params({"o": output_uri})["o"]}
    with tracking.start_run(cfg.tracking, run_name=cfg.tracking.run_name or "views", tags=tags) as run:
        tracking.log_params(cfg)
        tracking.log_params({"input": input_uri, "output": output_uri, "labels": labels_uri, "count": count,
                             "seed": seed}, prefix="job")
        s = make_views(input_uri, output_uri, count, labels_uri, seed, cfg, s3, progress)
        tracking.log_metrics({"views/written": s.written, "views/existing": s.existing, "views/pool": s.pool,
                              "views/objects": s.objects, "views/rejected": len(s.rejected),
                              "views/wall_s": s.wall_s, "views/written_per_s": s.written / max(s.wall_s, 1e-9),
                              **{f"views/kind.{k}": n for k, n in s.kinds.items()}})
        mlflow.log_text(s.sources_csv.decode(), "views/sources.csv")
        if s.rejects_csv:
            mlflow.log_text(s.rejects_csv.decode(), "views/rejects.csv")
        if s.samples:
            tracking.log_figure(views_figure(s.samples, output_uri), "views/sheet.png")
        return s, run.info.run_id


def views_figure(samples: list[tuple[str, str, np.ndarray]], where: str, per_row: int = 6):
    """A matplotlib contact sheet of views (name, source keys, RGB array), each titled with its name and sources."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_rows = -(-len(samples) // per_row)
    cols = min(per_row, len(samples))
    fig, axes = plt.subplots(n_rows, cols, figsize=(1.9 * cols, 2.1 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (name, sources, img) in enumerate(samples):
        ax = axes[j // per_row, j % per_row]
        ax.imshow(img)
        ax.set_title(f"{name[:-4]}\n{' + '.join(k[-18:] for k in sources.split())}", fontsize=5)
    where = where if len(where) <= 70 else "..." + where[-67:]
    fig.suptitle(f"views: the first {len(samples)} of {where}", fontsize=8)
    fig.tight_layout()
    return fig
