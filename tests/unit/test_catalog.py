import io

import numpy as np
import pytest
from PIL import Image

from cluster import catalog
from kd.imageio import ImageDecodeError, decode_image, decode_mask
from kd.schema import stable_id


def test_paired_unlabeled_and_video_layouts(shared_data):
    pairs = catalog.paired_folder(str(shared_data / "ecssd"), limit=5)
    assert len(pairs) == 5
    for it in pairs.items:
        assert it.key.startswith("images/") and it.mask_path.endswith(it.key.split("/")[-1].rsplit(".", 1)[0] + ".png")
    unl = catalog.image_folder(str(shared_data / "unlabeled" / "imagenet-1k"))
    assert len(unl) == 1000 and len({i.id for i in unl.items}) == 1000
    vid = catalog.video_folders(str(shared_data / "davis2016-dev"), sequences=["blackswan"], max_frames=4)
    assert [i.frame for i in vid.items] == [0, 1, 2, 3]
    assert all(i.sequence == "blackswan" and i.mask_path for i in vid.items)


def test_ids_depend_only_on_relative_key(tmp_path, shared_data):
    src = shared_data / "ecssd" / "images" / "0001.jpg"
    for root in ("a", "b"):
        (tmp_path / root / "sub").mkdir(parents=True)
        (tmp_path / root / "sub" / "x.jpg").write_bytes(src.read_bytes())
    ids = [catalog.image_folder(str(tmp_path / r)).items[0].id for r in ("a", "b")]
    assert ids[0] == ids[1] == stable_id("sub/x.jpg")


def test_missing_folders_and_masks_are_named(tmp_path, shared_data):
    with pytest.raises(FileNotFoundError, match="nope"):
        catalog.image_folder(str(tmp_path / "nope"))
    (tmp_path / "p" / "images").mkdir(parents=True)
    (tmp_path / "p" / "masks").mkdir()
    (tmp_path / "p" / "images" / "x.jpg").write_bytes((shared_data / "ecssd" / "images" / "0001.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match="have no mask"):
        catalog.paired_folder(str(tmp_path / "p"))
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        catalog.image_folder("gs://bucket/x")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_converts_odd_modes_and_rejects_with_reasons(shared_data):
    rgb = Image.open(shared_data / "ecssd" / "images" / "0001.jpg").convert("RGB")
    cases = {
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray": _encode(rgb.convert("L"), "PNG"),
        "palette": _encode(rgb.convert("P"), "PNG"),
        "rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "16bit": _encode(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).convert("I;16"), "PNG"),
    }
    for name, data in cases.items():
        out = decode_image(data)
        assert out.dtype == np.uint8 and out.shape == (rgb.height, rgb.width, 3), name
        assert out.mean() > 20, name  # not blank
    jpeg = _encode(rgb, "JPEG")
    for data, reason in [(b"", "empty"), (b"hello world", "not_an_image"), (jpeg[: len(jpeg) // 2], "truncated")]:
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data)
        assert err.value.reason == reason
    mask = decode_mask((shared_data / "ecssd" / "masks" / "0001.png").read_bytes())
    assert mask.ndim == 2 and set(np.unique(mask)) <= set(range(256))


# --- keys are data, every input accounted for (issue 13) ---------------------------------------------------

import errno  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from cluster import storage  # noqa: E402
from kd.config import ConfigError  # noqa: E402
from kd.imageio import oriented_size  # noqa: E402

ODD_NAMES = ["back\\slash.jpg", "sp ace.jpg", "ünï😀.jpg", "a..b.jpg", "x..jpg", "nfd\u0065\u0301.jpg", "x.JPG"]


def _jpeg(color=(200, 30, 30), size=(24, 16)) -> bytes:
    return _encode(Image.new("RGB", size, color), "JPEG")


def test_local_keys_are_the_names_on_disk_byte_for_byte(tmp_path):
    root = tmp_path / "in"
    (root / "sub dir").mkdir(parents=True)
    for i, name in enumerate(ODD_NAMES):
        (root / "sub dir" / name).write_bytes(_jpeg((i * 30, 10, 10)))
    (root / "sub dir" / "..jpg").write_bytes(_jpeg())    # a hidden name (starts with "."): counted, not read
    cat = catalog.image_folder(str(root))
    assert sorted(i.key for i in cat.items) == sorted(f"sub dir/{n}" for n in ODD_NAMES)
    assert cat.ignored == {"hidden": 1} and not cat.rejected
    for it in cat.items:
        assert it.id == stable_id(it.key) and it.path == storage.join(cat.root, it.key)
        assert storage.read_bytes(cat.fs, storage.join(cat.root, it.key)) == (root / it.key).read_bytes()
    # one file as the input: its folder is the root, its name the key (the path read is root/key)
    single = catalog.image_folder(str(root / "sub dir" / "sp ace.jpg"))
    assert [i.key for i in single.items] == ["sp ace.jpg"]
    assert storage.join(single.root, "sp ace.jpg") == str(root / "sub dir" / "sp ace.jpg")


def test_rel_cuts_the_root_and_normalises_nothing():
    assert catalog._rel("bkt/in", "bkt/in/../../escape.jpg") == "../../escape.jpg"
    assert catalog._rel("bkt/in", "bkt/in//lead.jpg") == "/lead.jpg"
    assert catalog._rel("bkt/in/", "bkt/in/./dot.jpg") == "./dot.jpg"
    assert storage.join("bkt/in", "/lead.jpg") == "bkt/in//lead.jpg"
    assert storage.join("bkt/in", "../x.jpg") == "bkt/in/../x.jpg"
    with pytest.raises(ValueError, match="not under"):
        catalog._rel("bkt/in", "bkt/other/x.jpg")


def test_every_local_entry_is_an_item_a_reject_or_counted(tmp_path):
    root = tmp_path / "in"
    (root / "real_dir").mkdir(parents=True)
    (root / "ok.jpg").write_bytes(_jpeg())
    (root / "real_dir" / "deep.png").write_bytes(_encode(Image.new("RGB", (8, 8)), "PNG"))
    os.symlink("nowhere.jpg", root / "broken.jpg")
    os.symlink("ok.jpg", root / "good_link.jpg")
    os.symlink("real_dir", root / "dir_link")
    os.mkfifo(root / "fifo.jpg")
    os.mkfifo(root / "pipe")
    (root / "notes.txt").write_text("hello")
    (root / "README").write_text("hello")
    (root / ".hidden.jpg").write_bytes(_jpeg())
    cat = catalog.image_folder(str(root))
    assert sorted(i.key for i in cat.items) == ["good_link.jpg", "ok.jpg", "real_dir/deep.png"]
    assert {it.key: reason for it, reason, _ in cat.rejected} == {
        "broken.jpg": "broken_link", "dir_link": "linked_dir", "fifo.jpg": "special_file", "pipe": "special_file"}
    assert all(detail for _, _, detail in cat.rejected)
    assert cat.ignored == {".txt": 1, "no_extension": 1, "hidden": 1}
    entries = sum(len(files) + len([d for d in dirs if (Path(top) / d).is_symlink()])
                  for top, dirs, files in os.walk(root))
    assert len(cat.items) + len(cat.rejected) + sum(cat.ignored.values()) == entries == 10
    # reading a FIFO raises at once instead of blocking on it
    with pytest.raises(IsADirectoryError, match="FIFO"):
        storage.read_bytes(cat.fs, str(root / "fifo.jpg"))


def test_video_layout_counts_masks_and_stray_files(tmp_path):
    root = tmp_path / "v"
    for seq in ("a", "b"):
        (root / seq / "images").mkdir(parents=True)
        (root / seq / "masks").mkdir()
        for f in range(2):
            (root / seq / "images" / f"{f:05d}.jpg").write_bytes(_jpeg())
            (root / seq / "masks" / f"{f:05d}.png").write_bytes(_encode(Image.new("L", (24, 16)), "PNG"))
    (root / "stray.jpg").write_bytes(_jpeg())
    (root / "a" / "notes.txt").write_text("x")
    os.symlink("gone.jpg", root / "b" / "images" / "00009.jpg")
    cat = catalog.video_folders(str(root))
    assert [(i.sequence, i.frame, i.key) for i in cat.items] == [
        (s, f, f"{s}/images/{f:05d}.jpg") for s in ("a", "b") for f in range(2)]
    assert all(i.mask_path and i.mask_path.endswith(f"{i.frame:05d}.png") for i in cat.items)
    assert [(it.key, r) for it, r, _ in cat.rejected] == [("b/images/00009.jpg", "broken_link")]
    assert cat.ignored == {"mask": 4, "outside_sequence": 1, ".txt": 1}


def test_exif_orientation_is_applied_and_size_is_the_displayed_one():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))        # stored left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6                                  # display: rotate 90 degrees clockwise
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    out = decode_image(data)
    assert out.shape == (40, 20, 3) and oriented_size(data) == (40, 20)
    top, bottom = out[:18].reshape(-1, 3).mean(0), out[22:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top           # the stored left side is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    plain = _encode(stored, "JPEG")
    assert decode_image(plain).shape == (20, 40, 3) and oriented_size(plain) == (20, 40)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 12), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.n_frames == 3
    out = decode_image(buf.getvalue())
    assert out.shape == (12, 16, 3)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 30


def test_transient_errors_are_told_from_final_ones():
    transient = [
        OSError("When reading information for key 'a.jpg' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "HeadObject operation: curlCode: 7, Could not connect to server"),
        OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."),
        OSError("AWS Error SLOW_DOWN during ListObjectsV2 operation: Please reduce your request rate."),
        OSError(errno.EIO, "Input/output error"), ConnectionResetError(), TimeoutError(),
        storage.TransientError("s3://b/a.jpg: EndpointConnectionError"),
    ]
    final = [FileNotFoundError(errno.ENOENT, "Path does not exist"), PermissionError(errno.EACCES, "denied"),
             IsADirectoryError(errno.EISDIR, "FIFO"), OSError("AWS Error ACCESS_DENIED during GetObject"),
             ValueError("x"), ImageDecodeError("truncated")]
    assert [storage.is_transient(e) for e in transient] == [True] * len(transient)
    assert [storage.is_transient(e) for e in final] == [False] * len(final)


def test_retrying_retries_transient_errors_only_and_gives_up():
    calls, seen = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    retry = storage.RetryConfig(attempts=4, delay_s=0.0, max_delay_s=0.0)
    assert storage.retrying(flaky, retry, "flaky", on_retry=seen.append) == "ok"
    assert len(calls) == 3 and len(seen) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retrying(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError("gone")), retry, "x")
    assert len(calls) == 1                                  # a final error is not retried
    with pytest.raises(TimeoutError):
        storage.retrying(lambda: calls.append(1) or (_ for _ in ()).throw(TimeoutError()), retry, "x")
    assert len(calls) == 1 + 4                              # transient: every attempt, then the last error


def test_retry_and_s3_settings_are_validated_with_their_key():
    for kw, key in [({"attempts": 0}, "retry.attempts"), ({"delay_s": float("nan")}, "retry.delay_s"),
                    ({"max_delay_s": float("inf")}, "retry.max_delay_s"),
                    ({"delay_s": 2.0, "max_delay_s": 1.0}, "retry.max_delay_s")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            storage.RetryConfig(**kw)
    with pytest.raises(ConfigError, match=r"s3\.request_attempts"):
        storage.S3Config(request_attempts=0)
    delays = [storage.RetryConfig(delay_s=1.0, max_delay_s=4.0).delay(a) for a in range(2, 7)]
    assert all(lo <= d <= hi for d, lo, hi in zip(delays, [0.5, 1, 2, 2, 2], [1, 2, 4, 4, 4]))
