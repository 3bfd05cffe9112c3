"""Labelling throughput: the whole Ray Data pipeline against a bare in-process loop, same images, same teacher,
same cores.

*Bare loop*: one Python process reads each file, decodes it (``kd.imageio.decode_image``), resizes it to the
teacher's size, stacks a batch and runs the teacher (``Teacher.predict``, torch using every core); nothing is
written. *Pipeline*: ``cluster.labelling.run_labelling`` on a local Ray instance with the same number of CPUs:
manifest, read + decode tasks, the teacher actor pool, PNG encoding, confidence statistics and atomic Parquet
shards -- everything a real job does. Ray itself is started before timing (a cluster is up before a job is
submitted); everything else, actor start-up included, is inside the pipeline run.

Two pipeline rates are reported: end to end over the whole run, and steady state (images finished after the
first shard over the time from the first shard to the last: the rate of a long job, where the few seconds of
start-up are amortised). The ratio is pipeline images/s / bare-loop images/s, both in steady state (the bare
loop also has its warm-up batch excluded). Several pool layouts are measured; the table shows them all.

The teacher is ``scfnet_r18`` at 352 px (the project's CPU teacher: ``scfnet_r50`` is the paper's, 2-3x slower
per image, which would only make the fixed overheads look smaller). Its weights are random: speed does not
depend on their values. Images are real (``../shared/data/unlabeled/imagenet-1k``, max side 288).

``OMP_WAIT_POLICY=PASSIVE`` as in benchmarks/models.py (spinning OpenMP threads measure the neighbours on a
shared machine); the Ray workers inherit it. ``RAY_worker_niceness=0``: Ray starts its workers at nice 15,
which on a machine shared with other (nice 0) work would starve the pipeline but not the bare loop; at 0 both
run at the same priority.

    .venv/bin/python benchmarks/labelling.py [--images 160] [--rounds 2] [--model scfnet_r18] [--size 352]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP; see docstring
os.environ.setdefault("RAY_worker_niceness", "0")    # Ray's default nice 15 would compare unequal priorities

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.labelling import DecodeConfig, LabelConfig, PoolConfig, WriteConfig, run_labelling  # noqa: E402
from cluster.teachers import build_teacher  # noqa: E402
from cluster.tracking import TrackingConfig  # noqa: E402
from kd.imageio import decode_image, resize  # noqa: E402
from models import create_model, save_weights  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bench_models", REPO / "benchmarks" / "models.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
cpu_model, load_average, write_section = _bench.cpu_model, _bench.load_average, _bench.write_section

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "labelling"
DATA = Path(os.environ.get("SODKD_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to lay the pipeline out on the machine."""

    name: str
    actors: int
    actor_cpus: float
    threads: int
    placement: str
    decode_cpus: float = 0.5

    def describe(self) -> str:
        where = "decode in CPU tasks" if self.placement == "tasks" else "decode inside the actor"
        return (f"{self.actors} actor{'s' if self.actors > 1 else ''} x {self.threads} torch thread"
                f"{'s' if self.threads > 1 else ''}, {where}")


LAYOUTS = {
    "1x2-tasks": Layout("1x2-tasks", 1, 1.0, 2, "tasks"),
    "1x2-actor": Layout("1x2-actor", 1, 1.0, 2, "actor"),
    "2x1-tasks": Layout("2x1-tasks", 2, 0.75, 1, "tasks", decode_cpus=0.25),
    "2x1-actor": Layout("2x1-actor", 2, 0.75, 1, "actor"),
}


def bare_loop(paths: list[Path], spec: str, size: int, batch: int, threads: int) -> dict:
    """Decode + forward in one process; the first batch is a warm-up and not timed."""
    torch.set_num_threads(threads)
    teacher = build_teacher(spec, device="cpu", precision="fp32", input_size=size)

    def run(chunk):
        images = np.stack([resize(decode_image(p.read_bytes(), max_side=size), (size, size)) for p in chunk])
        return teacher.predict(images)

    run(paths[:batch])
    t0 = time.perf_counter()
    done = 0
    for i in range(batch, len(paths), batch):
        done += len(run(paths[i:i + batch]))
    wall = time.perf_counter() - t0
    return {"images": done, "wall_s": wall, "images_per_s": done / wall}


def pipeline(inp: Path, out: Path, spec: str, size: int, batch: int, layout: Layout, shard_rows: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cfg = LabelConfig(
        input=str(inp), output=str(out), teachers=(spec,), teacher_size=size, progress=False,
        tracking=TrackingConfig(enabled=False),
        pool=PoolConfig(size=layout.actors, num_cpus=layout.actor_cpus, batch_size=batch, torch_threads=layout.threads),
        decode=DecodeConfig(num_cpus=layout.decode_cpus, batch_size=batch, placement=layout.placement),
        write=WriteConfig(num_cpus=0.25, shard_rows=shard_rows))
    s = run_labelling(cfg, samples=0)
    if s.labelled != s.total:
        raise RuntimeError(f"pipeline labelled {s.labelled} of {s.total}")
    return {"images": s.labelled, "wall_s": s.wall_s, "images_per_s": s.images_per_s,
            "steady_images_per_s": s.steady_images_per_s, "startup_s": s.startup_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="scfnet_r18")
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the bare loop (= the cores)")
    p.add_argument("--layouts", nargs="+", default=["1x2-tasks", "1x2-actor", "2x1-actor"], choices=list(LAYOUTS))
    p.add_argument("--headline", default="1x2-actor", choices=list(LAYOUTS),
                   help="the layout jobs/configs/label.yaml gives a CPU pool (decode placement auto = actor), "
                        "with torch_threads = cores; its ratio is the headline")
    p.add_argument("--shard-rows", type=int, default=16)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray
    load_before = load_average()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="sodkd-bench-label-") as tmp:
        tmp = Path(tmp)
        src = sorted((DATA / "unlabeled" / "imagenet-1k").glob("*.jpg"))[: args.images]
        if len(src) < args.images:
            raise SystemExit(f"need {args.images} images in {DATA / 'unlabeled/imagenet-1k'}, found {len(src)}")
        inp = tmp / "in"
        inp.mkdir()
        for q in src:
            shutil.copy(q, inp / q.name)
        paths = sorted(inp.iterdir())
        torch.manual_seed(0)
        weights = tmp / f"{args.model}.pt"
        save_weights(create_model(args.model), weights)
        spec = f"{args.model}:{weights}"

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        bare, pipes = [], {name: [] for name in args.layouts}
        for r in range(args.rounds):  # interleaved, so slow spells of a shared machine hit every variant
            bare.append(bare_loop(paths, spec, args.size, args.batch, args.threads))
            print(f"round {r + 1}: bare loop {bare[-1]['images_per_s']:.2f} images/s", flush=True)
            for name in args.layouts:
                res = pipeline(inp, tmp / "out", spec, args.size, args.batch, LAYOUTS[name], args.shard_rows)
                pipes[name].append(res)
                print(f"round {r + 1}: pipeline {name}: steady {res['steady_images_per_s']:.2f} images/s, end to end "
                      f"{res['images_per_s']:.2f} ({res['wall_s']:.1f} s, start-up {res['startup_s']:.1f} s)",
                      flush=True)
        ray.shutdown()
    load_after = load_average()

    med = statistics.median
    bare_ips = med(b["images_per_s"] for b in bare)
    rows = []
    for name in args.layouts:
        runs = pipes[name]
        steady = med(x["steady_images_per_s"] for x in runs)
        e2e = med(x["images_per_s"] for x in runs)
        rows.append((name, LAYOUTS[name], steady, e2e, med(x["startup_s"] for x in runs), steady / bare_ips,
                     e2e / bare_ips))
    head = next(r for r in rows if r[0] == args.headline)
    lines = [
        "### Labelling: Ray Data pipeline vs a bare in-process loop (CPU)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, Ray {ray.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, RAY_worker_niceness="
        f"{os.environ.get('RAY_worker_niceness')}. Measured {started}; load average {load_before} "
        f"before, {load_after} after (the machine is shared with other jobs: figures are indicative).",
        "",
        f"Command: `.venv/bin/python benchmarks/labelling.py --images {args.images} --rounds {args.rounds} "
        f"--model {args.model} --size {args.size} --batch {args.batch} --layouts {' '.join(args.layouts)}`. Teacher `{args.model}` (random weights) at "
        f"{args.size}x{args.size}, fp32, batch {args.batch}; {args.images} real ImageNet JPEGs "
        f"(`unlabeled/imagenet-1k`). Bare loop: read + decode + resize + forward in one process with "
        f"{args.threads} torch threads, no output, first batch untimed. Pipeline: `run_labelling` on a local Ray "
        f"instance with {os.cpu_count()} CPUs, writing PNG labels + Parquet shards of {args.shard_rows} rows; "
        f"steady = images after the first shard / time from first to last shard; end to end includes listing, "
        f"the driver's teacher check and actor start-up. Medians of {args.rounds} interleaved rounds.",
        "",
        f"**Bare loop: {bare_ips:.2f} images/s. Pipeline ({head[1].describe()}): {head[2]:.2f} images/s steady, "
        f"ratio {head[5]:.2f}** (end to end {head[3]:.2f} images/s over {args.images} images, ratio {head[6]:.2f}, "
        f"start-up {head[4]:.1f} s).",
        "",
        "| layout | pool | steady images/s | ratio | end-to-end images/s | ratio | start-up s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, lay, steady, e2e, startup, r_steady, r_e2e in rows:
        lines.append(f"| {name} | {lay.describe()} | {steady:.2f} | {r_steady:.2f} | {e2e:.2f} | {r_e2e:.2f} | "
                     f"{startup:.1f} |")
    # start-up is a fixed cost per job: from the median start-up and steady rate, the job size whose
    # end-to-end rate reaches 0.85 x the bare loop
    t0 = max(0.0, head[4] - args.shard_rows / head[2])
    target = 0.85 * bare_ips
    if head[2] > target:
        n85 = target * t0 / (1 - target / head[2])
        lines += ["", f"Start-up (run start to first shard, {head[4]:.1f} s, of which ~{t0:.1f} s is not labelling) is "
                  f"paid once per job: at the steady rate the end-to-end ratio of `{head[0]}` reaches 0.85 for "
                  f"jobs of about {n85:.0f} images or more. The steady window may credit up to one batch that was "
                  f"already in flight when the first shard landed (<= {args.batch / args.images:.0%} here)."]
    lines += ["", "Per round (images/s): bare " + ", ".join(f"{b['images_per_s']:.2f}" for b in bare) + "; "
              + "; ".join(f"{n} " + ", ".join(f"{x['steady_images_per_s']:.2f}" for x in pipes[n])
                          for n in args.layouts) + "."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(RESULTS, SECTION, body)
        print(f"wrote section {SECTION!r} of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
