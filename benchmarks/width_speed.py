"""What the decoder's width costs at inference: ``scfnet_m3`` at c = 16 / 32 / 48 against CSNet-L-x1.

    .venv/bin/python benchmarks/width_speed.py [--widths 16 32 48] [--rounds 5]   (on a quiet machine)

Each width (seeded random weights: speed only) is exported the way ``sodkd export`` does
(``cluster.export.export_teacher``, BatchNorm folded, ONNX) and run by ONNX Runtime fp32, batch 1, one intra-op
thread, beside the public peer ``../shared/teachers/csnet-L-x1.onnx`` in the same process: per size, ``--rounds``
interleaved rounds of one second per model (the order rotated each round); img/s is the median over rounds and
the ratio to the peer is taken per round, then the median. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEER = Path(os.environ.get("SODKD_SHARED", REPO.parent / "shared")) / "teachers" / "csnet-L-x1.onnx"


def main() -> None:
    import onnxruntime as ort
    import torch

    from cluster.export import export_teacher
    from models import count_macs, create_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 48])
    ap.add_argument("--sizes", type=int, nargs="+", default=[352, 224])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sessions, macs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.widths:
            model = create_model("scfnet_m3", channels=c).eval()
            macs[f"c = {c}"] = count_macs(model, 224) / 1e9
            export_teacher(model, f"{tmp}/c{c}.onnx", "onnx")
            sessions[f"c = {c}"] = ort.InferenceSession(f"{tmp}/c{c}.onnx", opts, providers=["CPUExecutionProvider"])
    sessions["CSNet-L-x1"] = ort.InferenceSession(str(PEER), opts, providers=["CPUExecutionProvider"])
    table = {}
    for size in args.sizes:
        x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k, s in sessions.items():
            s.run(None, feeds[k])                                   # warm-up
        rates = {k: [] for k in sessions}
        items = list(sessions.items())
        for r in range(args.rounds):
            for k, s in items[r % len(items):] + items[:r % len(items)]:
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < 1.0:
                    s.run(None, feeds[k])
                    n += 1
                rates[k].append(n / (time.perf_counter() - t0))
        for k in sessions:
            ratio = statistics.median(a / b for a, b in zip(rates[k], rates["CSNet-L-x1"]))
            table.setdefault(k, []).append((statistics.median(rates[k]), ratio))
    head = " | ".join(f"img/s at {s} | x CSNet-L-x1 at {s}" for s in args.sizes)
    print(f"| model | GMACs at 224 | {head} |")
    print("|---|---:|" + "---:|---:|" * len(args.sizes))
    for k, cells in table.items():
        row = " | ".join(f"{r:.1f} | {q:.1f}" for r, q in cells)
        print(f"| {k} | {macs[k]:.2f} | {row} |" if k in macs else f"| {k} | - | {row} |")


if __name__ == "__main__":
    main()
