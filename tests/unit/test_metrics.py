"""kd.metrics and ``sodkd eval`` against published reference values on real predictions.

- ``metric-reference/pysodmetrics``: the values PySODMetrics publishes for its own 3 test pairs
  (``version_performance.json``, entry v1_4_0), to 1e-6.
- ``metric-reference/soc-icon``: the SOCToolbox figures for ICON on SOC-AC (79 pairs), to the 3 decimals
  printed. They are reproduced by PySODMetrics' defaults: ``mask > 128``, per-image min-max normalisation,
  F and E curves computed per image over 256 thresholds and averaged over images, then mean/max of that
  averaged curve (adaptive: threshold ``min(2 * mean, 1)``, averaged over images).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import cli
from jobs.eval_cmd import evaluate_dirs, pair_files, read_gray
from kd.metrics import SODEvaluator
from kd.schema import METRIC_KEYS

REPO = Path(__file__).resolve().parents[2]

# kd key -> key in PySODMetrics' version_performance.json
PYSOD_KEYS = {"mae": "MAE", "sm": "Smeasure", "wfm": "wFmeasure", "em_adp": "adpEm", "em_mean": "meanEm",
              "em_max": "maxEm", "fm_adp": "adpFm", "fm_mean": "meanFm", "fm_max": "maxFm"}

# SOCToolbox, ICON (trained on DUTS) on SOC-AC, as printed (3 decimals)
SOC_ICON_PUBLISHED = {"sm": 0.832, "wfm": 0.767, "mae": 0.066, "em_adp": 0.872, "em_mean": 0.885,
                      "em_max": 0.895, "fm_adp": 0.782, "fm_mean": 0.793, "fm_max": 0.814}


@pytest.fixture(scope="module")
def pysod_dir(shared_data) -> Path:
    return shared_data / "metric-reference" / "pysodmetrics"


@pytest.fixture(scope="module")
def soc_dir(shared_data) -> Path:
    return shared_data / "metric-reference" / "soc-icon"


@pytest.fixture(scope="module")
def pysod_expected(pysod_dir) -> dict[str, float]:
    published = json.loads((pysod_dir / "version_performance.json").read_text())["v1_4_0"]
    return {k: published[v] for k, v in PYSOD_KEYS.items()}


def assert_matches(got: dict, expected: dict, atol: float) -> None:
    assert list(got) == list(METRIC_KEYS), f"keys {list(got)}"
    bad = {k: (got[k], expected[k]) for k in expected if not abs(got[k] - expected[k]) <= atol}
    assert not bad, "new values (got, expected): " + ", ".join(f"{k}={g!r} vs {e!r}" for k, (g, e) in bad.items())


def test_reproduces_pysodmetrics_published_values(pysod_dir, pysod_expected):
    got = evaluate_dirs(pysod_dir / "preds", pysod_dir / "masks")
    assert all(type(v) is float for v in got.values()), {k: type(v) for k, v in got.items()}
    assert_matches(got, pysod_expected, atol=1e-6)


@pytest.fixture(scope="module")
def soc_cli_run(soc_dir, tmp_path_factory):
    """``sodkd eval`` on SOC-ICON, in-process, once for the module: (exit code, stdout, JSON report)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("soc") / "nested" / "icon.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["eval", "--pred", str(soc_dir / "preds"), "--gt", str(soc_dir / "masks"),
                       "--json", str(out)])
    return rc, buf.getvalue(), json.loads(out.read_text()) if out.exists() else None


def test_reproduces_soctoolbox_icon_on_soc_ac(soc_cli_run):
    rc, _, report = soc_cli_run
    assert rc == 0
    got = report["metrics"]
    assert list(got) == list(METRIC_KEYS)
    assert {k: round(v, 3) for k, v in got.items()} == SOC_ICON_PUBLISHED, f"new values {got}"


def test_published_f_is_the_per_image_f_curve_not_the_f_of_the_mean_pr_curve(soc_dir, soc_cli_run):
    """Pins down which F the SOCToolbox figures are: the F of the averaged PR curve gives other numbers."""
    ev = SODEvaluator()
    for pred, gt in pair_files(soc_dir / "preds", soc_dir / "masks").pairs:
        ev.step(read_gray(pred), read_gray(gt))
    res, cur = ev.results(), ev.curves()
    assert res == soc_cli_run[2]["metrics"], "the library function and the CLI disagree"
    assert cur["precision"].shape == cur["recall"].shape == cur["fmeasure"].shape == (256,)
    assert np.isclose(cur["fmeasure"].mean(), res["fm_mean"]) and np.isclose(cur["fmeasure"].max(), res["fm_max"])
    assert np.isclose(cur["emeasure"].max(), res["em_max"])
    # ascending thresholds: recall falls from 1 (threshold 0 keeps every pixel) and never rises
    assert cur["recall"][0] == 1.0 and np.all(np.diff(cur["recall"]) <= 1e-12)
    p, r = cur["precision"], cur["recall"]
    f_of_mean_pr = 1.3 * p * r / np.maximum(0.3 * p + r, 1e-12)
    assert (round(f_of_mean_pr.mean(), 3), round(f_of_mean_pr.max(), 3)) == (0.810, 0.836), \
        f"new F-of-mean-PR values {f_of_mean_pr.mean()}, {f_of_mean_pr.max()}"


def test_cli_prints_counts_and_metrics_and_writes_json(soc_cli_run):
    rc, printed, report = soc_cli_run
    assert rc == 0
    assert "evaluated 79 pairs (0 predictions without mask, 0 masks without prediction)" in printed
    assert "  fm_max  0.8137" in printed and "wrote " in printed, printed
    assert report["num_images"] == 79 and report["unmatched_pred"] == report["unmatched_gt"] == 0


def test_cli_subprocess_on_pysodmetrics_reference(pysod_dir, pysod_expected, tmp_path):
    out = tmp_path / "pysod.json"
    exe = REPO / ".venv" / "bin" / "sodkd"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jobs.cli"]
    proc = subprocess.run(cmd + ["eval", "--pred", str(pysod_dir / "preds"), "--gt", str(pysod_dir / "masks"),
                                 "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "evaluated 3 pairs" in proc.stdout
    assert_matches(json.loads(out.read_text())["metrics"], pysod_expected, atol=1e-6)


def test_unmatched_files_are_counted_and_predictions_resized(soc_dir, tmp_path, capsys):
    preds, masks = tmp_path / "preds", tmp_path / "masks"
    preds.mkdir()
    masks.mkdir()
    names = sorted(p.name for p in (soc_dir / "preds").iterdir())[:4]
    for i, name in enumerate(names):
        if i < 3:  # 3 predictions, stored at half size to force the resize
            img = Image.open(soc_dir / "preds" / name)
            img.resize((img.width // 2, img.height // 2), Image.BILINEAR).save(preds / name)
        if i > 0:  # 3 masks, the first missing and the last without prediction
            shutil.copy(soc_dir / "masks" / name, masks / name)
    rc = cli.main(["eval", "--pred", str(preds), "--gt", str(masks)])
    assert rc == 0
    assert "evaluated 2 pairs (1 predictions without mask, 1 masks without prediction)" in capsys.readouterr().out
    small = evaluate_dirs(preds, masks)
    full = SODEvaluator()
    for name in names[1:3]:
        full.step(read_gray(soc_dir / "preds" / name), read_gray(soc_dir / "masks" / name))
    diffs = {k: abs(small[k] - v) for k, v in full.results().items()}
    assert max(diffs.values()) < 0.03, f"half-size predictions drift too far: {diffs}"


def test_no_match_and_missing_dir_are_clear_errors(pysod_dir, soc_dir, tmp_path, capsys):
    preds, masks = re.escape(str(soc_dir / "preds")), re.escape(str(pysod_dir / "masks"))
    pattern = f"no prediction in {preds} has a mask .* in {masks}"
    with pytest.raises(ValueError, match=pattern):
        evaluate_dirs(soc_dir / "preds", pysod_dir / "masks")
    with pytest.raises(FileNotFoundError, match="mask directory .*nowhere does not exist"):
        evaluate_dirs(pysod_dir / "preds", tmp_path / "nowhere")
    rc = cli.main(["eval", "--pred", str(tmp_path), "--gt", str(pysod_dir / "masks")])
    assert rc == 2
    assert f"prediction directory {tmp_path} holds no images" in capsys.readouterr().err


def test_rgb_mask_with_equal_channels_reads_as_grayscale(soc_dir):
    path = sorted((soc_dir / "masks").iterdir())[0]
    with Image.open(path) as img:
        assert img.mode == "RGB"
        rgb = np.asarray(img)
    gray = read_gray(path)
    assert gray.shape == rgb.shape[:2] and np.array_equal(gray, rgb[..., 0])


def test_evaluator_on_synthetic_maps():
    gt = np.zeros((20, 30), np.uint8)
    gt[5:15, 10:20] = 255
    ev = SODEvaluator()
    ev.step(gt.copy(), gt)
    perfect = ev.results()
    assert perfect["mae"] == 0.0 and perfect["fm_max"] == pytest.approx(1.0) and perfect["sm"] == pytest.approx(1.0)
    # a prediction of another size is resized to the mask's size
    ev2 = SODEvaluator()
    ev2.step(np.asarray(Image.fromarray(gt).resize((60, 40), Image.BILINEAR)), gt)
    assert ev2.results()["mae"] < 0.05 and ev2.count == 1
    with pytest.raises(ValueError, match="no images evaluated"):
        SODEvaluator().results()
    with pytest.raises(ValueError, match="pred must be uint8"):
        SODEvaluator().step(gt.astype(np.float32), gt)
    with pytest.raises(ValueError, match="gt must be a 2-D grayscale map"):
        SODEvaluator().step(gt, np.stack([gt] * 3, axis=-1))
