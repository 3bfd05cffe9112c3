"""The labelling driver's manifest at scale: wall time and memory per key of what ``cluster.label`` (the job's plan)
builds on the driver before Ray starts, at 10^5 and 10^6 keys, extrapolated (linearly) to 10^8.

What the driver does per listed key (the stages measured):

    A  manifest   ``build_manifest(cfg)``: ``storage.walk`` (one ``Listed`` per S3 object, from
                  ListObjectsV2 pages of 1000), ``catalog._listing`` (one ``_Entry`` with the key cut out),
                  ``catalog.image_folder`` (one ``Item`` per image), the ``auto`` layout's video test
    B  plan       the id check of every listed input (``_check_ids``), the done-set (ids of the output's label
                  and reject shards) and the inputs not yet done (``todo``, ``rejected_now``)
    B1 done-set   the done-set alone (read again, separately timed: part of B)
    C  Ray input  ``_manifest_table(todo)``: the Arrow table the Ray Data job starts from

The input is a synthetic S3 listing: ``storage._s3_client_for`` is replaced by a client whose
``list_objects_v2`` returns boto3-shaped pages (Key, LastModified, ETag, Size, StorageClass) of ImageNet-like
keys (``train/n00000012/n00000012_00016000.JPEG``); everything from the page on is the real driver code. No
network, no XML parsing: on a real bucket each page is a request (~10^5 sequential requests at 10^8 keys).
The output holds real shards, written with ``cluster.labels.write_shard`` (``LABEL_SCHEMA`` /
``REJECT_SCHEMA``, 256 rows each = ``write.shard_rows``' default) for the first ``--done`` fraction of the keys
(1 in 100 of them as rejects): a rerun of a job killed half way. Label PNGs are a tiny 8x8 map (only the id
column is read back).

Each (code, N) runs in fresh subprocesses, after a warm-up on 300 keys (lazy imports are no per-key cost):
``--rounds`` timed ones, the codes interleaved, the median by A+B+C CPU seconds shown (wall and CPU seconds per
stage; RSS: peak per stage over the RSS at its start, sampled every 2 ms, and
held after C over the RSS before A), and for N <= ``--trace-max`` one under ``tracemalloc`` (Python heap: peak
during and held after each stage, over what was held before it) with a fresh ``pyarrow.proxy_memory_pool`` per
stage (Arrow heap: peak and held) -- tracemalloc slows the driver ~5x, too slow for 10^6 keys on this machine.
"Held" after A, B and C is what the driver keeps while the Ray job runs. ``--code LABEL=DIR`` (repeatable)
imports ``cluster`` and ``kd`` from another tree (e.g. ``git archive HEAD`` unpacked) to measure the code
before a change on the same shards; a tree without ``labelling._plan`` runs the old ``_label`` lines
(:func:`_legacy_plan`).

    nice -n 10 .venv/bin/python benchmarks/manifest_scale.py [--keys 100000 1000000] [--done 0.5]
        [--code before=DIR --code after=.] [--rounds 1] [--trace-max 100000] [--json OUT] [--notes FILE]
        [--no-write]
    .venv/bin/python benchmarks/manifest_scale.py --from-json OUT [--notes FILE]   # render/write a saved run
    # the streamed plan (labelling.plan_run) of the tree labelled LABEL, into section manifest-stream:
    nice -n 10 .venv/bin/python benchmarks/manifest_scale.py --code before=DIR --code after=. --stream after
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "manifest-scale"
BUCKET, PREFIX = "bench", "in"
PAGE = 1000            # keys per ListObjectsV2 page (the S3 maximum)
SHARD_ROWS = 256       # WriteConfig.shard_rows default
PER_CLASS = 1300       # ImageNet-like folders


def key_of(i: int) -> str:
    c = i // PER_CLASS
    return f"train/n{c:08d}/n{c:08d}_{i:08d}.JPEG"


# --- worker: one (code, N) in a fresh process ----------------------------------------------------------------

class FakeS3:
    """``list_objects_v2`` as boto3 answers it, for ``n`` sorted keys under ``Prefix``."""

    def __init__(self, n: int):
        self.n = n
        self.when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def list_objects_v2(self, Bucket: str, Prefix: str = "", ContinuationToken: str | None = None, **_):
        start = int(ContinuationToken or 0)
        stop = min(self.n, start + PAGE)
        contents = [{"Key": Prefix + key_of(i), "LastModified": self.when, "ETag": f'"{i:032x}"',
                     "Size": 100_000 + i % 5000, "StorageClass": "STANDARD"} for i in range(start, stop)]
        resp = {"Contents": contents, "IsTruncated": stop < self.n, "KeyCount": len(contents), "Name": Bucket,
                "Prefix": Prefix, "MaxKeys": PAGE}
        if stop < self.n:
            resp["NextContinuationToken"] = str(stop)
        return resp


_POOLS: list = []


class _RssSampler:
    """The process's peak RSS since the last ``reset``, read from /proc every 2 ms by a thread (approximate:
    memory freed earlier and reused does not show)."""

    def __init__(self):
        import threading
        self._peak = _rss()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            time.sleep(0.002)
            self._peak = max(self._peak, _rss())

    def reset(self) -> int:
        self._peak = now = _rss()
        return now

    def peak(self) -> int:
        self._peak = max(self._peak, _rss())
        return self._peak


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _legacy_plan(LB, L, cfg, manifest, out_fs, out_root):
    """``_label`` before ``_plan`` existed, line for line (the done-set stays referenced for the whole job)."""
    listed_rejects = [it for it, _, _ in manifest.rejected]
    LB._check_ids(cfg, manifest.items + listed_rejects)
    L.remove_stale_temporaries(out_fs, out_root)
    done = L.done_ids(out_fs, out_root)
    todo = [i for i in manifest.items if i.id not in done]
    rejected_now = [r for r in manifest.rejected if r[0].id not in done]
    return todo, rejected_now, done


def worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(args.code or REPO).resolve()))
    import pyarrow as pa
    import pyarrow.fs as pafs
    from cluster.label import plan as LB   # the plan's module: LabelConfig, build_manifest, plan_run, _plan
    from cluster import labels as L
    from cluster import storage

    n = args.worker_keys
    fake = FakeS3(n)
    storage._s3_client_for = lambda fs, s3: fake
    cfg = LB.LabelConfig(input=f"s3://{BUCKET}/{PREFIX}", output=args.out, teachers=("t.ts",))
    out_fs, out_root = pafs.LocalFileSystem(), args.out
    mem = args.worker == "mem"
    has_plan = hasattr(LB, "_plan")
    streamed = bool(getattr(args, "worker_stream", False)) and hasattr(LB, "plan_run")
    base_pool = pa.default_memory_pool()
    rec: dict = {"n": n, "code": "streamed" if streamed else "plan" if has_plan else "legacy"}
    spilled: list[int] = []

    def drop(table):   # a block handed to Ray's object store leaves the driver: counted, not kept
        spilled.append(table.num_rows)
    # warm-up on 300 keys and a small output: the lazy imports (pyarrow's S3, pandas via Parquet) are a fixed
    # cost, not a per-key one
    warm = Path(args.out).parent / "warm"
    write_done_shards(warm, 300, 0.5)
    storage._s3_client_for = lambda fs, s3: FakeS3(300)
    wcfg = LB.LabelConfig(input=f"s3://{BUCKET}/{PREFIX}", output=str(warm), teachers=("t.ts",))
    if streamed:
        wm = wt = LB.plan_run(wcfg, out_fs, str(warm), drop)
        L.done_packed(out_fs, str(warm))
    else:
        wm = LB.build_manifest(wcfg)
        wt = LB._plan(wcfg, wm, out_fs, str(warm)) if has_plan else _legacy_plan(LB, L, wcfg, wm, out_fs, str(warm))
        LB._manifest_table(wt[0])
        (getattr(L, "done_id_array", None) or L.done_ids)(out_fs, str(warm))
    del wm, wt
    spilled.clear()
    storage._s3_client_for = lambda fs, s3: fake
    gc.collect()
    rss0 = _rss()
    rec["maxrss0"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    if mem:
        tracemalloc.start()

    sampler = _RssSampler()

    def stage(name, fn):
        gc.collect()
        pool = pa.proxy_memory_pool(base_pool)
        _POOLS.append(pool)   # a proxy pool must outlive every buffer allocated from it
        pa.set_memory_pool(pool)
        if mem:
            cur0 = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        rss_start = sampler.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        r = {"wall": wall, "cpu": cpu, "rss_start": rss_start - rss0, "rss_peak": sampler.peak() - rss_start}
        if mem:
            cur, peak = tracemalloc.get_traced_memory()
            gc.collect()
            r.update(py_peak=peak - cur0, py_held=tracemalloc.get_traced_memory()[0] - cur0,
                     arrow_peak=pool.max_memory(), arrow_held=pool.bytes_allocated())
        rec[name] = r
        return out

    def held_after() -> None:   # what the driver keeps while the Ray job runs
        rec["maxrss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        gc.collect()
        rec["rss_held"] = _rss() - rss0
        if mem:
            rec["py_held_total"] = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()

    if streamed:   # S: the whole plan, streamed (listing, done-set, filter, the Ray input's blocks)
        plan = stage("S", lambda: LB.plan_run(cfg, out_fs, out_root, drop))
        held_after()
        rec["todo"], rec["rejected_now"], rec["listed"] = plan.blocks.rows, len(plan.rejected_now), plan.total
        rec["spilled_rows"], rec["inline_rows"] = sum(spilled), len(plan.blocks.pending)
        rec["done_count"] = len(L.done_packed(out_fs, out_root))
        return rec
    manifest = stage("A", lambda: LB.build_manifest(cfg))
    if has_plan:
        todo, rejected_now = stage("B", lambda: LB._plan(cfg, manifest, out_fs, out_root))
        done = None
    else:
        todo, rejected_now, done = stage("B", lambda: _legacy_plan(LB, L, cfg, manifest, out_fs, out_root))
    table = stage("C", lambda: LB._manifest_table(todo))
    held = (manifest, todo, rejected_now, done, table)
    held_after()
    # the done-set alone, after the rest (its own figures; part of B above)
    done_fn = getattr(L, "done_id_array", None) if has_plan else None
    done_fn = done_fn or L.done_ids
    if mem:
        tracemalloc.start()
    del done
    d = stage("B1", lambda: done_fn(out_fs, out_root))
    rec["done_count"] = len(d)
    rec["todo"], rec["rejected_now"], rec["listed"] = len(todo), len(rejected_now), len(manifest.items)
    rec["todo_first"] = todo[0].key if todo else None
    del held
    return rec


# --- parent ---------------------------------------------------------------------------------------------------

def write_done_shards(out: Path, n: int, done_frac: float) -> int:
    """Label and reject shards for the first ``done_frac`` of the ``n`` keys, as the job writes them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.fs as pafs
    from cluster import labels as L
    from kd import schema as S
    from kd.imageio import encode_png

    fs = pafs.LocalFileSystem()
    png = encode_png(np.full((8, 8), 128, np.uint8))
    m = int(n * done_frac)
    for start in range(0, m, SHARD_ROWS):
        idx = range(start, min(m, start + SHARD_ROWS))
        rej = [i for i in idx if i % 100 == 7]
        keys = [key_of(i) for i in idx if i % 100 != 7]
        k = len(keys)
        L.write_shard(fs, str(out), S.LABELS_DIR, pa.table({
            S.ID: [S.stable_id(x) for x in keys], S.KEY: keys, S.SEQUENCE: [""] * k, S.FRAME: [-1] * k,
            S.ORIG_H: [375] * k, S.ORIG_W: [500] * k, S.TEACHER: ["scfnet_r50"] * k,
            S.WEIGHTS_HASH: ["0123456789abcdef"] * k, S.TTA: ["none"] * k, S.LABEL_H: [8] * k,
            S.LABEL_W: [8] * k, S.LABEL_PNG: [png] * k, S.CONF_MEAN: [0.5] * k, S.CONF_FRAC: [0.5] * k,
            S.FG_FRAC: [0.5] * k, S.DISAGREEMENT: [float("nan")] * k}, schema=L.LABEL_SCHEMA))
        if rej:
            keys = [key_of(i) for i in rej]
            k = len(keys)
            L.write_shard(fs, str(out), S.REJECTS_DIR, pa.table({
                S.ID: [S.stable_id(x) for x in keys], S.KEY: keys, S.SEQUENCE: [""] * k, S.FRAME: [-1] * k,
                S.REASON: ["corrupt"] * k, S.DETAIL: ["cannot identify image file"] * k}, schema=L.REJECT_SCHEMA))
    return m


def run_worker(code: str, mode: str, n: int, out: Path, stream: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--worker-keys", str(n), "--out", str(out), "--worker-code",
           code] + (["--worker-stream"] if stream else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {mode} {n} ({code}) failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _abc_cpu(t: dict) -> float:
    return sum(t[s]["cpu"] for s in ("S" if "S" in t else "ABC"))


def _bpk(b: float, n: int) -> str:
    return f"{b / n:.0f}"


def _heap(m: dict, stage: str) -> tuple[float, float]:
    """(peak, held) of a stage: Python heap + Arrow."""
    s = m[stage]
    return s["py_peak"] + s["arrow_peak"], s["py_held"] + s["arrow_held"]


def _peak(t: dict) -> float:
    """Peak RSS of A..C over the RSS before A: the largest of (RSS at a stage's start + its peak)."""
    return max(t[s]["rss_start"] + t[s]["rss_peak"] for s in _stages(t))


def _stages(t: dict) -> str:
    return "S" if "S" in t else "ABC"


def _heap_total(m: dict) -> tuple[float, float]:
    """(peak, held) of the whole plan: the largest stage peak over what the earlier stages held; all held."""
    held, peak = 0.0, 0.0
    for st in _stages(m):
        p, h = _heap(m, st)
        peak = max(peak, held + p)
        held += h
    return peak, held


def render(runs: list[dict], machine: dict, notes: str | None) -> str:
    """The materialized plan stage by stage (A: listing -> manifest, B: id check + done-set, C: the Ray input)."""
    big = 10**8
    lines = [
        "## The manifest at scale (issue 13 item 7): the labelling driver's time and memory per key",
        "",
        f"Machine: {machine['cpu']}, 2 cores shared with other jobs (load average {machine['load_before']} before, "
        f"{machine['load_after']} after; everything under `nice -n 10`, so wall seconds are mostly waiting for the "
        f"neighbours: compare CPU seconds), Python {machine['python']}, pyarrow {machine['pyarrow']}. Measured "
        f"{machine['date']}.",
        "",
        f"Command: `{machine['command']}`, the code before the change unpacked with `{machine['before_tree']}`. "
        "Synthetic S3 listing (boto3-shaped ListObjectsV2 pages of 1000, ImageNet-like keys of 39 characters, no "
        "network) through the real driver code; the output holds real label/reject shards of 256 rows "
        f"(`cluster.labels.write_shard`) for the first {machine['done']:.0%} of the keys, 1 in 100 of those as "
        "rejects: a rerun of a job killed half way. A = `build_manifest` (walk -> `Listed` -> `_Entry` -> `Item`, "
        "the `auto` layout test); B = the id check + the done-set + the inputs still to label; B1 = the done-set "
        "alone (also inside B); C = `_manifest_table(todo)`, the Ray job's input. Heap = tracemalloc (Python) + a "
        "proxy Arrow memory pool, peak during a stage over what was held before it, and held after it (A's, B's "
        "and C's held memory stays for the whole Ray job); one run under tracemalloc (~5x slower). RSS = "
        "the timed run shown (the median of the rounds): peak during a stage over the RSS at its start (sampled "
        "every 2 ms; memory an earlier stage freed and this one reuses does not show), the whole A..C peak and "
        "what is held after C, over the RSS before A. Bytes per key divide by the listed keys.",
        "",
        "| code | keys | A s wall (CPU) | B s wall (CPU) | B1 CPU s | C CPU s | A heap peak / held, B/key "
        "| B heap peak / held, B/key | C held, B/key | RSS peak in A / B / C, B/key | RSS peak A..C, MB "
        "| RSS held, B/key | A+B+C CPU s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        t, m = r["time"], r.get("mem")
        n = t["n"]
        heap = ["-", "-", "-"]
        if m:
            (ap, ah), (bp, bh), (_, ch) = _heap(m, "A"), _heap(m, "B"), _heap(m, "C")
            heap = [f"{_bpk(ap, n)} / {_bpk(ah, n)}", f"{_bpk(bp, n)} / {_bpk(bh, n)}", _bpk(ch, n)]
        lines.append(
            f"| {r['label']} | {n:,} | {t['A']['wall']:.1f} ({t['A']['cpu']:.2f}) | {t['B']['wall']:.1f} "
            f"({t['B']['cpu']:.2f}) | {t['B1']['cpu']:.2f} | {t['C']['cpu']:.2f} | {heap[0]} | {heap[1]} | "
            f"{heap[2]} | {_bpk(t['A']['rss_peak'], n)} / {_bpk(t['B']['rss_peak'], n)} / "
            f"{_bpk(t['C']['rss_peak'], n)} | {_peak(t) / 2**20:,.0f} | {_bpk(t['rss_held'], n)} | "
            f"{', '.join(f'{c:.2f}' for c in r.get('rounds_cpu', [_abc_cpu(t)]))} |")
    lines += ["", "Extrapolated to 10^8 keys, linearly from the per-key figures (time: CPU seconds of A+B+C at the "
              "largest N -- the listing's and the shard reads' network time comes on top, see below; RSS: the largest "
              "N; heap: the traced run):", "",
              "| code | A+B+C CPU per key, us | A+B+C CPU at 10^8 | RSS peak at 10^8 | RSS held during the Ray job "
              "at 10^8 | heap held at 10^8 | B heap peak at 10^8 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [x for x in runs if x["label"] == label]
        t = max(mine, key=lambda x: x["time"]["n"])["time"]
        traced = [x for x in mine if x.get("mem")]
        n = t["n"]
        cpu = _abc_cpu(t) / n
        cells = ["-", "-"]
        if traced:
            m = max(traced, key=lambda x: x["time"]["n"])["mem"]
            held = sum(_heap(m, s)[1] for s in "ABC") / m["n"]
            cells = [f"{held * big / 2**30:.1f} GiB", f"{_heap(m, 'B')[0] / m['n'] * big / 2**30:.1f} GiB"]
        lines.append(f"| {label} | {cpu * 1e6:.1f} | {cpu * big / 60:.0f} min | {_peak(t) / n * big / 2**30:.1f} GiB "
                     f"| {t['rss_held'] / n * big / 2**30:.1f} GiB | {cells[0]} | {cells[1]} |")
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines)


STREAM_SECTION = "manifest-stream"


def render_stream(runs: list[dict], machine: dict, notes: str | None) -> str:
    """The streamed plan against the materialized one: the driver's whole plan, per key."""
    big = 10**8
    lines = [
        "## The manifest streamed (issue 13 item 7): the labelling driver's whole plan in bounded memory", "",
        f"Machine: {machine['cpu']}, 2 cores shared with other jobs (load average {machine['load_before']} before, "
        f"{machine['load_after']} after; `nice -n 10`: compare CPU seconds), Python {machine['python']}, pyarrow "
        f"{machine['pyarrow']}. Measured {machine['date']}. Command: `{machine['command']}`, the code before the "
        f"change unpacked with `{machine['before_tree']}`. The same synthetic S3 "
        "listing and output shards as section `manifest-scale` (half the keys done, 1 in 100 of those rejects). "
        "`materialized` = `build_manifest` + `_plan` + `_manifest_table` (every `Item` of the listing, then the "
        "todo's Arrow table, all held while the Ray job runs); `streamed` = `labelling.plan_run`, what `_label` "
        "runs now: the listing a page at a time, chunks of 65,536 entries filtered against the packed done-set, "
        "and the inputs to label handed to Ray's object store in blocks of 1,024 rows once more than 65,536 (the "
        "`put` here drops them: the object store is not the driver's memory). Heap = tracemalloc + Arrow pool, "
        "peak and held over what was held before; RSS = peak and held after the plan, over the RSS before it.", "",
        "| code | keys | CPU s (wall) | heap peak / held, B/key | RSS peak, B/key | RSS held, B/key | RSS peak, MB "
        "| to label: object store / driver rows | CPU s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        t, m = r["time"], r.get("mem")
        n = t["n"]
        wall = sum(t[x]["wall"] for x in _stages(t))
        heap = "-"
        if m:
            hp, hh = _heap_total(m)
            heap = f"{_bpk(hp, n)} / {_bpk(hh, n)}"
        where = (f"{t['spilled_rows']:,} / {t['inline_rows']:,}" if "S" in t else f"0 / {t['todo']:,}")
        lines.append(f"| {r['label']} | {n:,} | {_abc_cpu(t):.2f} ({wall:.1f}) | {heap} | {_bpk(_peak(t), n)} | "
                     f"{_bpk(t['rss_held'], n)} | {_peak(t) / 2**20:,.0f} | {where} | "
                     f"{', '.join(f'{c:.2f}' for c in r.get('rounds_cpu', [_abc_cpu(t)]))} |")
    lines += ["", "Extrapolated to 10^8 keys by a line (fixed + per key) through the two largest N (CPU, RSS) and the "
              "two largest traced N (heap); with one N, per key alone:", "",
              "| code | CPU per key, us | CPU at 10^8 | RSS peak at 10^8 | RSS held at 10^8 | heap peak at 10^8 |",
              "|---|---:|---:|---:|---:|---:|"]

    def at_big(points: list[tuple[int, float]]) -> float:
        (n0, v0), (n1, v1) = (points[-2], points[-1]) if len(points) > 1 else ((0, 0.0), points[-1])
        slope = (v1 - v0) / (n1 - n0)
        return v1 + slope * (big - n1)
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = sorted((x for x in runs if x["label"] == label), key=lambda x: x["time"]["n"])
        ts = [x["time"] for x in mine]
        traced = [x["mem"] for x in mine if x.get("mem")]
        cpu = at_big([(t["n"], _abc_cpu(t)) for t in ts])
        heap = f"{at_big([(m['n'], _heap_total(m)[0]) for m in traced]) / 2**30:.1f} GiB" if traced else "-"
        lines.append(f"| {label} | {cpu / big * 1e6:.1f} | {cpu / 60:.0f} min | "
                     f"{at_big([(t['n'], _peak(t)) for t in ts]) / 2**30:.1f} GiB | "
                     f"{at_big([(t['n'], t['rss_held']) for t in ts]) / 2**30:.1f} GiB | {heap} |")
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--done", type=float, default=0.5, help="fraction of the keys already in shards")
    p.add_argument("--code", action="append", metavar="LABEL=DIR",
                   help="import cluster/ and kd/ from DIR, rows named LABEL (repeatable; default after=.)")
    p.add_argument("--trace-max", type=int, default=100_000, help="tracemalloc runs only up to this many keys")
    p.add_argument("--rounds", type=int, default=1, help="timed runs per (code, N), interleaved; the median shown")
    p.add_argument("--json", help="save the figures here")
    p.add_argument("--from-json", help="render a saved run instead of measuring")
    p.add_argument("--notes", help="a markdown file appended to the section")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--worker", choices=["time", "mem"], help=argparse.SUPPRESS)
    p.add_argument("--worker-keys", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-code", help=argparse.SUPPRESS)
    p.add_argument("--worker-stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stream", metavar="LABEL", action="append", default=[],
                   help="a --code LABEL measured through the streamed plan (labelling.plan_run): section manifest-stream")
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.code = args.worker_code
        print(json.dumps(worker(args)), flush=True)
        sys.stderr.flush()
        os._exit(0)   # no teardown: buffers of the proxy pools would be freed in any order

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        runs, machine = saved["runs"], saved["machine"]
    else:
        runs, machine = measure(args, argv)
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "machine": machine}))
    streamed = any("S" in r["time"] for r in runs)
    body = (render_stream if streamed else render)(runs, machine, Path(args.notes).read_text() if args.notes else None)
    section = STREAM_SECTION if streamed else SECTION
    print(body)
    if not args.no_write:
        spec = importlib.util.spec_from_file_location("_bench_models", REPO / "benchmarks" / "models.py")
        bench = importlib.util.module_from_spec(spec)   # imports torch: only now, after the measurements
        spec.loader.exec_module(bench)
        bench.write_section(RESULTS, section, body)
        print(f"wrote section {section!r} of {RESULTS}")
    return 0


def measure(args: argparse.Namespace, argv: list[str] | None) -> tuple[list[dict], dict]:
    import pyarrow as pa
    sys.path.insert(0, str(REPO))
    codes = [c.split("=", 1) for c in (args.code or [f"after={REPO}"])]
    load_average = lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())  # noqa: E731
    machine = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": _cpu_model(),
               "load_before": load_average(), "python": platform.python_version(), "pyarrow": pa.__version__,
               "done": args.done, "before_tree": "git archive HEAD cluster kd models | tar -x -C DIR",
               "command": "nice -n 10 .venv/bin/python benchmarks/manifest_scale.py " + " ".join(
                   argv if argv is not None else sys.argv[1:])}
    runs = []
    for n in args.keys:
        tmp = Path(tempfile.mkdtemp(prefix="manifest_scale_"))
        try:
            out = tmp / "out"
            t0 = time.perf_counter()
            done = write_done_shards(out, n, args.done)
            print(f"{n:,} keys: wrote shards for {done:,} done ids in {time.perf_counter() - t0:.1f} s", flush=True)
            times: dict[str, list[dict]] = {label: [] for label, _ in codes}
            for _ in range(args.rounds):   # interleaved: a change in the machine's load hits every code alike
                for label, code in codes:
                    times[label].append(run_worker(code, "time", n, out, label in args.stream))
            for label, code in codes:
                ts = sorted(times[label], key=_abc_cpu)
                r = {"label": label, "time": ts[len(ts) // 2], "rounds_cpu": [_abc_cpu(t) for t in times[label]]}
                if n <= args.trace_max:
                    r["mem"] = run_worker(code, "mem", n, out, label in args.stream)
                for t in times[label] + ([r["mem"]] if "mem" in r else []):
                    if t["todo"] != n - done or t["done_count"] < done:
                        raise RuntimeError(f"{label} {n}: todo {t['todo']}, done-set {t['done_count']}: expected "
                                           f"{n - done} and >= {done}")
                print(json.dumps(r), flush=True)
                runs.append(r)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    machine["load_after"] = load_average()
    return runs, machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
