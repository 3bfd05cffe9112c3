"""Size, cost and CPU speed of the DEDecoder student next to the scfnet_m3 student it shares an encoder with.

For ``dedecoder_m3`` and ``scfnet_m3``: parameters, GMACs per image (whole model, and the decoder alone =
whole minus the shared encoder), and CPU inference throughput at ``--size`` (352) for batch 1 and 8. The two
models are timed *interleaved* -- ``--rounds`` rounds, each timing every (model, batch) once -- and the figure
is the median over rounds of each round's median pass time, so a burst of load from the machine's other
tenants hits both models alike. Also timed: one DySample x2 step against plain bilinear upsampling on the
stride-4 feature (16 channels at 88x88), the price of the learned offsets. Written to benchmarks/RESULTS.md
between ``<!-- section: dedecoder -->`` and ``<!-- end: dedecoder -->``.

    .venv/bin/python benchmarks/dedecoder.py [--size 352] [--threads 2] [--rounds 3] [--budget-s 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/models.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import importlib.util  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import count_macs, count_params, create_model  # noqa: E402
from models.dedecoder import DySample  # noqa: E402
from models.scfnet import SCFNet  # noqa: E402

# benchmarks/models.py (its timing and RESULTS.md helpers), loaded under another name than the models package
_spec = importlib.util.spec_from_file_location("bench_models", REPO / "benchmarks" / "models.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
cpu_model, load_average, time_forward, write_section = (_bench.cpu_model, _bench.load_average,
                                                         _bench.time_forward, _bench.write_section)

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "dedecoder"
MODELS = ("dedecoder_m3", "scfnet_m3")


class _Encoder(torch.nn.Module):
    """The shared SCFNet encoder alone (for the decoder's share of the MACs)."""

    def __init__(self, model: SCFNet):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m.encode(x)


def _time_module(fn, x, iters: int) -> float:
    import time
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=352)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=3.0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()

    models = {n: create_model(n).eval() for n in MODELS}
    size_rows = {}
    enc_macs = count_macs(_Encoder(models["scfnet_m3"]), args.size)
    for name, m in models.items():
        size_rows[name] = {"params": count_params(m), "macs": count_macs(m, args.size)}
        size_rows[name]["dec_macs"] = size_rows[name]["macs"] - enc_macs

    per_round: dict[tuple[str, int], list[dict]] = {(n, b): [] for n in MODELS for b in args.batches}
    for r in range(args.rounds):
        for b in args.batches:
            for name in (MODELS if r % 2 == 0 else MODELS[::-1]):
                t = time_forward(models[name], b, args.size, warmup=1, min_iters=3, max_iters=40,
                                 budget_s=args.budget_s)
                per_round[(name, b)].append(t)
                print(f"round {r} {name} b{b}: {b / t['wall']:.1f} img/s, {b / t['cpu']:.1f} img/CPU-s",
                      flush=True)

    feat = torch.randn(1, 16, args.size // 4, args.size // 4)
    dys = DySample(16, 2, 4).eval()
    with torch.no_grad():
        dys.offset.weight.normal_(std=0.1)  # non-zero offsets, as after training
    t_dys = _time_module(dys, feat, 30)
    t_bil = _time_module(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), feat, 30)
    load_after = load_average()

    lines = [
        f"### DEDecoder student (foundation-model pseudo labels) at {args.size}x{args.size}",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {args.threads} torch threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}. Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"load average {load_before} before, {load_after} after (shared machine: indicative).",
        "",
        f"Command: `.venv/bin/python benchmarks/dedecoder.py --size {args.size} --threads {args.threads} "
        f"--rounds {args.rounds} --budget-s {args.budget_s:g}`. fp32, eval, `inference_mode`; the two models "
        "timed interleaved, figure = median over rounds of each round's median pass; img/CPU-s = batch / "
        "CPU seconds of the process per pass. Decoder GMACs = model minus the shared scfnet_m3 encoder "
        f"({enc_macs / 1e9:.3f} GMACs).",
        "",
        "| model | params (M) | GMACs | decoder GMACs |"
        + "".join(f" img/s b{b} | img/CPU-s b{b} |" for b in args.batches),
        "|---|---:|---:|---:|" + "---:|---:|" * len(args.batches),
    ]
    for name in MODELS:
        s = size_rows[name]
        cells = ""
        for b in args.batches:
            wall = statistics.median(t["wall"] for t in per_round[(name, b)])
            cpu = statistics.median(t["cpu"] for t in per_round[(name, b)])
            cells += f" {b / wall:.1f} | {b / cpu:.1f} |"
        lines.append(f"| {name} | {s['params'] / 1e6:.3f} | {s['macs'] / 1e9:.3f} | {s['dec_macs'] / 1e9:.3f} |"
                     f"{cells}")
    lines += ["", f"One x2 upsampling of a 16x{args.size // 4}x{args.size // 4} feature: DySample (offsets "
              f"+ grid_sample, 4 groups) {t_dys * 1e3:.2f} ms vs bilinear {t_bil * 1e3:.2f} ms."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(RESULTS, SECTION, body)
        print(f"wrote section {SECTION!r} of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
