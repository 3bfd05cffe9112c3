"""The committed reference weights run the way a user runs them, scored on full ECSSD.

    .venv/bin/python benchmarks/predict_check.py [WEIGHTS ...] [--section predict-check]

For each weights file (default: every ``weights/*.pt``): ``sodkd predict --weights FILE --input ECSSD/images
--output TMP`` as a subprocess, with no ``--size`` (the file's own size applies), then the written PNG masks are
scored against the ECSSD masks with PySODMetrics (``kd.metrics.SODEvaluator``). The table goes into RESULTS.md
beside the figures the model card (``weights/README.md``) states, so a drift between the card and what a user
gets shows up here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ECSSD = Path(os.environ.get("SODKD_SHARED", REPO.parent / "shared")) / "data" / "ecssd"


def score_folder(pred_dir: Path, ecssd: Path) -> dict[str, float]:
    """PySODMetrics over every ECSSD mask whose prediction ``pred_dir/<stem>.png`` exists; a missing one fails."""
    from kd.imageio import decode_mask
    from kd.metrics import SODEvaluator
    ev = SODEvaluator()
    for mask in sorted((ecssd / "masks").glob("*.png")):
        pred = pred_dir / f"{mask.stem}.png"
        if not pred.is_file():
            raise FileNotFoundError(f"{pred}: sodkd predict wrote no map for {mask.stem}")
        ev.step(decode_mask(pred.read_bytes()), decode_mask(mask.read_bytes()))
    out = ev.results()
    out["images"] = ev.count
    return out


def check(weights: Path, ecssd: Path, threads: int) -> dict:
    from models import read_metadata
    meta = read_metadata(str(weights))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "jobs.cli", "predict", "--weights", str(weights),
               "--input", str(ecssd / "images"), "--output", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        figs = score_folder(Path(tmp), ecssd)
    return {"file": weights.name, "model": meta["model"], "size": meta.get("input_size"), "wall_s": wall, **figs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="*", type=Path)
    ap.add_argument("--ecssd", type=Path, default=ECSSD)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--section", default="predict-check")
    args = ap.parse_args()
    files = args.weights or sorted((REPO / "weights").glob("*.pt"))
    rows = []
    for w in files:
        r = check(w, args.ecssd, args.threads)
        print(f"{r['file']}: {r['model']} at {r['size']} px, MAE {r['mae']:.3f} S {r['sm']:.3f} "
              f"max F {r['fm_max']:.3f} ({r['images']} images, {r['wall_s']:.0f} s)", flush=True)
        rows.append(r)
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "benchmarks" / "models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lines = ["## The committed weights as a user runs them",
             "",
             f"`sodkd predict --weights FILE --input ECSSD/images --output DIR` (no `--size`: each file's own), then "
             f"the PNGs scored against the masks (PySODMetrics, full ECSSD); {args.threads} torch threads, wall "
             "time includes decoding and writing. Command: `.venv/bin/python benchmarks/predict_check.py`.",
             "",
             "| file | model | size (from the file) | images | MAE | S | max F | mean E | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['file']}` | {r['model']} | {r['size']} | {r['images']} | {r['mae']:.3f} | "
                     f"{r['sm']:.3f} | {r['fm_max']:.3f} | {r['em_mean']:.3f} | {r['wall_s']:.0f} s |")
    bench.write_section(args.results, args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
