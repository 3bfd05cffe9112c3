"""A second-round teacher: the teacher's labels blended with its own distilled student's maps ("born again").

    .venv/bin/python benchmarks/co_teacher.py probe --student runs/ref/weights/kd-sharp-x1c24-c6.fp16.pt
    .venv/bin/python benchmarks/co_teacher.py build --student runs/ref/weights/kd-sharp-x1c24-c6.fp16.pt \\
        --weight 0.2 --output runs/ref/labels-blend-c6-w0.2

Why: the KD student levels off about .006 of ECSSD MAE above its teacher (`reference-runs-30-reading`), so the
teacher is its ceiling. A student distilled on unlabeled images only errs differently from its teacher, and a
blend of the two maps can be better than either: ``sigmoid((1 - w) logit(t) + w logit(s))``, the teacher's map
``t`` and the student's ``s`` (each flip-averaged, at the label size), a weighted mean in logit space. No mask is
used anywhere: a student trained on the blended labels still learns from unlabeled images only.

``probe`` scores the blends on the two validation sets of `benchmarks/teacher_scales.py` (the 311-pair DUTS-TR
hold-out, which CSNet was trained on, and every third DAVIS-2016 frame, which it never saw), with the output
scaled by 2 as well (the reference KD runs learn targets sharpened at s = 0.5, which is that scale), so a blend is
compared with the teacher at the sharpness the students actually learn. ECSSD is not used to choose.

``build`` writes a new label set beside the teacher's (``reference_runs.LABELS``): every row kept, its map
replaced by the blend (the student run on the pool image square-resized to the label size, as the teacher was),
``teacher`` naming both. Then ``reference_runs.py train`` of a run whose labels are that folder
(``reference_runs.CO_LABELS``).

A user gets these labels (up to the stored labels' 8-bit rounding) from the label job, both nets run afresh:
``sodkd label --teacher T.onnx --teacher scfnet_m3:STUDENT.pt tta=hflip ensemble.combine=logit
ensemble.weights=[0.8,0.2]`` (each member's map flip-averaged, then blended: :class:`cluster.teachers.EnsembleConfig`).
``build`` reuses the stored teacher labels instead, which here saves the teacher's 23 minutes over the pool.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "benchmarks"))   # after the repo: its models package wins over benchmarks/models.py

from reference_runs import LABELS, OUT  # noqa: E402

SIZE = 224


def blend(t: np.ndarray, s: np.ndarray, w: float, scale: float = 1.0) -> np.ndarray:
    """``sigmoid(scale ((1 - w) logit(t) + w logit(s)))`` of two probability maps: the label job's logit ensemble
    (:func:`cluster.teachers.teacher.logit_mean`) on stored maps."""
    import torch

    from cluster.teachers.teacher import logit_mean
    return logit_mean([torch.from_numpy(t), torch.from_numpy(s)], (1 - w, w), scale).numpy()


def student(path: str, threads: int):
    from cluster.teachers import build_teacher
    return build_teacher([path], tta="hflip", device="cpu", precision="fp32", input_size=SIZE, threads=threads)


def probe(args) -> None:
    import torch
    import torch.nn.functional as F

    from kd.imageio import decode_image, decode_mask, resize
    from kd.metrics import SODEvaluator
    torch.set_num_threads(args.threads)
    net = student(args.student, args.threads)     # loads the repo's models package before teacher_scales' path
    from teacher_scales import TEACHERS, maps_for, pairs
    for name in ("duts-val", "davis"):
        ps = pairs(name)
        images = [decode_image(p.read_bytes()) for p, _ in ps]
        masks = [decode_mask(m.read_bytes()) for _, m in ps]
        shapes = [m.shape for m in masks]
        tm = [m.astype(np.float32) / 255 for m in maps_for(name, SIZE, images, shapes, args.threads,
                                                           TEACHERS["csnet-x2"])]
        sm = []
        for i in range(0, len(images), 16):
            p = net.predict_tensor(np.stack([resize(im, (SIZE, SIZE)) for im in images[i:i + 16]]))[:, None]
            for j, (h, w) in enumerate(shapes[i:i + 16]):
                sm.append(F.interpolate(p[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy())

        def score(maps):
            ev = SODEvaluator()
            for m, gt in zip(maps, masks):
                ev.step(np.clip(m * 255 + 0.5, 0, 255).astype(np.uint8), gt)
            r = ev.results()
            return f"{r['mae']:.4f} | {r['sm']:.4f} | {r['fm_max']:.4f}"
        print(f"\n| {name}: labels | scale 1: MAE | S | max F | scale 2: MAE | S | max F |\n" + "|---" * 7 + "|")
        print(f"| teacher | {score(tm)} | {score([blend(t, t, 0, 2) for t in tm])} |")
        print(f"| student alone | {score(sm)} | {score([blend(s, s, 0, 2) for s in sm])} |")
        for w in args.weights:
            print(f"| blend w = {w:g} | {score([blend(t, s, w) for t, s in zip(tm, sm)])} | "
                  f"{score([blend(t, s, w, 2) for t, s in zip(tm, sm)])} |", flush=True)


def build(args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cluster import labels as L
    from kd.imageio import decode_image, encode_png, resize
    torch.set_num_threads(args.threads)
    net = student(args.student, args.threads)
    pool = OUT / "data" / "kd-pool"
    out = Path(args.output) / "labels"
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted((Path(args.labels) / "labels").glob("*.parquet"))
    tag = f"blend(w={args.weight:g}):{{}}+{Path(args.student).name}"
    t0, n = time.time(), 0
    for k, shard in enumerate(shards, 1):
        if (out / shard.name).exists():         # resumable: a shard's name is a function of its ids
            continue
        table = pq.read_table(shard)
        rows = table.to_pylist()
        ims = np.stack([resize(decode_image((pool / r["key"]).read_bytes()), (SIZE, SIZE)) for r in rows])
        s = np.concatenate([net.predict_tensor(ims[i:i + 32]).float().numpy() for i in range(0, len(ims), 32)])
        pngs, fg = [], []
        for r, sm in zip(rows, s):
            t = L.decode_label(r)
            if t.shape != sm.shape:
                raise SystemExit(f"{shard.name}: label {r['id']} is {t.shape}, the student's map {sm.shape}")
            b = blend(t, sm, args.weight)
            pngs.append(encode_png(np.clip(b * 255 + 0.5, 0, 255).astype(np.uint8)))
            fg.append(float((b > 0.5).mean()))
        table = table.set_column(table.schema.get_field_index("label_png"), "label_png", pa.array(pngs, pa.binary()))
        table = table.set_column(table.schema.get_field_index("fg_frac"), "fg_frac", pa.array(fg, pa.float32()))
        table = table.set_column(table.schema.get_field_index("teacher"), "teacher",
                                 pa.array([tag.format(r["teacher"]) for r in rows], pa.string()))
        L.write_shard(*L.resolve_root(str(Path(args.output))), L.S.LABELS_DIR, table)
        n += len(rows)
        print(f"shard {k}/{len(shards)}: {n} rows, {n / (time.time() - t0):.1f} images/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="score blends on the validation sets")
    p.add_argument("--student", required=True)
    p.add_argument("--weights", nargs="+", type=float, default=[0.1, 0.2, 0.33, 0.5])
    p.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("build", help="write the blended label set of the KD pool")
    b.add_argument("--student", required=True)
    b.add_argument("--weight", type=float, required=True)
    b.add_argument("--labels", default=str(LABELS), help="the teacher's label set (default: the reference runs')")
    b.add_argument("--output", required=True)
    b.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    probe(args) if args.cmd == "probe" else build(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
