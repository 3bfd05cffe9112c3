"""The data catalog: the folder layouts sodkd reads, from a local path or an object-store URI.

Layouts (as in ``../shared/data``):
- **unlabeled images**: any tree of image files (``unlabeled/imagenet-1k/*.jpg``);
- **paired images/masks**: ``ROOT/images/X.jpg`` + ``ROOT/masks/X.png``, paired by file stem;
- **video sequences**: ``ROOT/<sequence>/images/00000.jpg`` (optionally ``ROOT/<sequence>/masks/``), or
  ``ROOT/<sequence>/*.jpg``, or video files ``ROOT/<name>.mp4`` (decoded later, with PyAV).

Every item has a ``key``: its path relative to ROOT, with ``/`` separators. Keys (and so ids, the hash of the
key) do not change when a bucket is copied to a local directory, so labels made from one join the other.

Keys are data: a key is the listed path with ``ROOT/`` cut off, nothing else -- never normalised, so
``a/../b.jpg``, ``a//b.jpg``, ``./c.jpg``, backslashes, spaces and any unicode stay as the bucket holds them,
and ``ROOT/ + key`` (:func:`cluster.storage.join`) is the path read. :func:`image_folder` and
:func:`video_folders` account for everything under ROOT (:attr:`Catalog.rejected`, :attr:`Catalog.ignored`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import posixpath
from collections import defaultdict
from typing import Iterator

import pyarrow.fs as pafs

from cluster import storage
from cluster.storage import RetryConfig, S3Config
from kd.schema import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, stable_id


@dataclasses.dataclass(frozen=True, slots=True)   # slots: a listing holds one per key (72 B, not ~120)
class Item:
    key: str                 # path relative to the catalog root
    path: str                # path inside the filesystem (what fs.open_input_stream takes)
    mask_path: str | None = None
    sequence: str = ""       # video sequence name; "" for still images
    frame: int = -1          # frame index in its sequence; -1 for still images

    @property
    def id(self) -> str:
        return stable_id(self.key)


@dataclasses.dataclass
class Catalog:
    """``items`` to read; for :func:`image_folder` and :func:`video_folders` also what else ROOT holds:
    ``rejected`` -- inputs that cannot be read as files, ``(item, reason, detail)`` with reason
    ``broken_link``, ``special_file`` (FIFO, socket, device), ``linked_dir`` (a symlink to a folder: not
    followed) or ``unreadable_dir`` -- and ``ignored``, counts of the objects that are not inputs of the layout
    by kind: ``.ext`` (a file type that is not an image), ``hidden`` (a name starting with ``.``),
    ``folder_marker`` (an S3 key ending in ``/``), ``mask`` and ``outside_sequence`` (video layout)."""
    fs: pafs.FileSystem
    root: str
    items: list[Item]
    rejected: list[tuple[Item, str, str]] = dataclasses.field(default_factory=list)
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def uri(self) -> str:
        return storage.to_uri(self.fs, self.root)

    def __len__(self) -> int:
        return len(self.items)

    def sequences(self) -> dict[str, list[Item]]:
        seqs: dict[str, list[Item]] = defaultdict(list)
        for it in self.items:
            seqs[it.sequence].append(it)
        return {k: sorted(v, key=lambda i: i.frame) for k, v in sorted(seqs.items())}


def _rel(root: str, path: str) -> str:
    """The key of ``path`` under ``root``: the path with ``root/`` cut off, byte for byte (no normalising)."""
    base = root.rstrip("/") + "/"
    if not path.startswith(base):
        raise ValueError(f"{path!r} is not under {root!r}")
    return path[len(base):]


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    key: str
    path: str
    kind: str
    detail: str


def _entries(uri: str, s3: S3Config | None, retry: RetryConfig | None
             ) -> tuple[pafs.FileSystem, str, Iterator[_Entry]]:
    """Everything under ``uri`` with its key, streamed in path order (:func:`cluster.storage.iter_walk`); a
    ``uri`` that is one file gives its folder as the root and the file name as the key. A missing root raises
    here, before anything is returned."""
    fs, root = storage.get_filesystem(uri, s3)
    listed = storage.iter_walk(fs, root, s3, retry)
    first = next(listed, None)
    if first is not None and first.path == root:
        root = posixpath.dirname(root)

    def entries() -> Iterator[_Entry]:
        for e in itertools.chain([first] if first is not None else [], listed):
            yield _Entry(_rel(root, e.path), e.path, e.kind, e.detail)
    return fs, root, entries()


def _listing(uri: str, s3: S3Config | None, retry: RetryConfig | None) -> tuple[pafs.FileSystem, str, list[_Entry]]:
    """:func:`_entries` as a list, sorted by path."""
    fs, root, entries = _entries(uri, s3, retry)
    out = list(entries)
    out.sort(key=lambda e: e.path)
    return fs, root, out


def _not_input(e: _Entry, extensions: tuple[str, ...]) -> str | None:
    """Why ``e`` is no input at all (an ``ignored`` kind), or None."""
    if posixpath.basename(e.key).startswith("."):
        return "hidden"
    if e.kind == storage.DIR_MARKER:
        return "folder_marker"
    if e.kind == storage.FILE and not e.key.lower().endswith(extensions):
        return posixpath.splitext(posixpath.basename(e.key))[1].lower() or "no_extension"
    return None


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


@dataclasses.dataclass
class ImageStream:
    """:func:`image_folder` a listing page at a time: iterating gives ``(item, reason, detail)`` in key order --
    ``reason`` None for an image to read, else why the entry is a reject (as :attr:`Catalog.rejected`) -- and
    counts the rest into ``ignored`` as it goes. Iterating to the end of a root with no input raises
    :class:`FileNotFoundError`. Iterate once."""
    fs: pafs.FileSystem
    root: str
    uri: str
    entries: Iterator[_Entry]
    ignored: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __iter__(self) -> Iterator[tuple[Item, str | None, str]]:
        found = False
        for e in self.entries:
            why = _not_input(e, IMAGE_EXTENSIONS)
            if why is not None:
                self.ignored[why] += 1
                continue
            found = True
            yield Item(key=e.key, path=e.path), (None if e.kind == storage.FILE else e.kind), e.detail
        if not found:
            raise FileNotFoundError(f"{self.uri}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")


def image_stream(uri: str, s3: S3Config | None = None, retry: RetryConfig | None = None) -> ImageStream:
    """Every image file under ``uri`` (recursively), streamed in key order (:class:`ImageStream`)."""
    fs, root, entries = _entries(uri, s3, retry)
    return ImageStream(fs, root, uri, entries)


def image_folder(uri: str, s3: S3Config | None = None, limit: int | None = None,
                 retry: RetryConfig | None = None) -> Catalog:
    """Every image file under ``uri`` (recursively), sorted by key; the rest is ``rejected`` or ``ignored``."""
    stream = image_stream(uri, s3, retry)
    items, rejected = [], []
    for it, reason, detail in stream:
        if reason is None:
            items.append(it)
        else:
            rejected.append((it, reason, detail))
    items.sort(key=lambda i: i.path)
    rejected.sort(key=lambda r: r[0].path)
    return Catalog(stream.fs, stream.root, items[:limit] if limit else items, rejected, dict(stream.ignored))


def paired_folder(uri: str, s3: S3Config | None = None, limit: int | None = None,
                  images: str = "images", masks: str = "masks") -> Catalog:
    """``ROOT/images`` and ``ROOT/masks`` paired by stem; images without a mask are an error."""
    fs, root = storage.get_filesystem(uri, s3)
    img_dir, mask_dir = storage.join(root, images), storage.join(root, masks)
    for d in (img_dir, mask_dir):
        if not storage.is_dir(fs, d):
            raise FileNotFoundError(f"{storage.to_uri(fs, d)}: expected a folder (paired layout ROOT/{images}, ROOT/{masks})")
    mask_by_stem = {_stem(p): p for p in storage.list_files(fs, mask_dir, IMAGE_EXTENSIONS)}
    items, missing = [], []
    for p in storage.list_files(fs, img_dir, IMAGE_EXTENSIONS):
        m = mask_by_stem.get(_stem(p))
        if m is None:
            missing.append(_rel(root, p))
            continue
        items.append(Item(key=_rel(root, p), path=p, mask_path=m))
    if missing:
        raise FileNotFoundError(f"{uri}: {len(missing)} images have no mask, e.g. {missing[:3]}")
    if not items:
        raise FileNotFoundError(f"{uri}: no image/mask pairs found")
    return Catalog(fs, root, items[:limit] if limit else items)


def video_folders(uri: str, s3: S3Config | None = None, sequences: list[str] | None = None,
                  max_frames: int | None = None) -> Catalog:
    """Frames of every sequence under ``uri``; ``sequences`` restricts to some; ``max_frames`` per sequence.

    Video files become items with ``frame=-1`` (the whole file); the labelling and video jobs expand them into
    frames with PyAV.
    """
    fs, root, entries = _listing(uri, s3, None)
    by_seq: dict[str, list[_Entry]] = defaultdict(list)
    masks: dict[str, dict[str, str]] = defaultdict(dict)   # sequence -> mask stem -> path
    items: list[Item] = []
    rejected: list[tuple[Item, str, str]] = []
    ignored: collections.Counter = collections.Counter()
    for e in entries:
        why = _not_input(e, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        parts = e.key.split("/")
        if why is not None:
            ignored[why] += 1
        elif e.kind != storage.FILE:
            rejected.append((Item(key=e.key, path=e.path), e.kind, e.detail))
        elif e.key.lower().endswith(VIDEO_EXTENSIONS):
            items.append(Item(key=e.key, path=e.path, sequence=_stem(e.path), frame=-1))
        elif len(parts) < 2:
            ignored["outside_sequence"] += 1
        elif "masks" in parts[1:-1]:
            if parts[1] == "masks":
                masks[parts[0]][_stem(e.path)] = e.path
            ignored["mask"] += 1
        else:
            by_seq[parts[0]].append(e)
    for seq, frames in sorted(by_seq.items()):
        frames = sorted(frames, key=lambda e: e.path)
        ignored["past_max_frames"] += len(frames[max_frames:]) if max_frames is not None else 0
        for idx, e in enumerate(frames[:max_frames]):
            items.append(Item(key=e.key, path=e.path, mask_path=masks[seq].get(_stem(e.path)), sequence=seq,
                              frame=idx))
    if sequences is not None:
        unknown = set(sequences) - {i.sequence for i in items}
        if unknown:
            raise FileNotFoundError(f"{uri}: unknown sequences {sorted(unknown)}")
        items = [i for i in items if i.sequence in sequences]
    if not items:
        raise FileNotFoundError(f"{uri}: no video sequences (ROOT/<seq>/images/*.jpg or video files) found")
    return Catalog(fs, root, items, rejected, {k: v for k, v in ignored.items() if v})
