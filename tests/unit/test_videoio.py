"""kd/videoio.py and kd/clips.py: PyAV round trips of real DAVIS frames, frame keys, clip assembly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kd.clips import ClipConfig, assemble_clips, clip_windows
from kd.schema import stable_id
from kd.videoio import (MaskVideoWriter, VideoDecodeError, frame_key, iter_frames, parse_frame_key, read_frames,
                        video_info, write_video)


@pytest.fixture(scope="module")
def davis_frames(shared_data) -> list[np.ndarray]:
    paths = sorted((shared_data / "davis2016-dev" / "blackswan" / "images").glob("*.jpg"))[:6]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_lossless_video_round_trip_of_real_frames(tmp_path, davis_frames):
    path = tmp_path / "blackswan.mkv"
    assert write_video(path, davis_frames, fps=24, codec="ffv1") == 6
    back = read_frames(path)
    assert len(back) == 6
    for a, b in zip(davis_frames, back):
        np.testing.assert_array_equal(a, b)
    info = video_info(path)
    assert (info.width, info.height, info.fps, info.codec) == (480, 270, 24.0, "ffv1")


def test_h264_video_from_bytes_every_and_max_frames(tmp_path, davis_frames):
    path = tmp_path / "blackswan.mp4"
    write_video(path, davis_frames, fps=12)
    data = path.read_bytes()
    got = list(iter_frames(data, every=2))
    assert [i for i, _ in got] == [0, 2, 4]
    for i, f in got:
        assert f.shape == davis_frames[i].shape and f.dtype == np.uint8
        assert np.abs(f.astype(int) - davis_frames[i].astype(int)).mean() < 6   # lossy, but the same picture
    # Frames of a different picture are far apart (so the bound above means something).
    assert np.abs(got[0][1].astype(int) - davis_frames[5][:, ::-1].astype(int)).mean() > 20
    assert len(read_frames(path, max_frames=2)) == 2
    assert video_info(path).fps == 12.0


def test_mask_writer_pads_odd_sizes_and_checks_frames(tmp_path):
    mask = np.zeros((33, 45), np.uint8)
    mask[10:20, 5:30] = 255
    with MaskVideoWriter(tmp_path / "m.mp4", fps=10) as w:
        w.write(mask)
        w.write(255 - mask)
        with pytest.raises(ValueError, match="uint8"):
            w.write(mask.astype(np.float32))
        with pytest.raises(ValueError, match="45x33"):
            w.write(np.zeros((20, 20), np.uint8))
    back = read_frames(tmp_path / "m.mp4")
    assert len(back) == 2 and back[0].shape == (34, 46, 3)
    assert np.abs(back[0][:33, :45, 0].astype(int) - mask).mean() < 8
    assert back[1][15, 15, 0] < 40 and back[1][0, 0, 0] > 215


def test_bad_sources_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_frames(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        read_frames(bad)
    with pytest.raises(VideoDecodeError, match="bytes"):
        read_frames(b"\x00" * 100)


def test_frame_keys_round_trip_and_give_stable_distinct_ids():
    k = frame_key("clips/a.mp4", 12)
    assert k == "clips/a.mp4#00012"
    assert parse_frame_key(k) == ("clips/a.mp4", 12)
    assert parse_frame_key("seq/images/00012.jpg") is None
    assert stable_id(k) != stable_id(frame_key("clips/a.mp4", 13))
    with pytest.raises(ValueError):
        frame_key("a.mp4", -1)


def test_clip_windows_stride_step_and_gaps():
    assert clip_windows(range(6), ClipConfig(3, 2, 1)) == [(0, 1, 2), (2, 3, 4)]
    assert clip_windows(range(7), ClipConfig(3, 2, 1)) == [(0, 1, 2), (2, 3, 4), (4, 5, 6)]
    assert clip_windows(range(10), ClipConfig(3, 4, 2)) == [(0, 2, 4), (4, 6, 8)]
    # A missing frame removes the clips that need it.
    assert clip_windows([0, 1, 2, 4, 5, 6], ClipConfig(3, 1, 1)) == [(0, 1, 2), (4, 5, 6)]
    assert clip_windows([0, 1], ClipConfig(3, 1, 1)) == []
    with pytest.raises(ValueError, match="stride"):
        ClipConfig(3, 0, 1)


def test_assemble_clips_groups_by_sequence_in_frame_order():
    seqs = ["b", "a", "a", "b", "a", "b"]
    frames = [1, 2, 0, 0, 1, 2]
    clips = assemble_clips(seqs, frames, ClipConfig(2, 1, 1))
    # sequence a: rows of frames 0, 1, 2 are 2, 4, 1; sequence b: 3, 0, 5
    assert clips == [[2, 4], [4, 1], [3, 0], [0, 5]]
    with pytest.raises(ValueError, match="still image"):
        assemble_clips(["", "a"], [-1, 0], ClipConfig(2, 1, 1))
    with pytest.raises(ValueError, match="frame 0 twice"):
        assemble_clips(["a", "a"], [0, 0], ClipConfig(2, 1, 1))


def test_count_frames_and_read_frames_at(tmp_path, davis_frames):
    from kd.videoio import count_frames, read_frames_at

    path = tmp_path / "v.mkv"
    write_video(path, davis_frames, fps=24, codec="ffv1")
    assert count_frames(path) == 6
    got = read_frames_at(path, [4, 1, 9])
    assert sorted(got) == [1, 4]                      # 9 is past the end: missing, not an error
    np.testing.assert_array_equal(got[4], davis_frames[4])
    assert read_frames_at(path, []) == {}


def test_read_frames_at_seeks_in_a_long_gop_video_and_matches_decoding_from_the_start(tmp_path, shared_data):
    """H.264 with B-frames and a keyframe every 8 frames: frames read by seeking equal the frames at the same
    decode index when decoding from the start, from a path, bytes and a file object."""
    import av

    from kd import videoio

    paths = sorted((shared_data / "davis2016-dev" / "blackswan" / "images").glob("*.jpg"))[:40]
    frames = [np.asarray(Image.open(p).convert("RGB").resize((160, 96))) for p in paths]
    path = tmp_path / "gop8.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.codec_context.gop_size = 8
        stream.options = {"bf": "2", "keyint_min": "8", "sc_threshold": "0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    reference = dict(iter_frames(path))
    assert len(reference) == 40
    wanted = [35, 29, 31, 39, 44]
    assert videoio._read_frames_seeking(str(path), set(wanted)) is not None   # the seeking path serves it
    for source in (path, path.read_bytes()):
        got = videoio.read_frames_at(source, wanted)
        assert sorted(got) == [29, 31, 35, 39]
        for i in got:
            np.testing.assert_array_equal(got[i], reference[i])
    with open(path, "rb") as f:
        got = videoio.read_frames_at(f, [8, 9, 16])
        np.testing.assert_array_equal(got[16], reference[16])
        np.testing.assert_array_equal(got[8], reference[8])
