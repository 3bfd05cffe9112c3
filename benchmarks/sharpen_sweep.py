"""How ``kd.sharpen`` is chosen: the teacher's maps sharpened to ``sigmoid(logit(t) / s)``, scored against masks.

    .venv/bin/python benchmarks/sharpen_sweep.py --set duts-val [--section kd-sharpen]

The teacher (CSNet-L-x2 + h-flip TTA with its card, the reference students' teacher) runs once through
``cluster.evaluate`` on the chosen labelled set; its maps (at the masks' size) are then sharpened with
:func:`kd.step.sharpen_target` for each ``s`` (1 = as is, 0 = the hard map ``t > 0.5``) and scored with
PySODMetrics. The choice is made on the DUTS-TR hold-out (``runs/ref/data/duts-val``, 311 pairs, the
reference runs' validation set), never on ECSSD, which is the test set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from reference_runs import DATA, OUT, TEACHER_NAME, TEACHERS, score_teacher, write_results  # noqa: E402

SHARPNESS = (1.0, 0.75, 0.5, 0.33, 0.25, 0.0)
SETS = {"duts-val": OUT / "data" / "duts-val", "ecssd": DATA / "ecssd"}


def sweep(root: Path, threads: int) -> list[tuple[float, dict]]:
    import torch

    from cluster import storage
    from cluster.catalog import paired_folder
    from kd.imageio import decode_mask
    from kd.metrics import SODEvaluator
    from kd.step import sharpen_target
    cat = paired_folder(str(root))
    keys = [it.key for it in cat.items]
    res = score_teacher(TEACHERS["csnet-x2"], cat, None, tta="hflip", threads=threads, keep_samples=True)
    masks = {it.key: decode_mask(storage.read_bytes(cat.fs, it.mask_path)) for it in cat.items}
    out = []
    for s in SHARPNESS:
        ev = SODEvaluator()
        for k in keys:
            t = torch.from_numpy(res["samples"][k].astype(np.float32) / 255.0)
            ev.step((sharpen_target(t, s).numpy() * 255).round().astype(np.uint8), masks[k])
        out.append((s, {**ev.results(), "count": len(keys)}))
        print(s, {m: round(out[-1][1][m], 4) for m in ("mae", "sm", "fm_max", "em_mean")}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=sorted(SETS), default="duts-val")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--section", default=None, help="write this RESULTS.md section")
    args = ap.parse_args()
    rows = sweep(SETS[args.set], args.threads)
    if not args.section:
        return
    n = rows[0][1]["count"]
    lines = [f"## Sharpened teacher targets: choosing `kd.sharpen` on the {args.set} set ({n} pairs)", "",
             f"`benchmarks/sharpen_sweep.py --set {args.set}`: {TEACHER_NAME} (its card, 224 px) once, its maps "
             "sharpened to `sigmoid(logit(t) / s)` (`kd.step.sharpen_target`; s = 0 is the hard map t > 0.5) and "
             "scored with PySODMetrics at the masks' size.", "",
             "| s | MAE | S | max F | mean E |", "|---|---|---|---|---|"]
    for s, m in rows:
        lines.append(f"| {s:g} | {m['mae']:.4f} | {m['sm']:.4f} | {m['fm_max']:.4f} | {m['em_mean']:.4f} |")
    write_results(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
