"""Multi-scale test-time augmentation for a teacher: does averaging its maps over input sizes make better labels?

    .venv/bin/python benchmarks/teacher_scales.py --sets duts-val davis [--threads 2]      # choose (validation)
    .venv/bin/python benchmarks/teacher_scales.py --sets ecssd --combos 224 224+288 ...  # score the choice (test)

CSNet-L-x2 (the reference students' teacher, `../shared/teachers/`) is a fully convolutional ONNX graph with free
height and width; its card's protocol is a 224 x 224 square resize. Here every image is square-resized (PIL
bilinear, as `cluster.evaluate` does) to each size of ``--sizes``, run through the teacher as `sodkd label` builds
it (`cluster.teachers.build_teacher` with its card and that input size), with and without a horizontal flip; each
probability map goes back to the mask's size (bilinear) and is kept. A *combo* (``224+288``) is the mean of its
sizes' maps, each size with its flip (so ``224`` alone is the teacher table's "h-flip TTA" entry). Scored by
`kd.metrics.SODEvaluator` (PySODMetrics conventions).

Sets: ``duts-val`` (the 311 DUTS-TR pairs the reference runs hold out: CSNet was trained on DUTS-TR, so it has seen
them), ``davis`` (every third frame of the 10 DAVIS-2016 sequences in ``../shared/data``: images it has never
seen, another domain), ``ecssd`` (the 1,000 pairs: the test set, not used to choose). Maps are cached per set
and (size, flip) under ``runs/ref/teacher-scales/``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from reference_runs import DATA, OUT, TEACHERS, holdout_stems  # noqa: E402

CACHE = OUT / "teacher-scales"
SIZES = (224, 256, 288, 320, 352)


def pairs(name: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of one evaluation set."""
    if name == "ecssd":
        root = DATA / "ecssd"
        return [(p, root / "masks" / (p.stem + ".png")) for p in sorted((root / "images").glob("*.jpg"))]
    if name == "duts-val":
        root = DATA / "duts-tr"
        return [(root / "images" / (s + ".jpg"), root / "masks" / (s + ".png")) for s in holdout_stems()]
    if name == "davis":
        out = []
        for seq in sorted((DATA / "davis2016-dev").iterdir()):
            for p in sorted((seq / "images").glob("*.jpg"))[::3]:
                out.append((p, seq / "masks" / (p.stem + ".png")))
        return out
    raise SystemExit(f"--sets: unknown set {name!r}; choose from ecssd, duts-val, davis")


def maps_for(name: str, size: int, images: list[np.ndarray], shapes: list[tuple[int, int]], threads: int,
             teacher_spec: str) -> list[np.ndarray]:
    """One uint8 probability map per image at its mask's size, flip-averaged (cached per set and size)."""
    path = CACHE / f"{name}-{size}.npz"
    if path.exists():
        with np.load(path) as z:
            return [z[f"m{i}"] for i in range(len(images))]
    import torch
    import torch.nn.functional as F

    from cluster.teachers import build_teacher
    from kd.imageio import resize
    t = build_teacher([teacher_spec], tta="hflip", device="cpu", precision="fp32", input_size=size, threads=threads)
    out, t0 = [], time.time()
    for i in range(0, len(images), 16):
        batch = np.stack([resize(im, (size, size)) for im in images[i:i + 16]])
        p = t.predict_tensor(batch)[:, None]  # (n, 1, S, S) probabilities, flip-averaged
        for j, (h, w) in enumerate(shapes[i:i + 16]):
            m = F.interpolate(p[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            out.append((m.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"m{i}": m for i, m in enumerate(out)})
    print(f"  {name} @ {size}: {len(images)} images in {time.time() - t0:.0f} s "
          f"({len(images) / (time.time() - t0):.1f} images/s, flip included)", flush=True)
    return out


def score(maps: list[list[np.ndarray]], masks: list[np.ndarray]) -> dict[str, float]:
    from kd.metrics import SODEvaluator
    ev = SODEvaluator()
    fgs = []
    for i, gt in enumerate(masks):
        m = np.mean([mm[i].astype(np.float32) for mm in maps], axis=0)
        fgs.append(np.mean(m > 127.5))
        ev.step(np.clip(m + 0.5, 0, 255).astype(np.uint8), gt)
    r = ev.results()
    fg = float(np.mean(fgs))
    return {"mae": r["mae"], "sm": r["sm"], "maxf": r["fm_max"], "fg": fg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["duts-val", "davis"])
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    ap.add_argument("--combos", nargs="*", default=None,
                    help="size combos to score, e.g. 224 224+288 (default: every single size, and every set of 2 "
                         "and 3 sizes that contains 224, and all sizes)")
    ap.add_argument("--teacher", default="csnet-x2", choices=sorted(TEACHERS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.combos:
        combos = [tuple(int(s) for s in c.split("+")) for c in args.combos]
    else:
        combos = [(s,) for s in args.sizes]
        combos += [c for k in (2, 3) for c in itertools.combinations(args.sizes, k) if 224 in c]
        combos.append(tuple(args.sizes))
    need = sorted({s for c in combos for s in c})
    from kd.imageio import decode_image, decode_mask
    for name in args.sets:
        ps = pairs(name)
        images = [decode_image(p.read_bytes()) for p, _ in ps]
        masks = [decode_mask(m.read_bytes()) for _, m in ps]
        shapes = [m.shape for m in masks]
        print(f"{name}: {len(ps)} pairs", flush=True)
        by_size = {s: maps_for(name, s, images, shapes, args.threads, TEACHERS[args.teacher]) for s in need}
        print(f"| {name} | MAE | S | max F | salient px |\n|---|---|---|---|---|")
        for c in combos:
            r = score([by_size[s] for s in c], masks)
            print(f"| {'+'.join(map(str, c))} | {r['mae']:.4f} | {r['sm']:.4f} | {r['maxf']:.4f} | {r['fg']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
