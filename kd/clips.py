"""Clips of T frames from per-frame rows: how the video trainer turns label shards into training samples.

Every frame row (a decoded frame, a label-shard row) carries ``sequence`` and ``frame`` (``kd.schema.SEQUENCE``,
``FRAME``). A clip is ``length`` frames of one sequence spaced ``frame_step`` apart; clips start every ``stride``
frames from the sequence's first frame::

    start = f0, f0 + stride, f0 + 2*stride, ...     clip = (start, start + step, ..., start + (length-1)*step)

Our choices (the paper gives none): a clip that would need a frame missing from the rows (a rejected label, the
end of the sequence) is skipped rather than padded, so every clip is made of real consecutive frames; rows of
still images (``frame < 0``) cannot form clips and are an error, so a wrong input is not silently dropped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ClipConfig", "clip_windows", "assemble_clips"]


@dataclass(frozen=True)
class ClipConfig:
    """How clips are cut (all ours).

    Attributes:
        length: frames per clip ``T`` (3: the current frame and the K=2 predecessors the student attends to).
        stride: frames between the starts of consecutive clips (2: clips overlap by one frame, so every frame
            pair is seen at least once).
        frame_step: spacing of the frames inside a clip (1: adjacent frames).
    """

    length: int = 3
    stride: int = 2
    frame_step: int = 1

    def __post_init__(self) -> None:
        for name in ("length", "stride", "frame_step"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")

    @property
    def span(self) -> int:
        """Frames from the first to the last frame of a clip, inclusive."""
        return (self.length - 1) * self.frame_step + 1


def clip_windows(frames: Sequence[int], cfg: ClipConfig) -> list[tuple[int, ...]]:
    """Clips (tuples of frame indices) that can be cut from one sequence's available ``frames``.

    >>> clip_windows([0, 1, 2, 3, 4, 5], ClipConfig(3, 2, 1))
    [(0, 1, 2), (2, 3, 4)]
    """
    have = set(int(f) for f in frames)
    if not have:
        return []
    first, last = min(have), max(have)
    out = []
    for start in range(first, last - cfg.span + 2, cfg.stride):
        clip = tuple(start + i * cfg.frame_step for i in range(cfg.length))
        if all(f in have for f in clip):
            out.append(clip)
    return out


def assemble_clips(sequences: Sequence[str], frames: Sequence[int], cfg: ClipConfig) -> list[list[int]]:
    """Group rows into clips: returns, per clip, the positions of its rows in the input (in frame order).

    Args:
        sequences, frames: the ``sequence`` and ``frame`` columns of the rows (same length).
        cfg: how to cut.
    Raises:
        ValueError: the columns differ in length, a row is a still image (``frame < 0``), or a sequence has the
            same frame twice (two label shards for one frame would make the clip ambiguous).
    """
    if len(sequences) != len(frames):
        raise ValueError(f"sequences ({len(sequences)}) and frames ({len(frames)}) differ in length")
    pos: dict[str, dict[int, int]] = defaultdict(dict)
    for i, (seq, f) in enumerate(zip(sequences, frames)):
        f = int(f)
        if f < 0:
            raise ValueError(f"row {i} (sequence {seq!r}) is a still image (frame {f}); clips need video frames")
        if f in pos[seq]:
            raise ValueError(f"sequence {seq!r} has frame {f} twice (rows {pos[seq][f]} and {i})")
        pos[seq][f] = i
    clips = []
    for seq in sorted(pos):
        for window in clip_windows(list(pos[seq]), cfg):
            clips.append([pos[seq][f] for f in window])
    return clips
