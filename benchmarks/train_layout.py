"""Training step time of the image student in torch's default (NCHW) layout against channels_last (NHWC), and
against bf16 autocast, on this CPU: the measurement behind ``scaling.channels_last`` (default on).

    .venv/bin/python benchmarks/train_layout.py --threads 1 2 --section train-layout

One process; every arm is its own copy of the same model and optimizer; the arms take turns step by step
(interleaved, so a shared machine's swings fall on all of them), after two warm-up steps each. A step is what the
trainer's step is without the data: forward on a batch of ``--batch`` images at ``--size`` px, the deep-supervised
BCE of the four side outputs against a random soft target, backward, an SGD (momentum, Nesterov) update. Reported:
the median wall time and CPU time per step, images per CPU-second, and each arm's speed-up over NCHW fp32.
The first step's losses of the arms are compared too: a layout is the same maths (equal to float rounding).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {"NCHW fp32": (False, False), "channels_last fp32": (True, False), "NCHW bf16 autocast": (False, True),
        "channels_last bf16 autocast": (True, True)}


def measure(weights: str, threads: int, batch: int, size: int, steps: int) -> tuple[dict[str, dict], float]:
    """arm -> {wall, cpu (median s per step), ips_cpu}, and the largest first-step loss difference to NCHW fp32."""
    import torch
    import torch.nn.functional as F

    from models.weights import load_weights
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = load_weights(weights).float().train()
    x, t = torch.rand(batch, 3, size, size), torch.rand(batch, 1, size, size)
    state = {}
    for arm, (cl, _) in ARMS.items():
        m = copy.deepcopy(base)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        state[arm] = (m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, nesterov=True))

    def step(arm: str) -> tuple[float, float, float]:
        cl, amp = ARMS[arm]
        m, opt = state[arm]
        w0, c0 = time.perf_counter(), time.process_time()
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outs = m(xi)
        loss = sum(w * F.binary_cross_entropy_with_logits(o.float(), t) for w, o in zip((1, .5, .25, .125), outs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - w0, time.process_time() - c0, float(loss)

    first = {arm: step(arm)[2] for arm in ARMS}
    for arm in ARMS:
        step(arm)
    times: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    for _ in range(steps):
        for arm in ARMS:
            times[arm].append(step(arm)[:2])
    out = {}
    for arm, ts in times.items():
        wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
        out[arm] = {"wall": wall, "cpu": cpu, "ips_cpu": batch / cpu}
    fp32 = [a for a, (_, amp) in ARMS.items() if not amp]
    return out, max(abs(first[a] - first["NCHW fp32"]) for a in fp32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm (default 8)")
    ap.add_argument("--section", default=None, help="write the table into benchmarks/RESULTS.md under this name")
    args = ap.parse_args()
    lines = ["## Training step layout: NCHW against channels_last (and bf16 autocast), image student, this CPU", "",
             f"`.venv/bin/python benchmarks/train_layout.py --threads {' '.join(map(str, args.threads))}` "
             "(one process, arms interleaved step by step).", "",
             "| threads | arm | wall s / step | CPU s / step | images / CPU-s | speed-up (wall) |",
             "|---|---|---:|---:|---:|---:|"]
    diffs = []
    for threads in args.threads:
        res, diff = measure(args.weights, threads, args.batch, args.size, args.steps)
        diffs.append(diff)
        ref = res["NCHW fp32"]["wall"]
        for arm, r in res.items():
            lines.append(f"| {threads} | {arm} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['ips_cpu']:.1f} | "
                         f"{ref / r['wall']:.2f}x |")
        print("\n".join(lines), flush=True)
    lines.append("")
    lines.append(f"Model `{Path(args.weights).name}` in training mode, batch {args.batch} at {args.size} px, "
                 f"{args.steps} timed steps per arm (medians). First-step loss, channels_last against NCHW (fp32): "
                 f"largest difference {max(diffs):.1e}.")
    print(lines[-1])
    if args.section:
        sys.path.append(str(REPO / "benchmarks"))
        import reference_runs as R
        R.write_results(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
