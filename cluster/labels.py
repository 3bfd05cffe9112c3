"""Soft-label shards on storage: their schema, atomic writing, and reading them back by id.

A labelling job writes to ``OUTPUT/labels/part-*.parquet`` (one row per labelled image) and
``OUTPUT/rejects/part-*.parquet`` (one row per image that could not be labelled, with the reason). Each
shard is written atomically -- to a hidden temporary name and renamed on a local disk, as a single object
PUT/multipart-complete on S3 -- so a shard is either complete or absent, and readers ignore hidden names.
A killed job therefore leaves only complete shards; its rerun skips every id they hold.

A shard's name is derived from the ids it holds (:func:`shard_name`), so a task that Ray retries after it
wrote its shard (its node died before the result reached the driver) writes the same rows to the same name
and replaces that shard instead of adding a second copy. Should an id still sit in two shards (a foreign
writer, names of older versions), readers dedupe by id (first shard in name order wins). The distillation
trainer joins labels to images by ``id`` (the stable hash of the image key, :func:`kd.schema.stable_id`),
never by row order.

Storage errors that may pass (:func:`cluster.storage.is_transient`: network, timeouts, throttling, 5xx) are
retried with backoff when a shard is written or read; a shard still unreadable for such a reason raises
(its ids are not silently taken as not done), while a damaged shard is skipped with a warning.

Columns added to :data:`LABEL_SCHEMA` after shards had been written (:data:`FILLED_COLUMNS`: ``disagreement``)
may be missing from older shards; the readers here give them to such shards filled (NaN), so old and new
shards read back as one table with the current schema.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import re
import uuid
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from cluster import storage
from cluster.storage import RetryConfig, S3Config
from kd import schema as S

log = logging.getLogger(__name__)

__all__ = ["LABEL_SCHEMA", "REJECT_SCHEMA", "FILLED_COLUMNS", "shard_paths", "read_ids", "done_ids", "done_packed", "pack_any",
           "pack_ids", "shard_name", "write_shard", "write_file_atomic", "read_labels", "read_label_table",
           "read_label_rows", "read_rejects", "decode_label", "labels_dir", "remove_stale_temporaries", "resolve_root"]

LABEL_SCHEMA = pa.schema([
    (S.ID, pa.string()), (S.KEY, pa.string()), (S.SEQUENCE, pa.string()), (S.FRAME, pa.int32()),
    (S.ORIG_H, pa.int32()), (S.ORIG_W, pa.int32()),
    (S.TEACHER, pa.string()), (S.WEIGHTS_HASH, pa.string()), (S.TTA, pa.string()),
    (S.LABEL_H, pa.int32()), (S.LABEL_W, pa.int32()), (S.LABEL_PNG, pa.binary()),
    (S.CONF_MEAN, pa.float32()), (S.CONF_FRAC, pa.float32()), (S.FG_FRAC, pa.float32()),
    (S.DISAGREEMENT, pa.float32()),   # nullable; NaN when the teacher has one view
])

# label columns newer than the first shards: a shard without one reads back with this fill value
FILLED_COLUMNS: dict[str, float] = {S.DISAGREEMENT: float("nan")}

REJECT_SCHEMA = pa.schema([
    (S.ID, pa.string()), (S.KEY, pa.string()), (S.SEQUENCE, pa.string()), (S.FRAME, pa.int32()),
    (S.REASON, pa.string()), (S.DETAIL, pa.string()),
])

SHARD_SUFFIX = ".parquet"
_TMP_MARK = ".tmp-"


def _dir(root: str, kind: str) -> str:
    if kind not in (S.LABELS_DIR, S.REJECTS_DIR):
        raise ValueError(f"shard kind: expected {S.LABELS_DIR!r} or {S.REJECTS_DIR!r}, got {kind!r}")
    return storage.join(root, kind)


def shard_paths(fs: pafs.FileSystem, root: str, kind: str = S.LABELS_DIR) -> list[str]:
    """Complete shards of ``kind`` under the job output ``root``, sorted by name (hidden temporaries skipped)."""
    d = _dir(root, kind)
    if not storage.is_dir(fs, d):
        return []
    return storage.list_files(fs, d, [SHARD_SUFFIX], recursive=False)


def _read_shard(fs: pafs.FileSystem, path: str, columns: list[str] | None, schema: pa.Schema) -> pa.Table:
    """One shard's ``columns`` (all when None); :data:`FILLED_COLUMNS` of ``schema`` it lacks are filled."""
    fill = [c for c in FILLED_COLUMNS if c in schema.names and (columns is None or c in columns)]
    if fill and columns is not None:
        names = set(pq.read_schema(path, filesystem=fs).names)
        missing = [c for c in fill if c not in names]
        t = pq.read_table(path, filesystem=fs, columns=[c for c in columns if c not in missing])
    else:
        t = pq.read_table(path, filesystem=fs, columns=columns)
    for c in fill:
        if c in t.column_names:
            continue
        field = schema.field(c)
        col = pa.array(np.full(t.num_rows, FILLED_COLUMNS[c]), type=field.type)
        if columns is None:  # at its place in the schema (before any columns that follow it there)
            after = {f.name for f in list(schema)[schema.get_field_index(c) + 1:]}
            at = next((i for i, n in enumerate(t.column_names) if n in after), t.num_columns)
            t = t.add_column(at, field, col)
        else:
            t = t.append_column(field, col)
    return t if columns is None else t.select(columns)


def _iter_shards(fs: pafs.FileSystem, paths: Iterable[str], columns: list[str] | None,
                 schema: pa.Schema) -> Iterable[pa.Table]:
    """Each readable shard's ``columns``, one at a time."""
    for p in paths:
        try:
            t = storage.retrying(lambda p=p: _read_shard(fs, p, columns, schema), None,
                                 f"reading {storage.to_uri(fs, p)}")
        except (OSError, pa.ArrowInvalid) as e:
            if storage.is_transient(e):
                raise
            # Cannot come from our atomic writer; a foreign or damaged file. Its ids count as not done,
            # so a rerun labels them again into a new shard.
            log.warning("skipping unreadable shard %s: %s", storage.to_uri(fs, p), e)
            continue
        yield t


def _read_shards(fs: pafs.FileSystem, paths: Iterable[str], columns: list[str] | None,
                 schema: pa.Schema) -> pa.Table:
    tables = list(_iter_shards(fs, paths, columns, schema))
    if not tables:
        fields = [schema.field(c) for c in columns] if columns else list(schema)
        return pa.schema(fields).empty_table()
    return pa.concat_tables(tables, promote_options="default")


def _dedupe(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    ids = table.column(S.ID).to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(pa.array(np.sort(first)))


def read_ids(fs: pafs.FileSystem, root: str, kind: str = S.LABELS_DIR) -> set[str]:
    """Ids present in the ``kind`` shards under ``root`` (only the id column is read)."""
    schema = LABEL_SCHEMA if kind == S.LABELS_DIR else REJECT_SCHEMA
    t = _read_shards(fs, shard_paths(fs, root, kind), [S.ID], schema)
    return set(t.column(S.ID).to_pylist())


def done_ids(fs: pafs.FileSystem, root: str) -> set[str]:
    """Ids a job with output ``root`` has finished: labelled or rejected. A rerun skips these."""
    return read_ids(fs, root, S.LABELS_DIR) | read_ids(fs, root, S.REJECTS_DIR)


def done_packed(fs: pafs.FileSystem, root: str) -> np.ndarray:
    """:func:`done_ids` packed by :func:`pack_any` and sorted (``uint64``; an id may occur more than once): 8
    bytes a done id, read one shard at a time -- what a rerun of a large job matches its listing against with
    ``np.searchsorted``."""
    parts: list[np.ndarray] = []
    for kind, schema in ((S.LABELS_DIR, LABEL_SCHEMA), (S.REJECTS_DIR, REJECT_SCHEMA)):
        for t in _iter_shards(fs, shard_paths(fs, root, kind), [S.ID], schema):
            parts.append(pack_any(t.column(S.ID)))
    out = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    del parts
    out.sort()
    return out


_HEX16 = re.compile(r"[0-9a-f]{16}")
_NIBBLE = np.full(256, 16, np.uint8)   # ASCII byte -> its hex digit's value; 16: not a lowercase hex digit
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def _pack_chunk(c: pa.Array) -> np.ndarray | None:
    n = len(c)
    if n == 0:
        return np.empty(0, np.uint64)
    if c.null_count or not (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)):
        return None
    _, off_buf, data_buf = c.buffers()
    width = np.int64 if pa.types.is_large_string(c.type) else np.int32
    off = np.frombuffer(off_buf, width)[c.offset:c.offset + n + 1]
    if np.any(np.diff(off) != 16):
        return None
    nib = _NIBBLE[np.frombuffer(data_buf, np.uint8)[int(off[0]):int(off[-1])]].reshape(n, 16)
    if np.any(nib > 15):
        return None
    pairs = (nib[:, 0::2] << 4) | nib[:, 1::2]   # (n, 8): the value's bytes, most significant first
    return pairs.view(">u8").ravel().astype(np.uint64)


def pack_ids(ids: pa.Array | pa.ChunkedArray, drop_other: bool = False) -> np.ndarray | None:
    """Ids of 16 lowercase hex characters (the form :func:`kd.schema.stable_id` gives) as one ``uint64`` each,
    in order: 8 bytes an id, to sort and search with numpy; ``int(id, 16)`` of each. An id of another form (or a
    null) makes the answer None -- or, with ``drop_other``, is left out (it equals no packed id)."""
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    out = np.empty(len(ids), np.uint64)
    k = 0
    for c in chunks:
        p = _pack_chunk(c)
        if p is None:
            if not drop_other:
                return None
            p = np.array([int(v, 16) for v in c.to_pylist() if v is not None and _HEX16.fullmatch(v)], np.uint64)
        out[k:k + len(p)] = p
        k += len(p)
    return out if k == len(out) else out[:k].copy()


def _pack_one(v: str) -> int:
    if _HEX16.fullmatch(v):
        return int(v, 16)
    return int.from_bytes(hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def pack_any(ids: pa.Array | pa.ChunkedArray | Iterable[str]) -> np.ndarray:
    """Every id as one ``uint64``, in order: :func:`pack_ids` (``int(id, 16)``, exact) for ids of the form
    :func:`kd.schema.stable_id` gives -- every id sodkd makes -- and a 64-bit BLAKE2b digest of any other string
    (two different such ids share a value with probability 2^-64)."""
    if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = pa.array(list(ids), pa.large_string())
    p = pack_ids(ids)
    if p is not None:
        return p
    return np.array([_pack_one(v) for v in ids.to_pylist()], np.uint64)


def remove_stale_temporaries(fs: pafs.FileSystem, root: str) -> int:
    """Delete hidden temporaries left by a writer killed mid-write (a shard or the review list; local output
    only); returns how many.

    Call it only when no other job writes to the same output (one job per output at a time).
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        return 0  # S3 writes are single objects: a killed upload leaves nothing visible
    n = 0
    for d in (_dir(root, S.LABELS_DIR), _dir(root, S.REJECTS_DIR), root):  # root: the review list's
        if not storage.is_dir(fs, d):
            continue
        for info in fs.get_file_info(pafs.FileSelector(d, recursive=False)):
            if posixpath.basename(info.path).startswith(".") and _TMP_MARK in info.path:
                fs.delete_file(info.path)
                n += 1
    return n


def shard_name(table: pa.Table) -> str:
    """``part-<digest>.parquet``: the digest is SHA-256 of the table's ids, sorted (a function of which rows it
    holds, not of when or by whom it was written)."""
    ids = sorted(table.column(S.ID).to_pylist())
    digest = hashlib.sha256("\n".join(ids).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"part-{digest}{SHARD_SUFFIX}"


def write_shard(fs: pafs.FileSystem, root: str, kind: str, table: pa.Table, retry: RetryConfig | None = None,
                on_retry: Callable[[BaseException], None] | None = None) -> str:
    """Write ``table`` as a shard of ``kind`` under ``root``, atomically; returns its path. The name is
    :func:`shard_name` of the table's ids: the same rows written again (a retried task) replace the shard.

    Transient storage errors are retried as ``retry`` says (default :class:`cluster.storage.RetryConfig`),
    each attempt to the same name, so an attempt that landed although its answer was lost is overwritten,
    not duplicated; the last error is raised. ``on_retry`` sees each retried error.

    Local: written to ``.part-*.tmp-*`` in the same folder, then renamed (atomic on one filesystem).
    S3: written straight to the final key; the object only appears when the upload completes (no
    directory-marker objects are created: prefixes need none).
    """
    d = _dir(root, kind)
    name = shard_name(table)
    final = storage.join(d, name)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy")
    data = sink.getvalue()
    storage.retrying(lambda: write_file_atomic(fs, final, data), retry, f"writing {storage.to_uri(fs, final)}",
                     on_retry)
    return final


def write_file_atomic(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    Local: a hidden temporary in the same folder (created if needed), then renamed over ``path``. S3: one
    object upload straight to the key (it appears when complete; no directory markers are created).
    """
    if isinstance(fs, pafs.LocalFileSystem):
        d, name = posixpath.split(path)
        fs.create_dir(d, recursive=True)
        tmp = storage.join(d, f".{name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def resolve_root(uri: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, job output root)`` of a label output given as its root or its ``labels/`` folder."""
    fs, path = storage.get_filesystem(uri, s3)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{uri}: no such label output")
    base = posixpath.basename(path.rstrip("/"))
    has_own = any(storage.exists(fs, storage.join(path, d)) for d in (S.LABELS_DIR, S.REJECTS_DIR))
    # the labels/ (or rejects/) folder itself was given -- unless the job's output was itself named "labels"
    if base in (S.LABELS_DIR, S.REJECTS_DIR) and not has_own:
        path = posixpath.dirname(path.rstrip("/"))
    return fs, path


def read_labels(uri: str, s3: S3Config | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every label row under the job output ``uri`` (or its ``labels/`` folder), one row per id.

    ``columns`` restricts what is read (``id`` is always included). Rows are in shard-name order; the
    trainer joins them to images by ``id``.
    """
    fs, root = resolve_root(uri, s3)
    return read_label_table(fs, root, columns)


def read_label_table(fs: pafs.FileSystem, root: str, columns: list[str] | None = None) -> pa.Table:
    """:func:`read_labels` of the job output ``root`` on ``fs`` (no root resolution)."""
    cols = None if columns is None else list(dict.fromkeys([S.ID, *columns]))
    return _dedupe(_read_shards(fs, shard_paths(fs, root, S.LABELS_DIR), cols, LABEL_SCHEMA))


def read_label_rows(fs: pafs.FileSystem, root: str, ids: Iterable[str], columns: list[str] | None = None) -> pa.Table:
    """The label rows of ``ids`` only (one per id, as :func:`read_labels` would give them, in shard order).

    Reads the id column of every shard, then ``columns`` (all when None; ``id`` is always included) of the
    shards that hold one of the ids -- cheap for a few rows of a large output (e.g. their label PNGs).
    """
    wanted = set(ids)
    cols = None if columns is None else list(dict.fromkeys([S.ID, *columns]))
    found: set[str] = set()
    tables = []
    for p in shard_paths(fs, root, S.LABELS_DIR):
        if found >= wanted:
            break
        here = _read_shards(fs, [p], [S.ID], LABEL_SCHEMA).column(S.ID).to_pylist()
        take = [i for i, v in enumerate(here) if v in wanted and v not in found]
        if not take:
            continue
        t = _read_shards(fs, [p], cols, LABEL_SCHEMA)
        if t.num_rows != len(here):  # unreadable between the two reads: skipped like any unreadable shard
            continue
        found.update(here[i] for i in take)
        tables.append(t.take(pa.array(take)))
    if not tables:
        return _read_shards(fs, [], cols, LABEL_SCHEMA)
    return _dedupe(pa.concat_tables(tables, promote_options="default"))


def read_rejects(uri: str, s3: S3Config | None = None) -> pa.Table:
    """Every rejected image under the job output ``uri``: id, key, sequence, frame, reason, detail."""
    fs, root = resolve_root(uri, s3)
    return _dedupe(_read_shards(fs, shard_paths(fs, root, S.REJECTS_DIR), None, REJECT_SCHEMA))


def labels_dir(uri: str) -> str:
    return storage.join(uri.rstrip("/"), S.LABELS_DIR)


def decode_label(row: Mapping[str, Any] | bytes) -> np.ndarray:
    """A label row (or its PNG bytes) -> the soft map, float32 (LABEL_H, LABEL_W) in [0, 1] (= uint8 / 255).

    The map is at the label size; resize it to ``(orig_h, orig_w)`` to compare with the source image.
    """
    data = row if isinstance(row, (bytes, bytearray, memoryview)) else row[S.LABEL_PNG]
    if data is None:
        raise ValueError("decode_label: the row has no label PNG")
    with Image.open(io.BytesIO(bytes(data))) as img:
        if img.mode != "L":
            raise ValueError(f"decode_label: expected an 8-bit grayscale PNG, got mode {img.mode}")
        arr = np.asarray(img, dtype=np.float32)
    if not isinstance(row, (bytes, bytearray, memoryview)) and S.LABEL_H in row:
        expected = (int(row[S.LABEL_H]), int(row[S.LABEL_W]))
        if arr.shape != expected:
            raise ValueError(f"decode_label: PNG is {arr.shape}, the row says {expected} (id {row.get(S.ID)})")
    return arr / 255.0
