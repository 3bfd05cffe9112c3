"""Streaming per-frame latency of the video student against the image student, on CPU.

The video student (``video_scfnet_m3``) runs in streaming mode (``model.streamer().step(frame)``: one encoder pass
per frame plus cross-frame attention over the cached keys/values of the K previous frames); the image student
(``scfnet_m3``) runs one forward pass per frame. Both see the same real DAVIS frames (``--sequence``) resized to
``--size`` (352), batch 1, fp32, eval, ``torch.inference_mode``.

The machine is shared with other jobs, so the two models are timed *interleaved*: each round times one image
pass and one streaming step on the same frame (alternating which goes first), and the reported ratio is the
median over rounds of ``video_ms / image_ms`` (a paired estimate that cancels slow periods), next to the
ratio of the two medians. Target (issue 6): ratio <= 1.3.

Writes the table to benchmarks/RESULTS.md between ``<!-- section: video -->`` and ``<!-- end: video -->``.

    .venv/bin/python benchmarks/video.py [--size 352] [--threads 1 2] [--rounds 120]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/models.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import count_macs, count_params, create_model  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bench_models", REPO / "benchmarks" / "models.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)  # type: ignore[union-attr]
write_section, cpu_model, load_average = _bench.write_section, _bench.cpu_model, _bench.load_average

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "video"
SHARED = Path(os.environ.get("SODKD_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_frames(sequence: str, size: int, n: int) -> list[np.ndarray]:
    folder = SHARED / "davis2016-dev" / sequence / "images"
    paths = sorted(folder.glob("*.jpg"))[:n]
    if not paths:
        raise FileNotFoundError(f"{folder}: no frames")
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]


def streaming_macs(model: torch.nn.Module, size: int) -> int:
    """MACs of one streaming step with a full memory (K previous frames cached), counted as in count_macs."""
    from torch.utils.flop_counter import FlopCounterMode

    stream = model.eval().streamer()
    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode():
        for _ in range(model.memory_frames):
            stream.step(x)
        counter = FlopCounterMode(display=False)
        with counter:
            stream.step(x)
    return counter.get_total_flops() // 2


def measure(frames: list[torch.Tensor], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timings (seconds) of the image student and of the video student's streaming step."""
    torch.manual_seed(0)
    image = create_model("scfnet_m3").eval()
    video = create_model("video_scfnet_m3").eval()
    stream = video.streamer()
    times: dict[str, list[float]] = {"image": [], "video": []}
    with torch.inference_mode():
        for i in range(warmup + rounds):
            x = frames[i % len(frames)]
            order = ("image", "video") if i % 2 == 0 else ("video", "image")
            for which in order:
                t0 = time.perf_counter()
                if which == "image":
                    image(x)
                else:
                    stream.step(x)
                dt_s = time.perf_counter() - t0
                if i >= warmup:
                    times[which].append(dt_s)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sequence", default="blackswan")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "load_before": load_average()}
    image_m, video_m = create_model("scfnet_m3"), create_model("video_scfnet_m3")
    cost = {n: (count_params(m), count_macs(m, args.size)) for n, m in (("scfnet_m3", image_m),
                                                                         ("video_scfnet_m3", video_m))}
    arrays = load_frames(args.sequence, args.size, 30)
    frames = [image_m.normalize(a.transpose(2, 0, 1)).unsqueeze(0) for a in arrays]
    rows = []
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        t = measure(frames, args.rounds, args.warmup)
        med_i, med_v = statistics.median(t["image"]), statistics.median(t["video"])
        paired = statistics.median(v / i for v, i in zip(t["video"], t["image"]))
        q1, _, q3 = statistics.quantiles([v / i for v, i in zip(t["video"], t["image"])], n=4)
        rows.append({"threads": threads, "image_ms": med_i * 1e3, "video_ms": med_v * 1e3, "paired": paired,
                     "q1": q1, "q3": q3, "of_medians": med_v / med_i, "n": len(t["image"])})
        print(f"threads {threads}: image {med_i * 1e3:.2f} ms, video stream {med_v * 1e3:.2f} ms, "
              f"ratio {paired:.3f} (paired median; IQR {q1:.3f}-{q3:.3f}), {med_v / med_i:.3f} (of medians)",
              flush=True)
    machine["load_after"] = load_average()
    (pi, mi), (pv, mv) = cost["scfnet_m3"], cost["video_scfnet_m3"]
    ms = streaming_macs(video_m, args.size)
    lines = [
        f"### Video student: streaming per-frame latency vs the image student, CPU, {args.size}x{args.size}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. Measured {machine['date']}; load average "
        f"{machine['load_before']} before, {machine['load_after']} after (shared machine).",
        "",
        f"Command: `.venv/bin/python benchmarks/video.py --size {args.size} --threads "
        f"{' '.join(map(str, dict.fromkeys(args.threads)))} --rounds {args.rounds}`. Real DAVIS frames "
        f"({args.sequence}), batch 1, fp32, eval, `inference_mode`; the two models are timed interleaved, one "
        f"image pass and one streaming step per round ({args.warmup} warm-up rounds). Ratio = median over rounds "
        "of video/image (paired), with its interquartile range, and the ratio of the two medians. Target <= 1.3.",
        "",
        f"Cost per frame: scfnet_m3 {pi / 1e6:.3f} M params, {mi / 1e9:.3f} GMACs; video_scfnet_m3 "
        f"{pv / 1e6:.3f} M params, {mv / 1e9:.3f} GMACs as a single image, {ms / 1e9:.4f} GMACs per streaming "
        f"step with K={video_m.memory_frames} cached frames (FlopCounterMode FLOPs / 2).",
        "",
        "| threads | image ms/frame | video stream ms/frame | ratio (paired median) | IQR | ratio of medians | rounds |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['image_ms']:.2f} | {r['video_ms']:.2f} | {r['paired']:.3f} | "
                     f"{r['q1']:.3f}-{r['q3']:.3f} | {r['of_medians']:.3f} | {r['n']} |")
    table = "\n".join(lines)
    print()
    print(table)
    if not args.no_write:
        write_section(RESULTS, SECTION, table)
        print(f"\nwrote section '{SECTION}' of {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
