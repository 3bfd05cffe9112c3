"""Video data on storage: evaluation sequences, frames by key, and training clips assembled from label shards.

- :func:`load_sequences` reads ``ROOT/<sequence>/images`` + ``masks`` (DAVIS layout) for evaluation.
- :class:`FrameReader` returns the frame stored under a label row's ``key``: an image file of a frame folder
  (``blackswan/images/00012.jpg``) or a frame of a video file (``clips/a.mp4#00012``, see
  :func:`kd.videoio.frame_key`), decoding each video once and keeping its frames while they are asked for.
- :class:`ClipSet` turns the rows of a labelling job (``id``, ``key``, ``sequence``, ``frame``, ``label_png``; see
  :mod:`cluster.labels`) into clips of T frames (:func:`kd.clips.assemble_clips`) and yields augmented, aligned
  (frames, soft labels) arrays for the video trainer. Labels are joined to frames by the row's key (whose hash is
  the row's id), never by position.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Sequence

import numpy as np
import pyarrow as pa

from cluster import catalog, storage
from cluster.labels import decode_label, read_labels
from cluster.storage import S3Config
from kd import schema as S
from kd.augment import AugmentConfig, Augmenter
from kd.clips import ClipConfig, assemble_clips
from kd.imageio import decode_image, decode_mask, resize
from kd.videoio import VideoDecodeError, count_frames, frame_key, parse_frame_key, read_frames, read_frames_at

log = logging.getLogger(__name__)

__all__ = ["expand_videos", "read_video_frames", "load_sequences", "FrameReader", "ClipSet", "select_sequences",
           "LABEL_COLUMNS", "STILL_COLUMNS"]

LABEL_COLUMNS = [S.ID, S.KEY, S.SEQUENCE, S.FRAME, S.LABEL_H, S.LABEL_W, S.LABEL_PNG]
STILL_COLUMNS = [S.KEY, S.LABEL_PNG]


def expand_videos(fs, items: Sequence[catalog.Item]) -> tuple[list[catalog.Item], list[catalog.Item]]:
    """Video-file items (``frame == -1``) -> one item per frame, and the videos that could not be opened.

    Frame ``i`` of ``clips/a.mp4`` becomes ``Item(key="clips/a.mp4#0000i", path=<the video's path>,
    sequence="a", frame=i)``: its id is the hash of that key, so the labelling job, its resume-by-id and the
    trainer treat it like a frame of a frame folder. Frames are counted from the container's packets.
    """
    frames, failed = [], []
    for it in items:
        try:
            with fs.open_input_file(it.path) as f:
                n = count_frames(f)
        except (VideoDecodeError, OSError) as e:
            log.warning("%s: not a readable video (%s)", it.key, e)
            failed.append(it)
            continue
        frames += [catalog.Item(key=frame_key(it.key, i), path=it.path, sequence=it.sequence, frame=i)
                   for i in range(n)]
    return frames, failed


def read_video_frames(fs, root: str, keys: Sequence[str]) -> dict[str, np.ndarray | Exception]:
    """The frames behind the video-frame keys among ``keys`` (others are ignored), each video decoded once.

    Returns ``{key: HxWx3 uint8}``, or the exception for a frame that could not be read (the labelling job
    turns it into a reject row).
    """
    by_video: dict[str, dict[int, str]] = {}
    for key in keys:
        parsed = parse_frame_key(str(key))
        if parsed is not None:
            by_video.setdefault(parsed[0], {})[parsed[1]] = str(key)
    out: dict[str, np.ndarray | Exception] = {}
    for video_key, wanted in by_video.items():
        try:
            with fs.open_input_file(storage.join(root, video_key)) as f:
                got = read_frames_at(f, wanted)
        except (VideoDecodeError, OSError) as e:
            got, error = {}, e
        else:
            error = None
        for index, key in wanted.items():
            out[key] = got[index] if index in got else (
                error or VideoDecodeError(f"{video_key}: frame {index} is past the end of the video"))
    return out


def load_sequences(data: str, sequences: Sequence[str] | None = None, max_frames: int | None = None,
                   s3: S3Config | None = None) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """``{sequence: (frames RGB uint8, masks uint8)}`` of every frame-folder sequence under ``data``.

    Every frame must have a mask (``ROOT/<seq>/masks/<stem>.png``); a sequence without is an error naming it.
    """
    cat = catalog.video_folders(data, s3, sequences=list(sequences) if sequences else None, max_frames=max_frames)
    out = {}
    for seq, items in cat.sequences().items():
        if not seq or items[0].frame < 0:
            continue
        missing = [i.key for i in items if i.mask_path is None]
        if missing:
            raise FileNotFoundError(f"{data}: sequence {seq!r} has {len(missing)} frames without a mask, "
                                    f"e.g. {missing[0]}")
        frames = [decode_image(storage.read_bytes(cat.fs, i.path)) for i in items]
        masks = [decode_mask(storage.read_bytes(cat.fs, i.mask_path)) for i in items]
        out[seq] = (frames, masks)
    if not out:
        raise FileNotFoundError(f"{data}: no sequences with images/ and masks/ found")
    return out


class FrameReader:
    """``reader(key) -> HxWx3 uint8``: frames by key under ``root`` (local folder or ``s3://``).

    Video-file frames (``<video key>#<index>``) are decoded by decoding the whole video once; the last
    ``video_cache`` videos stay in memory, so reading the frames of a clip in order decodes each video once.
    """

    def __init__(self, root: str, s3: S3Config | None = None, video_cache: int = 2):
        self.fs, self.root = storage.get_filesystem(root, s3)
        self.uri = root
        self._videos: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.video_cache = video_cache

    def _video(self, video_key: str) -> list[np.ndarray]:
        if video_key not in self._videos:
            data = storage.read_bytes(self.fs, storage.join(self.root, video_key))
            self._videos[video_key] = read_frames(data)
            while len(self._videos) > self.video_cache:
                self._videos.popitem(last=False)
        self._videos.move_to_end(video_key)
        return self._videos[video_key]

    def __call__(self, key: str) -> np.ndarray:
        parsed = parse_frame_key(key)
        if parsed is not None:
            video_key, index = parsed
            frames = self._video(video_key)
            if index >= len(frames):
                raise IndexError(f"{self.uri}/{video_key}: frame {index} asked for, the video has {len(frames)}")
            return frames[index]
        try:
            return decode_image(storage.read_bytes(self.fs, storage.join(self.root, key)))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.uri}: frame {key!r} of the label shards is missing") from e


class ClipSet:
    """Training clips from label rows: ``len(clipset)`` clips; ``clipset.sample(i, rng, size)`` -> arrays.

    Args:
        table: label rows with at least :data:`LABEL_COLUMNS` (``cluster.labels.read_labels``).
        reader: where the frames are (the labelling job's input root).
        clip: how to cut clips.
        sequences: keep only these sequences (e.g. to hold others out for evaluation); None = all.
        augment: the KD-SCFNet augmentation, applied *identically* to every frame of a clip (one seed per clip,
            replayed per frame), so a flip or crop never shows up as fake motion; None = no augmentation.
        cache: keep decoded frames (resized to the label size) in memory -- right for a few thousand frames.
    """

    def __init__(self, table: pa.Table, reader: FrameReader, clip: ClipConfig = ClipConfig(),
                 augment: AugmentConfig | None = AugmentConfig(), cache: bool = True,
                 sequences: Sequence[str] | None = None, stills: bool = False):
        needed = STILL_COLUMNS if stills else LABEL_COLUMNS
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise ValueError(f"label table lacks columns {missing} (has {table.column_names})")
        table = table if stills else select_sequences(table, sequences)
        self.table = table
        self.reader = reader
        self.clip = clip
        self.augmenter = Augmenter(augment) if augment is not None else None
        self.keys = table.column(S.KEY).to_pylist()
        if stills:      # each row a clip of clip.length copies of itself: a scene that does not move
            self.clips = [[i] * clip.length for i in range(table.num_rows)]
        else:
            self.clips = assemble_clips(table.column(S.SEQUENCE).to_pylist(), table.column(S.FRAME).to_pylist(),
                                        clip)
        self._png = table.column(S.LABEL_PNG)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    @classmethod
    def from_labels(cls, labels_uri: str, images_uri: str, s3: S3Config | None = None, **kwargs) -> "ClipSet":
        """Read the label shards of ``labels_uri`` and the frames under ``images_uri``. With ``stills=True``
        the shards are an image labelling job's (no sequence or frame columns) and every image becomes a clip of
        ``clip.length`` identical frames, augmented once (rehearsal of single-image saliency)."""
        columns = STILL_COLUMNS if kwargs.get("stills") else LABEL_COLUMNS
        return cls(read_labels(labels_uri, s3, columns=columns), FrameReader(images_uri, s3), **kwargs)

    def __len__(self) -> int:
        return len(self.clips)

    def sequences(self) -> list[str]:
        seq = self.table.column(S.SEQUENCE).to_pylist()
        return sorted({seq[c[0]] for c in self.clips})

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``: the frame resized to its label's size (uint8) and the label (float32 in [0, 1])."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        label = decode_label(self._png[i].as_py())
        frame = resize(self.reader(self.keys[i]), label.shape)
        if self._cache is not None:
            self._cache[i] = (frame, label)
        return frame, label

    def sample(self, index: int, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Clip ``index`` as ``frames (T, size, size, 3) uint8`` and ``labels (T, size, size) float32``."""
        seed = int(rng.integers(0, 2**63 - 1))
        frames, labels = [], []
        rows = self.clips[index]
        for t, row in enumerate(rows):
            if t and row == rows[t - 1]:        # a still's copies: the same row under the same draw
                frames.append(frames[-1])
                labels.append(labels[-1])
                continue
            frame, label = self._row(row)
            if self.augmenter is not None:
                frame, label = self.augmenter(np.random.default_rng(seed), frame, label)
            frames.append(resize(frame, (size, size)))
            labels.append(_resize_map(label, size))
        return np.stack(frames), np.stack(labels)


def select_sequences(table: pa.Table, sequences: Sequence[str] | None) -> pa.Table:
    """The rows of ``table`` whose ``sequence`` is in ``sequences`` (all rows for None); unknown names are an error."""
    if sequences is None:
        return table
    import pyarrow.compute as pc

    present = set(table.column(S.SEQUENCE).to_pylist())
    unknown = sorted(set(sequences) - present)
    if unknown:
        raise ValueError(f"sequences {unknown} are not in the label shards (they hold {sorted(present)})")
    return table.filter(pc.is_in(table.column(S.SEQUENCE), value_set=pa.array(list(sequences), pa.string())))


def _resize_map(m: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if m.shape == (size, size):
        return m.astype(np.float32)
    return np.asarray(Image.fromarray(m.astype(np.float32), "F").resize((size, size), Image.BILINEAR), np.float32)
