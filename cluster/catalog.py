"""The data catalog: the folder layouts sodkd reads, from a local path or an object-store URI.

Layouts (as in ``../shared/data``):
- **unlabeled images**: any tree of image files (``unlabeled/imagenet-1k/*.jpg``);
- **paired images/masks**: ``ROOT/images/X.jpg`` + ``ROOT/masks/X.png``, paired by file stem;
- **video sequences**: ``ROOT/<sequence>/images/00000.jpg`` (optionally ``ROOT/<sequence>/masks/``), or
  ``ROOT/<sequence>/*.jpg``, or video files ``ROOT/<name>.mp4`` (decoded later, with PyAV).

Every item has a ``key``: its path relative to ROOT, with ``/`` separators. Keys (and so ids, the hash of the
key) do not change when a bucket is copied to a local directory, so labels made from one join the other.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections import defaultdict

import pyarrow.fs as pafs

from cluster import storage
from cluster.storage import S3Config
from kd.schema import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, stable_id


@dataclasses.dataclass(frozen=True)
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
    fs: pafs.FileSystem
    root: str
    items: list[Item]

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
    return posixpath.relpath(path, root)


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def image_folder(uri: str, s3: S3Config | None = None, limit: int | None = None) -> Catalog:
    """Every image file under ``uri`` (recursively), sorted by key."""
    fs, root = storage.get_filesystem(uri, s3)
    paths = storage.list_files(fs, root, IMAGE_EXTENSIONS)
    items = [Item(key=_rel(root, p), path=p) for p in paths]
    if not items:
        raise FileNotFoundError(f"{uri}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return Catalog(fs, root, items[:limit] if limit else items)


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
    fs, root = storage.get_filesystem(uri, s3)
    files = storage.list_files(fs, root, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
    by_seq: dict[str, list[str]] = defaultdict(list)
    items: list[Item] = []
    for p in files:
        rel = _rel(root, p)
        parts = rel.split("/")
        if rel.lower().endswith(VIDEO_EXTENSIONS):
            items.append(Item(key=rel, path=p, sequence=_stem(p), frame=-1))
            continue
        if len(parts) < 2 or "masks" in parts[1:-1]:
            continue
        by_seq[parts[0]].append(p)
    for seq, paths in sorted(by_seq.items()):
        mask_dir = storage.join(root, seq, "masks")
        masks = ({_stem(m): m for m in storage.list_files(fs, mask_dir, IMAGE_EXTENSIONS)}
                 if storage.is_dir(fs, mask_dir) else {})
        for idx, p in enumerate(sorted(paths)[:max_frames]):
            items.append(Item(key=_rel(root, p), path=p, mask_path=masks.get(_stem(p)), sequence=seq, frame=idx))
    if sequences is not None:
        unknown = set(sequences) - {i.sequence for i in items}
        if unknown:
            raise FileNotFoundError(f"{uri}: unknown sequences {sorted(unknown)}")
        items = [i for i in items if i.sequence in sequences]
    if not items:
        raise FileNotFoundError(f"{uri}: no video sequences (ROOT/<seq>/images/*.jpg or video files) found")
    return Catalog(fs, root, items)
