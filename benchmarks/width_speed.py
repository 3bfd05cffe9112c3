"""What the decoder's width costs at inference: ``scfnet_m3`` at c = 16 / 32 / 48 against CSNet-L-x1.

    .venv/bin/python benchmarks/width_speed.py [--widths 16 32 48] [--rounds 5]   (on a quiet machine)
    .venv/bin/python benchmarks/width_speed.py --models x0.5/c48 x1.0/c24       (encoder width too)

``--models`` names MobileNetV3 width multiplier and decoder width pairs (it replaces ``--widths``, which are
x0.5 encoders). Each model (seeded random weights: speed only) is exported the way ``sodkd export`` does
(``cluster.export.export_teacher``, BatchNorm folded, ONNX) and run by ONNX Runtime fp32, batch 1, one intra-op
thread, beside the public peer ``../shared/teachers/csnet-L-x1.onnx`` in the same process, timed by
``benchmarks/inference.py``'s runners and rounds: per size, ``--rounds`` interleaved rounds of one second per model
(the order rotated each round); img/s is the median over rounds and the ratio to the peer is taken per round,
then the median. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "benchmarks"))   # after the repository: its `models` package, not benchmarks/models.py
PEER = Path(os.environ.get("SODKD_SHARED", REPO.parent / "shared")) / "teachers" / "csnet-L-x1.onnx"


def main() -> None:
    import torch

    from cluster.export import export_teacher
    from inference import OnnxRunner, measure   # benchmarks/inference.py: the same runners and interleaved rounds
    from models import count_macs, create_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 48])
    ap.add_argument("--sizes", type=int, nargs="+", default=[352, 224])
    ap.add_argument("--models", nargs="+", metavar="xM/cC",
                    help="encoder width multiplier / decoder width pairs, e.g. x0.5/c48 x1.0/c24")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.models:
        specs = []
        for m in args.models:
            enc, _, dec = m.partition("/")
            try:
                specs.append((f"{enc} / c = {int(dec.removeprefix('c'))}",
                              {"width_mult": float(enc.removeprefix("x")), "channels": int(dec.removeprefix("c"))}))
            except ValueError:
                ap.error(f"--models {m}: must look like x1.0/c24")
    else:
        specs = [(f"c = {c}", {"channels": c}) for c in args.widths]
    torch.set_num_threads(1)
    torch.manual_seed(0)           # the weights are random (speed only), the same ones every run
    runners, macs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, kwargs) in enumerate(specs):
            model = create_model("scfnet_m3", **kwargs).eval()
            macs[label] = count_macs(model, 224) / 1e9
            export_teacher(model, f"{tmp}/m{i}.onnx", "onnx")
            runners.append(OnnxRunner(label, "onnx", "peer", Path(f"{tmp}/m{i}.onnx"), [1]))
    runners.append(OnnxRunner("CSNet-L-x1", "onnx", "peer", PEER, [1]))
    configs = [(size, 1, 1) for size in args.sizes]
    out, _ = measure(runners, configs, args.rounds, 1.0, float("inf"))
    head = " | ".join(f"img/s at {s} | x CSNet-L-x1 at {s}" for s in args.sizes)
    print(f"| model | GMACs at 224 | {head} |")
    print("|---|---:|" + "---:|---:|" * len(args.sizes))
    for r in runners:
        cells = []
        for cfg in configs:
            rates, peer = [v[0] for v in out[(r.label, cfg)]], [v[0] for v in out[("CSNet-L-x1", cfg)]]
            ratio = statistics.median(a / b for a, b in zip(rates, peer))
            cells.append(f"{statistics.median(rates):.1f} | {ratio:.1f}")
        gmacs = f"{macs[r.label]:.2f}" if r.label in macs else "-"
        print(f"| {r.label} | {gmacs} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
