"""Output calibration: the scale folded into the finest head is exact, the choice follows MAE under the S guard, and
``sodkd calibrate`` writes a file that runs calibrated and says so in its header."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO, copy_sample, spread_student
from jobs.cli import main
from kd.calibration import choose_output_scale, to_logits
from models import extra_metadata, load_weights, read_metadata, save_weights
from models.fuse import scale_output


def test_scale_output_multiplies_the_finest_logits_and_nothing_else():
    m = spread_student(64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = [o.clone() for o in m(x)]
        scale_output(m, 2.5)
        after = m(x)
        p = m.predict(x)
    torch.testing.assert_close(after[0], 2.5 * before[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(after[1:], before[1:]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(p, torch.sigmoid(2.5 * before[0]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scale must be > 0"):
        scale_output(m, 0.0)
    with pytest.raises(ValueError, match="no conv head"):
        scale_output(torch.nn.Conv2d(3, 1, 3), 2.0)


def _maps(sign: float, n: int = 6, size: int = 32):
    """Masks with a centred square and logits of magnitude 0.5 that agree with them (sign +1) or contradict them
    (sign -1) on every pixel but a border of doubt."""
    rng = np.random.default_rng(0)
    masks, logits = [], []
    for _ in range(n):
        m = np.zeros((size, size), np.uint8)
        a = int(rng.integers(6, 12))
        m[a:size - a, a:size - a] = 255
        z = np.where(m > 128, 0.5, -0.5) * sign + rng.normal(0, 0.05, m.shape)
        masks.append(m)
        logits.append(torch.as_tensor(z, dtype=torch.float32))
    return logits, masks


def test_choice_follows_mae():
    logits, masks = _maps(+1.0)
    free = choose_output_scale(logits, masks, scales=(1, 2, 4), max_s_drop=1.0)
    assert free.scale == 4 and free.after["mae"] < free.metrics[2.0]["mae"] < free.before["mae"]
    assert "(chosen)" in free.table() and free.table().count("\n") == 4
    wrong = choose_output_scale(*_maps(-1.0), scales=(1, 2, 4), max_s_drop=1.0)
    assert wrong.scale == 1.0                 # sharpening a map that is wrong only makes it more wrong
    with pytest.raises(ValueError, match="2 maps for 6 masks"):
        choose_output_scale(logits[:2], masks)
    with pytest.raises(ValueError, match="scales must be > 0"):
        choose_output_scale(logits, masks, scales=(1, -2))
    with pytest.raises(ValueError, match="max_s_drop"):
        choose_output_scale(logits, masks, max_s_drop=-0.1)
    torch.testing.assert_close(to_logits(torch.sigmoid(torch.tensor([-3.0, 0.0, 2.0]))),
                               torch.tensor([-3.0, 0.0, 2.0]), rtol=1e-4, atol=1e-4)


def test_sodkd_calibrate_writes_a_calibrated_file_and_skips_a_corrupt_pair(tmp_path, shared_data, capsys):
    """The shipped fast student (its calibration undone) on 12 real DUTS-TR pairs: pure MAE takes the largest scale and pays S for it; the
    default guard takes a smaller one within 0.005 of S; the written file runs calibrated."""
    val = tmp_path / "val"
    for im in copy_sample(shared_data / "duts-tr" / "images", val / "images", 12, "*.jpg"):
        copy_sample(shared_data / "duts-tr" / "masks", val / "masks", 1, im.stem + ".png")
    (val / "images" / "zz-broken.jpg").write_bytes(b"not a jpeg")
    (val / "masks" / "zz-broken.png").write_bytes(next((val / "masks").glob("*.png")).read_bytes())
    shipped = REPO / "weights" / "kd-scfnet_m3-x0.3-c8-from-csnet-L-x2.fp16.pt"      # calibrated: undo it first
    meta = read_metadata(shipped)
    src = tmp_path / "as-trained.pt"
    save_weights(scale_output(load_weights(shipped), 1.0 / meta.get("output_scale", 1.0)), src,
                 extra_meta={k: v for k, v in extra_metadata(meta).items() if k not in ("output_scale", "calibration")},
                 half=True)
    free, guarded, out = tmp_path / "free.json", tmp_path / "guarded.json", tmp_path / "cal.pt"
    assert main(["calibrate", "--weights", str(src), "--val", str(val), "--json", str(free),
                 "--scales", "1,2,6", "--max-s-drop", "1"]) == 0
    assert main(["calibrate", "--weights", str(src), "--val", str(val), "--json", str(guarded),
                 "--scales", "1,2,6", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zz-broken.jpg" in printed and "| 6" in printed and f"wrote {out}" in printed
    free, rec = json.loads(free.read_text()), json.loads(guarded.read_text())
    assert free["scale"] == 6 and free["sm_after"] < free["sm_before"] - 0.005 < free["sm_after"] + 0.05
    assert 1 < rec["scale"] < 6 and rec["sm_after"] >= rec["sm_before"] - 0.005
    assert free["mae_after"] < rec["mae_after"] < rec["mae_before"]
    assert rec["pairs"] == 12 and rec["skipped"] == ["images/zz-broken.jpg"]
    before, meta = read_metadata(src), read_metadata(out)
    assert meta["output_scale"] == before.get("output_scale", 1.0) * rec["scale"]
    assert meta["run_name"] == before["run_name"] and meta["calibration"]["pairs"] == 12
    assert meta["input_size"] == before["input_size"] and meta["dtype"] == "float16"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        z = load_weights(src)(x)[0]
        torch.testing.assert_close(load_weights(out).predict(x), torch.sigmoid(rec["scale"] * z),
                                   rtol=2e-3, atol=2e-3)      # the file is fp16: the scaled head is rounded
    assert main(["calibrate", "--weights", str(src), "--val", str(val), "--output", str(src)]) != 0
    assert "the same file as --weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--weights", str(src), "--val", str(val), "--scales", "1,0"])
    assert "numbers > 0" in capsys.readouterr().err
