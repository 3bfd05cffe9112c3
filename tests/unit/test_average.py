"""Checkpoint averaging: ``models.soup.average_weights`` and ``sodkd average``."""

from __future__ import annotations

import pytest
import torch

from jobs.cli import main
from models import create_model, load_weights, read_metadata, save_weights
from models.fuse import scale_output
from models.soup import average_weights


def _model(seed: int, name: str = "scfnet_m3", **kw):
    torch.manual_seed(seed)
    m = create_model(name, **kw)
    with torch.no_grad():   # BatchNorm statistics differ between the files too
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    m.input_size = 224
    return m.eval()


def test_the_mean_of_three_files_is_the_mean_of_every_tensor(tmp_path):
    models = [_model(s) for s in (0, 1, 2)]
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"m{i}.pt")
        save_weights(m, paths[-1], extra_meta={"run_name": f"run{i}", "step": 100 * (i + 1)})
    avg, sources = average_weights(paths)
    states = [m.state_dict() for m in models]
    for k, v in avg.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sum(s[k] for s in states) / 3, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(v, states[0][k])
    assert avg.input_size == 224
    assert [s["run_name"] for s in sources] == ["run0", "run1", "run2"] and sources[2]["step"] == 300
    # the mean really differs from each member (a copy of the first file would pass the loop above only by chance)
    w = "heads.0.weight"
    assert not torch.allclose(avg.state_dict()[w], states[0][w])


def test_a_calibrated_member_is_averaged_as_trained(tmp_path):
    a, b = _model(0), _model(1)
    save_weights(a, tmp_path / "a.pt")
    save_weights(b, tmp_path / "b.pt")
    calibrated = _model(1)
    scale_output(calibrated, 2.5)
    save_weights(calibrated, tmp_path / "b-cal.pt", extra_meta={"output_scale": 2.5})
    plain, _ = average_weights([tmp_path / "a.pt", tmp_path / "b.pt"])
    mixed, sources = average_weights([tmp_path / "a.pt", tmp_path / "b-cal.pt"])
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(mixed.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert sources[1]["output_scale"] == 2.5


def test_files_of_another_model_or_size_are_refused_by_name(tmp_path):
    save_weights(_model(0), tmp_path / "a.pt")
    wide = _model(1, channels=32)
    save_weights(wide, tmp_path / "wide.pt")
    other_size = _model(2)
    other_size.input_size = 352
    save_weights(other_size, tmp_path / "big.pt")
    with pytest.raises(ValueError, match=r"wide\.pt: its config"):
        average_weights([tmp_path / "a.pt", tmp_path / "wide.pt"])
    with pytest.raises(ValueError, match=r"big\.pt: its input_size 352"):
        average_weights([tmp_path / "a.pt", tmp_path / "big.pt"])
    with pytest.raises(ValueError, match="at least two"):
        average_weights([tmp_path / "a.pt"])


def test_sodkd_average_writes_a_half_file_with_its_sources(tmp_path, capsys):
    for i in range(2):
        save_weights(_model(i), tmp_path / f"m{i}.pt", half=True, extra_meta={"run_name": f"run{i}"})
    out = tmp_path / "soup.fp16.pt"
    assert main(["average", "--weights", str(tmp_path / "m0.pt"), str(tmp_path / "m1.pt"), "--output", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["dtype"] == "float16" and [s["run_name"] for s in meta["averaged_from"]] == ["run0", "run1"]
    assert all(len(s["sha256"]) == 16 for s in meta["averaged_from"])
    m0, m1, got = (load_weights(p) for p in (tmp_path / "m0.pt", tmp_path / "m1.pt", out))
    w = "heads.0.weight"
    torch.testing.assert_close(got.state_dict()[w], (m0.state_dict()[w] + m1.state_dict()[w]) / 2,
                               rtol=1e-3, atol=1e-3)
    assert "the mean of 2 files of scfnet_m3 at 224 px" in capsys.readouterr().out
    # the output may not overwrite an input; a missing input is a usage error naming it
    assert main(["average", "--weights", str(out), str(tmp_path / "m1.pt"), "--output", str(out)]) != 0
    assert main(["average", "--weights", str(tmp_path / "nope.pt"), str(tmp_path / "m1.pt"),
                 "--output", str(tmp_path / "x.pt")]) != 0
    assert "nope.pt" in capsys.readouterr().err
