import base64
import re

import numpy as np
from PIL import Image
import io

from kd import report
from kd.metrics import SODEvaluator
from kd.schema import METRIC_KEYS


def _curves(seed):
    rng = np.random.default_rng(seed)
    gt = (rng.random((32, 32)) > 0.6).astype(np.uint8) * 255
    pred = np.clip(gt * 0.7 + rng.random((32, 32)) * 80, 0, 255).astype(np.uint8)
    ev = SODEvaluator()
    ev.step(pred, gt)
    return gt, pred, ev.results(), ev.curves()


def test_html_report_embeds_decodable_figures_and_all_metrics(tmp_path):
    gt, pred, res, curves = _curves(0)
    img = np.stack([gt] * 3, -1)
    panels = report.figure_png(report.panel_figure([{"image": img, "student": pred, "mask": gt}] * 2,
                                                   ["image", "teacher", "student", "mask"]))
    pr = report.figure_png(report.pr_figure({"a": curves, "b": _curves(1)[3]}))
    out = report.write_html(tmp_path / "r.html", "demo <x>", {"student": res}, {"panels": panels, "pr": pr},
                            notes=["n1"], extra={"student": {"params": "0.79M"}})
    text = out.read_text()
    assert "demo &lt;x&gt;" in text and "0.79M" in text
    for k in METRIC_KEYS:
        assert f"<th>{k}</th>" in text
    assert f"{res['mae']:.4f}" in text
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(pngs) == 2
    sizes = [Image.open(io.BytesIO(base64.b64decode(p))).size for p in pngs]
    assert sizes[0][0] > 300 and sizes[1] == (900, 380)
    table = report.metrics_table_text({"student": res})
    assert table.splitlines()[0].split()[0] == "model" and "student" in table
