"""Where the distilled student's error comes from: its fit to the teacher on images it learnt from, against its
fit to the teacher and to the masks on images it never saw.

    .venv/bin/python benchmarks/kd_gap.py --student kd=weights/kd-scfnet_m3-from-csnet-L-x2.fp16.pt \\
        --student fs=weights/fs-scfnet_m3.fp16.pt --section kd-gap

Sets (the reference runs' data, ``benchmarks/reference_runs.py prepare``): ``pool`` = 1,000 images of the KD pool
drawn with a fixed seed (the KD student learnt from every one of them; the stored teacher labels are the
reference), ``hold-out`` = the 311 DUTS-TR pairs no student learnt from, ``ecssd`` = full ECSSD (1,000 pairs).
Everything is compared at 224 x 224 on the square-resized image, the way the labels were made and the students
trained: MAE(student, teacher) is the student's *fit* to what it distils, MAE(student, mask) and MAE(teacher,
mask) its and the teacher's error (at 224, so a little off the full-size figures of the reference tables).

Reading: if the student fits the teacher on pool images about as badly as on unseen ones, it cannot follow the
teacher even where it was shown the answer (capacity or steps are the limit); if it fits pool images much better,
what it learnt does not carry to new images (data is the limit). The teacher's maps of the hold-out and ECSSD
are cached in ``runs/ref/teacher-maps-224.npz`` (CSNet-L-x2 + flip TTA, several minutes on one core).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "benchmarks"))   # after the repo: its models package wins over benchmarks/models.py

import reference_runs as R  # noqa: E402  (paths and the teacher spec of the reference runs)

SIZE = 224


def _images(paths: list[Path]) -> np.ndarray:
    from kd.imageio import decode_image, resize
    return np.stack([resize(decode_image(p.read_bytes()), (SIZE, SIZE)) for p in paths])


def _masks(paths: list[Path]) -> np.ndarray:
    from kd.imageio import decode_mask, resize
    return np.stack([resize(decode_mask(p.read_bytes()), (SIZE, SIZE)) for p in paths])


def _mae(a: np.ndarray, b: np.ndarray, batch: int = 64) -> float:
    """Mean |a - b| of two uint8 (0..255) or float (0..1) stacks, in 0..1, a batch at a time (bounded memory)."""
    def f(x):
        return x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32)
    total = sum(float(np.abs(f(a[i:i + batch]) - f(b[i:i + batch])).sum()) for i in range(0, len(a), batch))
    return total / a.size


def _predict(teacher, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """uint8 maps (N, 224, 224): a probability stack kept at the precision of a stored label."""
    return np.concatenate([(teacher.predict(images[i:i + batch]) * 255).round().astype(np.uint8)
                           for i in range(0, len(images), batch)])


def load_sets(pool_count: int, seed: int = 0) -> dict[str, dict]:
    """name -> {keys, images (N, 224, 224, 3), masks (N, 224, 224) or None, teacher (pool: its stored labels)},
    every array uint8."""
    from cluster.labels import decode_label, read_labels
    from kd import schema as S
    from kd.imageio import resize
    table = read_labels(str(R.LABELS), columns=[S.KEY, S.LABEL_PNG])
    rows = dict(zip(table.column(S.KEY).to_pylist(), table.column(S.LABEL_PNG).to_pylist()))
    keys = sorted(rows)
    keys = [keys[i] for i in np.random.default_rng(seed).choice(len(keys), pool_count, replace=False)]
    pool_root = R.OUT / "data" / "kd-pool"
    labels = np.stack([resize((decode_label(rows[k]) * 255).round().astype(np.uint8), (SIZE, SIZE)) for k in keys])
    sets = {"pool": {"keys": keys, "images": _images([pool_root / k for k in keys]), "masks": None,
                     "teacher": labels}}
    for name, root in (("hold-out", R.OUT / "data" / "duts-val"), ("ecssd", R.DATA / "ecssd")):
        ims = sorted((root / "images").glob("*.jpg"))
        sets[name] = {"keys": [p.stem for p in ims], "images": _images(ims),
                      "masks": _masks([root / "masks" / (p.stem + ".png") for p in ims])}
    return sets


def teacher_maps(sets: dict[str, dict], threads: int) -> None:
    """Fill ``teacher`` of the hold-out and ECSSD sets from the cache, or run CSNet-L-x2 + flip TTA at 224."""
    from cluster.teachers import build_teacher
    cache = R.OUT / "teacher-maps-224.npz"
    stored = dict(np.load(cache)) if cache.exists() else {}
    teacher = None
    for name in ("hold-out", "ecssd"):
        if name in stored and len(stored[name]) == len(sets[name]["keys"]):
            sets[name]["teacher"] = stored[name]
            continue
        if teacher is None:
            teacher = build_teacher(R.TEACHERS["csnet-x2"], tta="hflip", device="cpu", precision="fp32",
                                    input_size=SIZE, threads=threads)
        t0 = time.perf_counter()
        maps = _predict(teacher, sets[name]["images"])
        print(f"teacher on {name}: {len(maps)} images in {time.perf_counter() - t0:.0f} s", flush=True)
        stored[name] = sets[name]["teacher"] = maps
        np.savez_compressed(cache, **stored)


def gap(students: dict[str, str], sets: dict[str, dict], threads: int) -> dict[str, dict[str, dict[str, float]]]:
    """student -> set -> {fit: MAE(student, teacher), mae: MAE(student, mask), teacher_mae: MAE(teacher, mask)}."""
    from cluster.teachers import build_teacher
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, path in students.items():
        net = build_teacher(f"scfnet_m3:{path}", device="cpu", precision="fp32", input_size=SIZE, threads=threads)
        out[label] = {}
        for name, s in sets.items():
            pred = _predict(net, s["images"])
            r = {"fit": _mae(pred, s["teacher"])}
            if s["masks"] is not None:
                r["mae"] = _mae(pred, s["masks"])
                r["teacher_mae"] = _mae(s["teacher"], s["masks"])
            out[label][name] = r
    return out


def stride_floor(sets: dict[str, dict], strides=(2, 4)) -> list[str]:
    """What an output stride costs by itself: the teacher's own maps average-pooled in logit space to each stride
    and bilinearly resized back (what a student that matched the teacher perfectly at that stride would output:
    ``scfnet_m3`` predicts at stride 4 and resizes its logits), scored against the masks and the teacher."""
    import torch
    import torch.nn.functional as F
    lines = ["| set | teacher MAE | " + " | ".join(f"stride {s}: MAE / fit to the teacher" for s in strides) + " |",
             "|---|---:|" + "---:|" * len(strides)]
    for name in ("hold-out", "ecssd"):
        m = sets[name]["masks"].astype(np.float32) / 255
        t = torch.from_numpy(sets[name]["teacher"].astype(np.float32) / 255)[:, None].clamp(1e-3, 1 - 1e-3)
        z = torch.log(t / (1 - t))
        cells = []
        for s in strides:
            p = torch.sigmoid(F.interpolate(F.avg_pool2d(z, s), size=z.shape[-2:], mode="bilinear",
                                            align_corners=False))[:, 0].numpy()
            cells.append(f"{_mae(p, m):.4f} / {_mae(p, t[:, 0].numpy()):.4f}")
        lines.append(f"| {name} | {_mae(t[:, 0].numpy(), m):.4f} | " + " | ".join(cells) + " |")
    return lines


def band_split(students: dict[str, str], sets: dict[str, dict], threads: int, width: int = 9) -> list[str]:
    """Where each student's fit error lies: in the teacher's boundary band (pixels within ``width // 2`` of its
    0.5 contour) or in the rest of the image (whole regions the two maps disagree on); shares of the whole MAE."""
    import torch
    import torch.nn.functional as F

    from cluster.teachers import build_teacher
    lines = ["| student | set | fit to the teacher | band share of pixels | fit error in the band | elsewhere |",
             "|---|---|---:|---:|---:|---:|"]
    for label, path in students.items():
        net = build_teacher(f"scfnet_m3:{path}", device="cpu", precision="fp32", input_size=SIZE, threads=threads)
        for name in ("hold-out", "ecssd"):
            t = sets[name]["teacher"].astype(np.float32) / 255
            p = _predict(net, sets[name]["images"]).astype(np.float32) / 255
            tb = torch.from_numpy((t > .5).astype(np.float32))[:, None]
            band = (F.max_pool2d(tb, width, 1, width // 2) + F.max_pool2d(-tb, width, 1, width // 2))[:, 0] > 0
            band = band.numpy()
            e = np.abs(p - t)
            lines.append(f"| {label} | {name} | {e.mean():.4f} | {band.mean():.3f} | {e[band].sum() / e.size:.4f} | "
                         f"{e[~band].sum() / e.size:.4f} |")
    return lines


def table(res: dict, students: dict[str, str]) -> list[str]:
    lines = ["| student | fit on pool (learnt from) | fit on hold-out | fit on ECSSD | MAE hold-out | MAE ECSSD |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in res.items():
        lines.append(f"| {label} (`{Path(students[label]).name}`) | {r['pool']['fit']:.4f} | "
                     f"{r['hold-out']['fit']:.4f} | {r['ecssd']['fit']:.4f} | {r['hold-out']['mae']:.4f} | "
                     f"{r['ecssd']['mae']:.4f} |")
    any_r = next(iter(res.values()))
    lines.append(f"| teacher CSNet-L-x2 + flip TTA | 0 (its own labels) | 0 | 0 | "
                 f"{any_r['hold-out']['teacher_mae']:.4f} "
                 f"| {any_r['ecssd']['teacher_mae']:.4f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", action="append", required=True, metavar="NAME=WEIGHTS")
    ap.add_argument("--pool", type=int, default=1000, help="pool images drawn (default 1000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--section", default=None, help="write the table into benchmarks/RESULTS.md under this name")
    ap.add_argument("--stride", action="store_true",
                    help="instead: what the student's output stride costs (the teacher's maps pooled to it) and "
                         "where each student's fit error lies (the teacher's boundary band or elsewhere)")
    args = ap.parse_args()
    students = dict(s.split("=", 1) for s in args.student)
    t0 = time.perf_counter()
    sets = load_sets(args.pool)
    teacher_maps(sets, args.threads)
    if args.stride:
        lines = stride_floor(sets) + [""] + band_split(students, sets, args.threads)
        print("\n".join(lines))
        print(f"{time.perf_counter() - t0:.0f} s")
        if args.section:
            R.write_results(args.section, "\n".join(lines))
        return
    res = gap(students, sets, args.threads)
    lines = table(res, students)
    print("\n".join(lines))
    (R.OUT / "state").mkdir(parents=True, exist_ok=True)
    (R.OUT / "state" / "kd-gap.json").write_text(json.dumps({"students": students, "result": res}, indent=1))
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.section:
        R.write_results(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
