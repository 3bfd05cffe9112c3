"""Training step time of the image student in torch's default (NCHW) layout against channels_last (NHWC), and
against bf16 autocast, on this CPU: the measurement behind ``scaling.channels_last`` (on by default).

    .venv/bin/python benchmarks/train_layout.py --threads 1 2 --section train-layout

One process; every arm is its own copy of the same model and optimizer; the arms take turns step by step
(interleaved, so a shared machine's swings fall on all of them), after two warm-up steps each. A step is what the
trainer's step is without the data: forward on a batch of ``--batch`` images at ``--size`` px, the deep-supervised
BCE of the four side outputs against a random soft target, backward, an SGD (momentum, Nesterov) update. Reported:
the median wall time and CPU time per step, images per CPU-second, and each arm's speed-up over NCHW fp32.
The first step's losses of the arms are compared too: a layout is the same maths (equal to float rounding).

``--pipeline`` measures the same thing through the whole trainer instead: two ``run_training`` jobs of the KD
reference recipe (``benchmarks/reference_runs.py``: the c = 48 student from the shipped KD file, its pool and labels,
1 worker with 1 torch thread, the data pipeline included), one with ``scaling.channels_last`` false and one true,
started at the same moment side by side (as the reference runs train), ``--pipeline-epochs`` epochs of
``--pipeline-rows`` pool images each; reported per epoch: wall and worker-CPU seconds per step.

    .venv/bin/python benchmarks/train_layout.py --pipeline --pipeline-rows 2400 --pipeline-epochs 2

``--gradients`` measures how far each layout's fp32 gradients lie from the float64 truth (the same model in NCHW
float64), and from each other: for each case and thread count, over several batches, the worst parameter's gradient
error as a share of the whole gradient's norm (median and largest over the batches). Cases: the unit test's (a
randomly initialised c = 16 student, random 64 px batches of 2) and the training case (the shipped KD student, real
``sample-data/duts-val`` images at 224 px, batches of 4).

    .venv/bin/python benchmarks/train_layout.py --gradients --threads 1 2
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


def gradient_errors(threads: int, case: str, batches: int, weights: str) -> list[dict[str, float]]:
    """Per batch: the worst parameter's gradient error over the whole gradient's norm, for NCHW fp32 and
    channels_last fp32 against NCHW float64, and between the two fp32 layouts."""
    import numpy as np
    import torch

    from kd.imageio import decode_image, resize
    from kd.step import KDLoss, batch_loss
    from models import create_model
    from models.weights import load_weights
    torch.set_num_threads(threads)
    files = sorted((REPO / "sample-data" / "duts-val" / "images").glob("*.jpg"))
    trained = load_weights(weights).float() if case == "train" else None
    out = []
    for b in range(batches):
        torch.manual_seed(b)
        if case == "test":
            base, size = create_model("scfnet_m3"), 64
            x = torch.rand(2, 3, size, size)
        else:
            base, size = trained, 224
            imgs = [resize(decode_image(f.read_bytes()), (size, size)) for f in files[4 * b:4 * b + 4]]
            x = base.normalize(np.stack(imgs).transpose(0, 3, 1, 2))
        target = torch.rand(x.shape[0], 1, size, size)
        grads = {}
        for arm in ("f64", "nchw", "nhwc"):
            m, xi = copy.deepcopy(base).train(), x
            if arm == "f64":
                m, xi = m.double(), x.double()
            if arm == "nhwc":
                m, xi = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            soft = torch.ones(x.shape[0], dtype=torch.bool)
            batch_loss(m(xi), target.to(xi.dtype), soft, 3, KDLoss(pixel="bce")).backward()
            grads[arm] = [p.grad.double() for p in m.parameters()]
        total = float(torch.sqrt(sum((g ** 2).sum() for g in grads["f64"])))

        def worst(a: str, b: str) -> float:
            return max(float((p - q).norm()) for p, q in zip(grads[a], grads[b])) / total
        out.append({"nchw": worst("nchw", "f64"), "nhwc": worst("nhwc", "f64"), "between": worst("nchw", "nhwc")})
    return out


def batchnorm_errors(threads: int) -> list[str]:
    """Train-mode BatchNorm2d on its own, (4, 64, 28, 28) inputs of growing mean / std: each layout's output and
    weight-gradient error against float64, as rows of a table (where the layouts' fp32 rounding differs most)."""
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for mean, std in ((0, 1), (3, 0.3), (10, 0.1), (30, 0.05)):
        x, gy = torch.randn(4, 64, 28, 28) * std + mean, torch.randn(4, 64, 28, 28)
        res = {}
        for arm in ("f64", "nchw", "nhwc"):
            bn, xi, gi = torch.nn.BatchNorm2d(64).train(), x.clone(), gy.clone()
            if arm == "f64":
                bn, xi, gi = bn.double(), xi.double(), gi.double()
            if arm == "nhwc":
                xi, gi = (t.contiguous(memory_format=torch.channels_last) for t in (xi, gi))
            y = bn(xi.requires_grad_(True))
            y.backward(gi)
            res[arm] = (y.detach().double(), bn.weight.grad.double())
        err = {arm: [float((res[arm][k] - res["f64"][k]).norm() / res["f64"][k].norm()) for k in (0, 1)]
               for arm in ("nchw", "nhwc")}
        rows.append(f"| {mean} / {std} | {err['nchw'][0]:.1e} | {err['nhwc'][0]:.1e} | {err['nchw'][1]:.1e} | "
                    f"{err['nhwc'][1]:.1e} |")
    return rows


def gradients(threads_list: list[int], batches: int, weights: str) -> list[str]:
    """The table of ``gradient_errors`` for both cases and each thread count."""
    cases = {"test": f"random init c = 16, random 64 px, batch 2 ({batches} batches)",
             "train": f"`{Path(weights).name}`, duts-val images at 224 px, batch 4 ({min(batches, 6)} batches)"}
    lines = ["## Training step layout: how far each layout's fp32 gradients lie from float64", "",
             f"`.venv/bin/python benchmarks/train_layout.py --gradients --threads {' '.join(map(str, threads_list))}`: "
             "the worst parameter's gradient error as a share of the whole gradient's norm, median / largest over "
             "the batches.", "",
             "| case | threads | NCHW fp32 vs float64: median / largest | channels_last fp32 vs float64 | "
             "NCHW vs channels_last (fp32) |", "|---|---:|---|---|---|"]
    for case, title in cases.items():
        for threads in threads_list:
            errs = gradient_errors(threads, case, batches if case == "test" else min(batches, 6), weights)
            cells = [f"{statistics.median(e[k] for e in errs):.1e} / {max(e[k] for e in errs):.1e}"
                     for k in ("nchw", "nhwc", "between")]
            lines.append(f"| {title} | {threads} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"Train-mode BatchNorm2d alone, (4, 64, 28, 28), {threads_list[-1]} thread(s): error against float64",
              "", "| input mean / std | output, NCHW | output, channels_last | weight gradient, NCHW | "
              "weight gradient, channels_last |", "|---|---|---|---|---|"] + batchnorm_errors(threads_list[-1])
    print("\n".join(lines[-7:]), flush=True)
    return lines


def write_section(section: str, lines: list[str]) -> None:
    """``lines`` into benchmarks/RESULTS.md as section ``section`` (reference_runs' writer)."""
    sys.path.append(str(REPO / "benchmarks"))
    import reference_runs as R
    R.write_results(section, "\n".join(lines))


def pipeline_arm(channels_last: bool, rows: int, epochs: int, out: Path) -> dict:
    """One ``run_training`` job of the KD reference recipe in this process; its per-epoch wall and CPU seconds."""
    sys.path.append(str(REPO / "benchmarks"))
    import reference_runs as R

    from cluster.raylocal import start_private_ray
    from cluster.training.launch import run_training
    from cluster.training.sections import load_train_config
    cfg = R.train_config("kd-sharp-w48-c6", 1)
    arm = "nhwc" if channels_last else "nchw"
    cfg["model"]["init_weights"] = str(REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt")
    cfg["data"]["unlabeled"][0]["limit"] = rows
    cfg["optim"].update(epochs=epochs)
    cfg["scaling"]["channels_last"] = channels_last
    cfg["val"] = {"uri": None}
    cfg["run"].update(name=f"layout-{arm}", storage=str(out / "runs"), max_failures=0)
    cfg["mlflow"].update(uri=f"sqlite:///{out / f'mlflow-{arm}.db'}", experiment="train-layout")
    cfg["output"] = {"dir": str(out / "weights" / arm), "fp16": True}
    start_private_ray(2, worker_niceness=0)
    res = run_training(load_train_config(cfg))
    steps = res.steps_per_epoch
    return {"arm": arm, "steps_per_epoch": steps,
            "wall": [w / steps for w in res.summary["epoch_wall_s"]],
            "cpu": [c / steps for c in res.summary["epoch_cpu_s"]]}


def pipeline(rows: int, epochs: int) -> list[str]:
    """Both arms as two processes started together; the table of their epochs."""
    import json
    import subprocess
    import tempfile
    out = Path(tempfile.mkdtemp(prefix="sodkd-train-layout-"))
    procs = {cl: subprocess.Popen([sys.executable, __file__, "--pipeline-arm", "nhwc" if cl else "nchw",
                                   "--pipeline-rows", str(rows), "--pipeline-epochs", str(epochs),
                                   "--pipeline-out", str(out)])
             for cl in (False, True)}
    res = {}
    for cl, p in procs.items():
        arm = "nhwc" if cl else "nchw"
        if p.wait():
            raise SystemExit(f"train_layout: the {arm} arm failed (exit {p.returncode})")
        res[cl] = json.loads((out / f"{arm}.json").read_text())
    lines = ["| epoch | steps | NCHW wall s / step | channels_last wall s / step | speed-up (wall) | "
             "NCHW CPU s / step | channels_last CPU s / step | speed-up (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    a, b = res[False], res[True]
    for e in range(epochs):
        lines.append(f"| {e + 1} | {a['steps_per_epoch']} | {a['wall'][e]:.3f} | {b['wall'][e]:.3f} | "
                     f"{a['wall'][e] / b['wall'][e]:.2f}x | {a['cpu'][e]:.3f} | {b['cpu'][e]:.3f} | "
                     f"{a['cpu'][e] / b['cpu'][e]:.2f}x |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm (default 8)")
    ap.add_argument("--section", default=None, help="write the table into benchmarks/RESULTS.md under this name")
    ap.add_argument("--pipeline", action="store_true", help="instead: both layouts through the whole trainer")
    ap.add_argument("--pipeline-rows", type=int, default=2400, help="pool images per epoch (default 2400)")
    ap.add_argument("--pipeline-epochs", type=int, default=2)
    ap.add_argument("--gradients", action="store_true",
                    help="instead: each layout's fp32 gradients against float64 (and each other)")
    ap.add_argument("--batches", type=int, default=10, help="--gradients: batches per case (default 10)")
    ap.add_argument("--pipeline-arm", choices=("nchw", "nhwc"), help=argparse.SUPPRESS)
    ap.add_argument("--pipeline-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pipeline_arm:
        import json
        import logging
        logging.basicConfig(level=logging.WARNING)
        out = Path(args.pipeline_out)
        res = pipeline_arm(args.pipeline_arm == "nhwc", args.pipeline_rows, args.pipeline_epochs, out)
        (out / f"{args.pipeline_arm}.json").write_text(json.dumps(res))
        return
    if args.pipeline:
        lines = pipeline(args.pipeline_rows, args.pipeline_epochs)
        print("\n".join(lines))
        return
    if args.gradients:
        lines = gradients(args.threads, args.batches, args.weights)
        if args.section:
            write_section(args.section, lines)
        return
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
        write_section(args.section, lines)


if __name__ == "__main__":
    main()
