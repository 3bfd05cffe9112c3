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
