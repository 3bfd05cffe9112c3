"""Size, cost and CPU throughput of every registered model.

For each model: parameters, GMACs for one image, and CPU inference throughput (images/s) at batch 1 and
batch 8, all at ``--size`` (352 by default). Each case runs a warm-up, then timed forward passes under
``torch.inference_mode`` until both ``--min-iters`` passes and ``--budget-s`` seconds are spent (at most
``--max-iters``); images/s is ``batch / median pass time``, which resists the noise of a shared machine.
torch uses every core (``--threads``, several values give one row each). ``OMP_WAIT_POLICY`` defaults to
PASSIVE here: on a machine shared with other jobs, OpenMP threads that spin-wait at every barrier made
2-thread passes 10-40x slower than 1-thread ones, which measures the neighbours, not the model. The table is printed and written to benchmarks/RESULTS.md between
``<!-- section: models -->`` and ``<!-- end: models -->``, leaving other sections intact.

    .venv/bin/python benchmarks/models.py [--size 352] [--batches 1 8] [--threads 2 1] [--budget-s 6]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP; see docstring

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import count_macs, count_params, create_model, list_models  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "models"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def time_forward(model: torch.nn.Module, batch: int, size: int, warmup: int, min_iters: int,
                 max_iters: int, budget_s: float) -> dict:
    """Median wall and process-CPU seconds per forward pass of a (batch, 3, size, size) input.

    CPU seconds (all threads of this process) are what the model costs; on a shared machine wall time
    also includes waiting for the neighbours.
    """
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    wall: list[float] = []
    cpu: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        start = time.perf_counter()
        while len(wall) < max_iters and (len(wall) < min_iters or time.perf_counter() - start < budget_s):
            t0, c0 = time.perf_counter(), time.process_time()
            model(x)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "n": len(wall)}


def render(rows: list[dict], args: argparse.Namespace, machine: dict) -> str:
    batch_cols = "".join(f" img/s b{b} | ms/batch b{b} | img/CPU-s b{b} |" for b in args.batches)
    sep = "".join("---:|---:|---:|" for _ in args.batches)
    lines = [
        f"### Models: size, cost and CPU inference throughput at {args.size}x{args.size}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"Python {machine['python']}, OMP_WAIT_POLICY={machine['omp']}. Measured {machine['date']}; "
        f"load average {machine['load_before']} before, {machine['load_after']} after "
        "(the machine is shared, so throughput is indicative).",
        "",
        f"Command: `.venv/bin/python benchmarks/models.py --size {args.size} "
        f"--batches {' '.join(map(str, args.batches))} --threads {' '.join(map(str, args.threads))} "
        f"--budget-s {args.budget_s:g}`. Median of timed forward passes (fp32, `inference_mode`, eval) after "
        f"{args.warmup} warm-up pass(es) at batch 1, 1 at larger batches. img/s = batch / median wall time of "
        "a pass; img/CPU-s = batch / median CPU seconds the process (all its threads) spent on a pass, which "
        "is less sensitive to other jobs on the machine. MACs counted by `models.count_macs` "
        "(FlopCounterMode FLOPs / 2: convs and matmuls).",
        "",
        f"| model | params (M) | GMACs | threads |{batch_cols} timed passes |",
        f"|---|---:|---:|---:|{sep}---|",
    ]
    for r in rows:
        cells = "".join(f" {r[b]['ips']:.1f} | {r[b]['ms']:.1f} | {r[b]['ipcs']:.1f} |" for b in args.batches)
        iters = ", ".join(f"b{b}: {r[b]['n']}" for b in args.batches)
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e9:.3f} | {r['threads']} |"
                     f"{cells} {iters} |")
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the ``<!-- section: name -->`` ... ``<!-- end: name -->`` block of ``path``."""
    block = f"<!-- section: {name} -->\n{body}\n<!-- end: {name} -->"
    text = path.read_text() if path.exists() else "# sodkd benchmark results\n"
    pattern = re.compile(rf"<!-- section: {re.escape(name)} -->.*?<!-- end: {re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", default="*", help="shell-style pattern on registered names")
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1],
                   help="torch intra-op threads; one row per value (default: all cores)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up passes at batch 1 (1 at larger batches)")
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=6.0, help="time per (model, batch) case")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = p.parse_args(argv)

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "omp": os.environ.get("OMP_WAIT_POLICY"), "python": platform.python_version(),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "load_before": load_average()}
    names = list_models(args.models)
    if not names:
        p.error(f"--models {args.models!r} matches no registered model")
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = create_model(name).eval()
        params, macs = count_params(model), count_macs(model, args.size)
        for threads in args.threads:
            torch.set_num_threads(threads)
            row = {"name": name, "params": params, "macs": macs, "threads": threads}
            for b in args.batches:
                warmup = args.warmup if b == 1 else min(args.warmup, 1)
                t = time_forward(model, b, args.size, warmup, args.min_iters, args.max_iters, args.budget_s)
                row[b] = {"ips": b / t["wall"], "ms": t["wall"] * 1e3, "ipcs": b / t["cpu"], "n": t["n"]}
                print(f"{name:<16} t{threads} b{b}: {row[b]['ips']:7.1f} img/s {row[b]['ms']:8.1f} ms/batch "
                      f"{row[b]['ipcs']:7.1f} img/CPU-s ({t['n']} passes)", flush=True)
            rows.append(row)
    machine["load_after"] = load_average()
    table = render(rows, args, machine)
    print()
    print(table)
    if not args.no_write:
        write_section(RESULTS, SECTION, table)
        print(f"\nwrote section '{SECTION}' of {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
