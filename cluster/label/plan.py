"""What a labelling run labels: the input listed (streamed a page at a time for still images, whole for video
layouts) and every entry whose id is already in a label or reject shard of the output dropped, up to
``limit``. The driver's whole plan fits in memory bounded by packed ids (8 bytes per listed key and per done
id) plus ``_INLINE_ROWS`` items; past that, the inputs to label wait in Ray's object store."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from cluster import catalog, storage
from cluster import labels as L
from cluster.label.config import LabelConfig
from kd import schema as S

log = logging.getLogger(__name__)

__all__ = ["Manifest", "Inputs", "open_inputs", "build_manifest", "Chunk", "TodoBlocks", "RunPlan", "plan_run"]

_ID_CHUNK = 65536     # listed entries planned at a time (their Item objects and id strings exist for one chunk)
_INLINE_ROWS = 65536  # inputs to label held by the driver; past this they go to Ray's object store
_BLOCK_ROWS = 1024    # rows per object-store block of a large job (small jobs: decode.batch_size rows a block)


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
