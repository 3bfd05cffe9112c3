"""Pictures people would rather see than read: saliency panels, PR curves, and an HTML report holding both.

Pure matplotlib + NumPy, so jobs can log the same figures to MLflow and write them into a self-contained
HTML file (images embedded as base64, opens anywhere without a server).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kd.schema import METRIC_KEYS  # noqa: E402


def panel_figure(rows: Sequence[Mapping[str, np.ndarray]], columns: Sequence[str], title: str = ""):
    """A grid: one row per image, one column per named map (``image`` RGB, others HxW uint8 or float)."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, col in enumerate(columns):
            ax = axes[r][c]
            ax.axis("off")
            if col not in row:
                continue
            arr = row[col]
            ax.imshow(arr, cmap=None if arr.ndim == 3 else "gray", vmin=0, vmax=255 if arr.dtype == np.uint8 else 1)
            if r == 0:
                ax.set_title(col, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def pr_figure(curves: Mapping[str, Mapping[str, np.ndarray]], title: str = "Precision-recall"):
    """PR curves (and F-measure against threshold) of several models on one set."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for name, c in curves.items():
        ax1.plot(c["recall"], c["precision"], label=name, lw=1.5)
        ax2.plot(c["thresholds"], c["fmeasure"], label=name, lw=1.5)
    ax1.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax2.set(xlabel="threshold", ylabel="F-measure (beta^2 = 0.3)", xlim=(0, 255), ylim=(0, 1.01), title="F vs threshold")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def metrics_table_text(results: Mapping[str, Mapping[str, float]], extra: Mapping[str, Mapping[str, str]] | None = None
                       ) -> str:
    """A fixed-width table: one row per model, the nine metric columns (plus optional extra columns)."""
    extra_cols = sorted({k for v in (extra or {}).values() for k in v})
    head = f"{'model':28s}" + "".join(f"{c:>10s}" for c in extra_cols) + "".join(f"{k:>9s}" for k in METRIC_KEYS)
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        ex = (extra or {}).get(name, {})
        lines.append(f"{name:28s}" + "".join(f"{ex.get(c, ''):>10s}" for c in extra_cols)
                     + "".join(f"{m[k]:9.4f}" for k in METRIC_KEYS))
    return "\n".join(lines)


def write_html(path: str | Path, title: str, results: Mapping[str, Mapping[str, float]],
               figures: Mapping[str, bytes], notes: Sequence[str] = (),
               extra: Mapping[str, Mapping[str, str]] | None = None) -> Path:
    """A self-contained HTML report: notes, a metrics table, and PNG figures embedded inline."""
    extra_cols = sorted({k for v in (extra or {}).values() for k in v})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["model", *extra_cols, *METRIC_KEYS])
    rows = []
    for name, m in results.items():
        ex = (extra or {}).get(name, {})
        cells = [html.escape(name), *(html.escape(ex.get(c, "")) for c in extra_cols),
                 *(f"{m[k]:.4f}" for k in METRIC_KEYS)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    figs = "".join(
        f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'/>" for caption, png in figures.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #eee}}</style></head>
<body><h1>{html.escape(title)}</h1><ul>{notes_html}</ul>
<h2>Metrics (MAE lower is better; others higher)</h2><table><tr>{head}</tr>{''.join(rows)}</table>
{figs}</body></html>"""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(doc)
    return p
