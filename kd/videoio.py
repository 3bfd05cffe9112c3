"""Video files in and out with PyAV (package ``av``): decoding frames, writing mask videos, frame keys.

A video file becomes a sequence of frames that flow through the same pipelines as frame folders. Each decoded
frame gets a key ``<video key>#<index:05d>`` (:func:`frame_key`), so its id (``stable_id(key)``) is stable, and
carries ``sequence`` = the file's stem and ``frame`` = its 0-based decode index (``kd.schema.SEQUENCE`` /
``FRAME``), exactly like ``ROOT/<sequence>/images/00012.jpg`` does.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Iterator, Union

import numpy as np

__all__ = ["VideoInfo", "VideoDecodeError", "frame_key", "parse_frame_key", "video_info", "count_frames",
           "iter_frames", "read_frames", "read_frames_at", "MaskVideoWriter", "write_video"]

Source = Union[str, os.PathLike, bytes, IO[bytes]]
FRAME_SEP = "#"
_FRAME_KEY = re.compile(r"^(?P<video>.+)#(?P<index>\d+)$")


class VideoDecodeError(ValueError):
    """A video could not be opened or decoded; the message names the source."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float            # average frame rate (0.0 when the container does not say)
    frames: int           # frame count from the container header (0 when unknown; decode to be sure)
    codec: str


def frame_key(video_key: str, index: int) -> str:
    """Key of frame ``index`` of the video stored under ``video_key``: ``"clips/a.mp4#00012"``."""
    if index < 0:
        raise ValueError(f"frame_key: index must be >= 0, got {index}")
    return f"{video_key}{FRAME_SEP}{index:05d}"


def parse_frame_key(key: str) -> tuple[str, int] | None:
    """``"clips/a.mp4#00012"`` -> ``("clips/a.mp4", 12)``; None for a key that is not a video frame's."""
    m = _FRAME_KEY.match(key)
    return (m.group("video"), int(m.group("index"))) if m else None


def _name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return getattr(source, "name", "<stream>")


def _open(source: Source):
    import av

    target = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    if isinstance(target, (str, os.PathLike)) and not os.path.isfile(target):
        raise FileNotFoundError(f"video not found: {os.fspath(target)}")
    try:
        container = av.open(target if not isinstance(target, os.PathLike) else os.fspath(target), mode="r")
    except Exception as e:  # noqa: BLE001 - av raises its own error family for foreign data
        raise VideoDecodeError(f"{_name(source)}: cannot open as a video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{_name(source)}: has no video stream")
    return container


def video_info(source: Source) -> VideoInfo:
    """Size, frame rate, header frame count and codec of the first video stream."""
    with _open(source) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(width=stream.codec_context.width, height=stream.codec_context.height,
                         fps=float(rate) if rate else 0.0, frames=int(stream.frames or 0),
                         codec=stream.codec_context.name)


def count_frames(source: Source) -> int:
    """Frames in the first video stream, counted from its packets (demuxing only, no decoding: fast)."""
    with _open(source) as container:
        try:
            return sum(1 for packet in container.demux(video=0) if packet.size)
        except Exception as e:  # noqa: BLE001
            raise VideoDecodeError(f"{_name(source)}: demuxing failed ({type(e).__name__}: {e})") from e


def read_frames_at(source: Source, indices) -> dict[int, np.ndarray]:
    """The frames at ``indices`` (decode indices, as :func:`iter_frames` numbers them); indices past the end
    are missing from the result.

    Seeks to the keyframe before the first wanted frame (its presentation time comes from demuxing the
    packets, which decodes nothing) and decodes from there, so reading a batch near the end of a long video
    costs one group of pictures, not the whole file. A stream whose timestamps do not map back to indices
    (no pts, duplicates, frames the decoder drops) is decoded from the start instead, with the same result.
    """
    wanted = set(int(i) for i in indices)
    if not wanted:
        return {}
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    out = _read_frames_seeking(source, wanted) if min(wanted) > 0 else None
    if out is None or (wanted - out.keys() and min(wanted - out.keys()) < max(out, default=-1)):
        if hasattr(source, "seek"):
            source.seek(0)
        out = {}
        for index, frame in iter_frames(source, max_frames=max(wanted) + 1):
            if index in wanted:
                out[index] = frame
    return out


def _read_frames_seeking(source: Source, wanted: set[int]) -> dict[int, np.ndarray] | None:
    """:func:`read_frames_at` by seeking; None when the stream's timestamps cannot be trusted for it."""
    container = _open(source)
    try:
        stream = container.streams.video[0]
        pts = [p.pts for p in container.demux(stream) if p.size]
        if not pts or any(p is None for p in pts) or len(set(pts)) != len(pts):
            return None
        pts.sort()                                   # presentation order = iter_frames' decode index
        if min(wanted) >= len(pts):
            return {}
        index_of = {p: i for i, p in enumerate(pts)}
        container.seek(pts[min(wanted)], backward=True, any_frame=False, stream=stream)
        last, out = max(wanted), {}
        for frame in container.decode(stream):
            i = index_of.get(frame.pts)
            if i is None:
                return None
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
        return out
    except VideoDecodeError:
        raise
    except Exception:  # noqa: BLE001 - a stream PyAV cannot seek in: decode from the start instead
        return None
    finally:
        container.close()
        if hasattr(source, "seek"):
            source.seek(0)


def iter_frames(source: Source, max_frames: int | None = None, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the first video stream: yields ``(index, HxWx3 uint8 RGB)`` in presentation order.

    Args:
        source: a path, the encoded bytes, or a readable binary file object.
        max_frames: stop after this many yielded frames.
        every: keep every ``every``-th decoded frame (``index`` stays the decode index, so keys are stable).
    Raises:
        VideoDecodeError: the source is not a decodable video (naming it); FileNotFoundError for a missing path.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    container = _open(source)
    yielded = 0
    try:
        for index, frame in enumerate(container.decode(video=0)):
            if index % every:
                continue
            yield index, frame.to_ndarray(format="rgb24")
            yielded += 1
            if max_frames is not None and yielded >= max_frames:
                return
    except VideoDecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise VideoDecodeError(f"{_name(source)}: decoding failed after {yielded} frames "
                               f"({type(e).__name__}: {e})") from e
    finally:
        container.close()


def read_frames(source: Source, max_frames: int | None = None, every: int = 1) -> list[np.ndarray]:
    """All frames of :func:`iter_frames` as a list of HxWx3 uint8 arrays."""
    return [f for _, f in iter_frames(source, max_frames, every)]


class MaskVideoWriter:
    """Writes frames (HxW uint8 maps or HxWx3 uint8 RGB) to a video file with PyAV.

    ``codec="libx264"`` (yuv420p, ``crf`` quality; even frame sizes are required by yuv420p, so odd sizes are
    padded by one pixel), or ``"ffv1"`` for a lossless file (``.mkv``/``.avi``). Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, fps: float, codec: str = "libx264", crf: int = 18):
        import av

        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.path = os.fspath(path)
        self._av = av
        self._container = av.open(self.path, mode="w")
        self._stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self._codec = codec
        if codec == "libx264":
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(crf)}
        elif codec == "ffv1":
            self._stream.pix_fmt = "bgr0"   # packed RGB: a lossless round trip of RGB frames
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        arr = np.asarray(frame)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
            raise ValueError(f"{self.path}: frames must be HxW or HxWx3 uint8, got {arr.dtype} {arr.shape}")
        h, w = arr.shape[:2]
        if self._size is None:
            self._size = (h, w)
        elif self._size != (h, w):
            raise ValueError(f"{self.path}: frame {self.frames} is {w}x{h}, the video is {self._size[1]}x{self._size[0]}")
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if self._codec == "libx264" and (h % 2 or w % 2):
            arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self.frames == 0:
            self._stream.height, self._stream.width = arr.shape[:2]
        vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            if self.frames:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> "MaskVideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames, fps: float = 24.0, codec: str = "libx264") -> int:
    """Write an iterable of uint8 frames to ``path``; returns how many were written."""
    with MaskVideoWriter(path, fps, codec) as writer:
        for f in frames:
            writer.write(f)
        return writer.frames
