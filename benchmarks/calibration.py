"""Output calibration (``sodkd calibrate``, :mod:`kd.calibration`) of the students and the public peer.

Each model's output scale is chosen on the 311-pair DUTS-TR hold-out (the reference runs' validation set; the
default guard: at most 0.005 of S), then full ECSSD (the test set) is scored as trained and calibrated, so the KD /
FS ratio and the comparison with CSNet-L-x2 can be read both ways.

    .venv/bin/python benchmarks/calibration.py                       # every entry, into RESULTS.md
    .venv/bin/python benchmarks/calibration.py --only fs-slim-s2,kd-sharp-slim-s2 --section calibration

Figures are cached in ``runs/ref/calibration.json`` (keyed by entry and file time), so a rerun scores only what
changed. Needs ``benchmarks/reference_runs.py prepare`` (the hold-out) and the runs' files under runs/ref; the
shipped students as trained are read from ``runs/ref/weights/uncalibrated`` (``git show b673da1:weights/FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_runs as ref  # noqa: E402  (REPO on sys.path, the data layout, the teacher, RESULTS writer)

RW = ref.OUT / "weights"
# the shipped students as trained: copies (``cp -p``) of the files ``weights/`` held at commit b673da1, before they
# were replaced by their calibrated versions
W = RW / "uncalibrated"
# label -> (what it is, weights file or the teacher); pairs that share a seed and a start are an equal budget
ENTRIES = {
    "teacher": ("CSNet-L-x2 + h-flip TTA (the public peer and the KD students' teacher)", None),
    "fs-slim-s1": ("FS x0.3 / c = 8, seed 1 (fifteenth pass)", RW / "fs-slim-s1.fp16.pt"),
    "kd-sharp-slim-s1": ("KD x0.3 / c = 8, seed 1, whole pool (fifteenth pass)", RW / "kd-sharp-slim-s1.fp16.pt"),
    "fs-slim-s2": ("FS x0.3 / c = 8, seed 2 (sixteenth pass)", RW / "fs-slim-s2.fp16.pt"),
    "kd-sharp-slim-s2": ("KD x0.3 / c = 8, seed 2, whole pool (sixteenth pass)", RW / "kd-sharp-slim-s2.fp16.pt"),
    "kd-sharp-slim-duts-s2": ("KD x0.3 / c = 8, seed 2, DUTS-TR images only, s = 0.5 (sixteenth pass)",
                              RW / "kd-sharp-slim-duts-s2.fp16.pt"),
    "kd-sharp25-slim-duts-s2": ("KD x0.3 / c = 8, seed 2, DUTS-TR images only, s = 0.25 (seventeenth pass)",
                                RW / "kd-sharp25-slim-duts-s2.fp16.pt"),
    "kd-dice-bce-conf-slim-duts-s2": ("KD x0.3 / c = 8, seed 2, DUTS-TR images only, s = 1 (seventeenth pass)",
                                      RW / "kd-dice-bce-conf-slim-duts-s2.fp16.pt"),
    "fs-w48-c2": ("FS c = 48, a ninth cycle, seed 3 (eighteenth pass)", RW / "fs-w48-c2.fp16.pt"),
    "kd-sharp-w48-c2": ("KD c = 48, a ninth cycle, seed 3 (eighteenth pass; 2,645 steps)",
                        RW / "kd-sharp-w48-c2.fp16.pt"),
    "kd-sharp-w48-c2-e4": ("KD c = 48, a ninth cycle, seed 3, after epoch 4 of 5 (eighteenth pass; 2,116 steps)",
                           RW / "kd-sharp-w48-c2-e4.fp16.pt"),
    "fs-w48-c3": ("FS c = 48, a tenth cycle, seed 4 (nineteenth pass)", RW / "fs-w48-c3.fp16.pt"),
    "kd-sharp-w48-c3": ("KD c = 48, a tenth cycle from the epoch-4 checkpoint, seed 4 (nineteenth pass)",
                        RW / "kd-sharp-w48-c3.fp16.pt"),
    "fs-w48-soup3": ("FS c = 48, the mean of the weights that end its last three cycles (eleventh, eighteenth, "
                     "nineteenth pass)", RW / "soup" / "fs-w48-soup3.fp16.pt"),
    "kd-sharp-w48-soup3": ("KD c = 48, the mean of the weights that end its last three cycles (eleventh, eighteenth "
                           "at epoch 4, nineteenth pass)", RW / "soup" / "kd-sharp-w48-soup3.fp16.pt"),
    "fs-w48-c4": ("FS c = 48, an eleventh cycle, seed 5 (twentieth pass)", RW / "fs-w48-c4.fp16.pt"),
    "kd-sharp-w48-c4": ("KD c = 48, an eleventh cycle, seed 5 (twentieth pass)", RW / "kd-sharp-w48-c4.fp16.pt"),
    "fs-w48-soup4": ("FS c = 48, the mean of the weights that end its last four cycles (eleventh, eighteenth to "
                     "twentieth pass)", RW / "soup" / "fs-w48-soup4.fp16.pt"),
    "kd-sharp-w48-soup4": ("KD c = 48, the mean of the weights that end its last four cycles (eleventh, eighteenth "
                           "at epoch 4, nineteenth, twentieth pass)", RW / "soup" / "kd-sharp-w48-soup4.fp16.pt"),
    "fs-w48-c5": ("FS c = 48, a twelfth cycle from the four-cycle mean, seed 6 (twenty-first pass)",
                  RW / "fs-w48-c5.fp16.pt"),
    "kd-sharp-w48-c5": ("KD c = 48, a twelfth cycle from the four-cycle mean, seed 6 (twenty-first pass)",
                        RW / "kd-sharp-w48-c5.fp16.pt"),
    "fs-w48-soup5": ("FS c = 48, the mean of the four cycle ends and the twelfth cycle's (twenty-first pass)",
                     RW / "soup" / "fs-w48-soup5.fp16.pt"),
    "kd-sharp-w48-soup5": ("KD c = 48, the mean of the four cycle ends and the twelfth cycle's (twenty-first pass)",
                           RW / "soup" / "kd-sharp-w48-soup5.fp16.pt"),
    "fs-w48-c6": ("FS c = 48, a thirteenth cycle from the five-file mean, seed 7, channels_last (twenty-second pass)",
                  RW / "fs-w48-c6.fp16.pt"),
    "kd-sharp-w48-c6": ("KD c = 48, a thirteenth cycle from the five-file mean, seed 7, channels_last (twenty-second "
                        "pass)", RW / "kd-sharp-w48-c6.fp16.pt"),
    "fs-w48-soup6": ("FS c = 48, the mean of the four cycle ends and the twelfth and thirteenth cycles' (twenty-first "
                     "and twenty-second passes)", RW / "soup" / "fs-w48-soup6.fp16.pt"),
    "kd-sharp-w48-soup6": ("KD c = 48, the mean of the four cycle ends and the twelfth and thirteenth cycles' "
                           "(twenty-first and twenty-second passes)", RW / "soup" / "kd-sharp-w48-soup6.fp16.pt"),
    "shipped-fs-c48": ("FS c = 48 (eleventh pass; `weights/fs-scfnet_m3.fp16.pt` until 2026-12-06, replaced by the "
                       "four-cycle mean)", W / "fs-scfnet_m3.fp16.pt"),
    "shipped-kd-c48": ("KD c = 48 (eleventh pass; `weights/kd-scfnet_m3-from-csnet-L-x2.fp16.pt` until 2026-12-06, "
                       "replaced by the four-cycle mean)",
                       W / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt"),
    "shipped-kd-c16": ("KD c = 16 (`weights/kd-scfnet_m3-c16-from-csnet-L-x2.fp16.pt`)",
                       W / "kd-scfnet_m3-c16-from-csnet-L-x2.fp16.pt"),
    "shipped-kd-x0.3": ("KD x0.3 / c = 8 (`weights/kd-scfnet_m3-x0.3-c8-from-csnet-L-x2.fp16.pt`)",
                        W / "kd-scfnet_m3-x0.3-c8-from-csnet-L-x2.fp16.pt"),
}
# the x1.0 / c = 24 chains: cycle ends (suffix, cycles, FS / KD steps in all, pass) and checkpoint means
for _sfx, _n, _steps, _pass in [("c4", "four", ("14,880", "14,812"), "twenty-sixth"),
                                ("c5", "five", ("18,600", "18,515"), "twenty-seventh"),
                                ("c6", "six", ("22,320", "22,218"), "twenty-eighth"),
                                ("c7", "seven", ("26,040", "25,921"), "twenty-ninth"),
                                ("c8", "eight", ("29,760", "29,624"), "thirtieth")]:
    for _b, _tag, _st in (("fs", "FS", _steps[0]), ("kd-sharp", "KD", _steps[1])):
        ENTRIES[f"{_b}-x1c24-{_sfx}"] = (f"{_tag} MobileNetV3 x1.0, c = 24, {_n} cycles, {_st} steps ({_pass} pass)",
                                         RW / f"{_b}-x1c24-{_sfx}.fp16.pt")
for _b, _tag, _st in (("fs", "FS", "26,040"), ("kd-sharp", "KD", "25,921")):   # the seventh cycle at peak lr 0.02
    ENTRIES[f"{_b}-x1c24-c7hi"] = (f"{_tag} MobileNetV3 x1.0, c = 24, six cycles + a seventh at peak lr 0.02, {_st} "
                                   "steps (thirty-first pass)", RW / f"{_b}-x1c24-c7hi.fp16.pt")
for _sfx, _w, _pass in (("c7co", "0.2", "thirty-second"), ("c7co33", "0.33", "thirty-third")):   # second-round teacher
    ENTRIES[f"kd-sharp-x1c24-{_sfx}"] = (f"KD MobileNetV3 x1.0, c = 24, six cycles + a seventh on the teacher's labels "
                                         f"blended with the sixth end's maps (w = {_w}), 25,921 steps ({_pass} pass)",
                                         RW / f"kd-sharp-x1c24-{_sfx}.fp16.pt")
for _sfx, _w in (("c6co", "0.2"), ("c6co10", "0.1")):                        # second round, a cycle earlier
    ENTRIES[f"kd-sharp-x1c24-{_sfx}"] = (f"KD MobileNetV3 x1.0, c = 24, five cycles + a sixth on the teacher's labels "
                                         f"blended with the fifth end's maps (w = {_w}), 22,218 steps (thirty-fourth "
                                         "pass)", RW / f"kd-sharp-x1c24-{_sfx}.fp16.pt")
for _b, _tag, _st in (("fs", "FS", "22,320"), ("kd-sharp", "KD", "22,218")):   # the sixth cycle, seed 1
    _k = f"{_b}-x1c24-c6{'co' if _b == 'kd-sharp' else ''}-s1"
    _as = " as `kd-sharp-x1c24-c6co`" if _tag == "KD" else ""
    ENTRIES[_k] = (f"{_tag} MobileNetV3 x1.0, c = 24, five cycles + a sixth{_as} with seed 1, {_st} steps "
                   "(thirty-fifth pass)", RW / f"{_k}.fp16.pt")
for _sfx, _what in (("soup2", "fifth and sixth"), ("soup3", "fourth to sixth"), ("c7soup2", "sixth and seventh"),
                    ("c7soup3", "fifth to seventh"), ("c8soup2", "seventh and eighth"), ("c8soup3", "sixth to eighth")):
    for _b, _tag in (("fs", "FS"), ("kd-sharp", "KD")):
        ENTRIES[f"{_b}-x1c24-{_sfx}"] = (f"{_tag} MobileNetV3 x1.0, c = 24, the mean of its {_what} cycle ends",
                                         RW / "soup" / f"{_b}-x1c24-{_sfx}.fp16.pt")
for _k in [k for k in ENTRIES if k.startswith("shipped-")]:     # the shipped files' rows stay last
    ENTRIES[_k] = ENTRIES.pop(_k)
# the equal-budget pairs whose KD / FS ratio the table gives: (KD entry, FS entry)
PAIRS = [("kd-sharp-slim-s1", "fs-slim-s1"), ("kd-sharp-slim-s2", "fs-slim-s2"),
         ("kd-sharp-slim-duts-s2", "fs-slim-s2"), ("kd-sharp25-slim-duts-s2", "fs-slim-s2"),
         ("kd-dice-bce-conf-slim-duts-s2", "fs-slim-s2"), ("shipped-kd-c48", "shipped-fs-c48"),
         ("kd-sharp-w48-c2-e4", "fs-w48-c2"), ("kd-sharp-w48-c2", "fs-w48-c2"), ("kd-sharp-w48-c3", "fs-w48-c3"),
         ("kd-sharp-w48-soup3", "fs-w48-soup3"), ("kd-sharp-w48-c4", "fs-w48-c4"),
         ("kd-sharp-w48-soup4", "fs-w48-soup4"),
         ("kd-sharp-w48-c5", "fs-w48-c5"), ("kd-sharp-w48-soup5", "fs-w48-soup5"),
         ("kd-sharp-w48-c6", "fs-w48-c6"), ("kd-sharp-w48-soup6", "fs-w48-soup6"),
         *[(f"kd-sharp-x1c24-{s}", f"fs-x1c24-{s}") for s in ("c4", "c5", "c6", "soup2", "soup3", "c7", "c7soup2",
                                                                      "c7soup3", "c8", "c8soup2", "c8soup3", "c7hi")],
         ("kd-sharp-x1c24-c7co", "fs-x1c24-c7"), ("kd-sharp-x1c24-c7co33", "fs-x1c24-c7"),
         ("kd-sharp-x1c24-c6co", "fs-x1c24-c6"), ("kd-sharp-x1c24-c6co10", "fs-x1c24-c6"),
         ("kd-sharp-x1c24-c6co-s1", "fs-x1c24-c6-s1")]


def runner(label: str, threads: int):
    """(predict: uint8 (N, S, S, 3) -> (N, S, S) probabilities, S) for an entry."""
    import torch

    from cluster.calibrate import model_predict
    from cluster.teachers import build_teacher
    from models import load_weights
    torch.set_num_threads(threads)
    path = ENTRIES[label][1]
    if path is None:
        t = build_teacher([ref.TEACHERS["csnet-x2"]], tta="hflip", device="cpu", precision="fp32", input_size=None,
                          threads=threads)
        return (lambda ims: t.predict_tensor(ims).float().cpu().numpy()), t.input_size
    model = load_weights(path)          # as `sodkd calibrate` runs it, so both choose the same scale
    return model_predict(model), model.input_size


def score(label: str, threads: int) -> dict:
    from cluster.catalog import paired_folder
    from cluster.calibrate import val_logits
    from kd.calibration import choose_output_scale
    predict, size = runner(label, threads)
    t0 = time.perf_counter()
    val = choose_output_scale(*val_logits(predict, paired_folder(str(ref.OUT / "data" / "duts-val")), size)[:2])
    test = choose_output_scale(*val_logits(predict, ref._ecssd(), size)[:2], scales=(val.scale,), max_s_drop=1.0)
    return {"size": size, "scale": val.scale, "val": {f"{k:g}": m for k, m in val.metrics.items()},
            "ecssd": {"1": test.metrics[1.0], "k": test.metrics[val.scale]}, "wall_s": time.perf_counter() - t0}


def table(res: dict) -> str:
    lines = ["| model | scale k (hold-out) | hold-out MAE 1 -> k | ECSSD MAE as trained | ECSSD MAE at k | "
             "ECSSD S as trained | S at k | max F | mean E as trained | mean E at k |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in res.items():
        v1, vk, e1, ek = r["val"]["1"], r["val"][f"{r['scale']:g}"], r["ecssd"]["1"], r["ecssd"]["k"]
        lines.append(f"| {ENTRIES[label][0]} | {r['scale']:g} | {v1['mae']:.4f} -> {vk['mae']:.4f} | "
                     f"{e1['mae']:.4f} | **{ek['mae']:.4f}** | {e1['sm']:.3f} | {ek['sm']:.3f} | "
                     f"{e1['fm_max']:.3f} | {e1['em_mean']:.3f} | {ek['em_mean']:.3f} |")
    ratios = ["", "| KD run / FS run (equal budget) | ECSSD MAE ratio as trained | ratio, each at its own k |",
              "|---|---|---|"]
    for kd, fs in PAIRS:
        if kd in res and fs in res:
            a, b = res[kd]["ecssd"], res[fs]["ecssd"]
            ratios.append(f"| `{kd}` / `{fs}` | {a['1']['mae'] / b['1']['mae']:.3f} | "
                          f"{a['k']['mae'] / b['k']['mae']:.3f} |")
    return "\n".join(lines + ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated entries (default: every entry whose file exists)")
    ap.add_argument("--section", default="calibration")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cache_path = ref.OUT / "calibration.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    res = {}
    for label, (_, path) in ENTRIES.items():
        if (args.only and label not in args.only.split(",")) or (path is not None and not path.exists()):
            continue
        key = f"{label}:{os.path.getmtime(path):.0f}" if path is not None else label
        if key not in cache:
            print(f"scoring {label} ...", flush=True)
            cache[key] = score(label, args.threads)
            cache_path.write_text(json.dumps(cache, indent=1))
        res[label] = cache[key]
        print(f"{label}: k {res[label]['scale']:g}, ECSSD MAE {res[label]['ecssd']['1']['mae']:.4f} -> "
              f"{res[label]['ecssd']['k']['mae']:.4f}", flush=True)
    head = ("## Output calibration: one logit scale per model, chosen on the DUTS-TR hold-out, scored on full ECSSD\n\n"
            "`benchmarks/calibration.py` (what `sodkd calibrate --weights FILE --val runs/ref/data/duts-val` does for "
            "one file): each model's finest map `sigmoid(k z)`, k in 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, the lowest "
            "hold-out MAE among the k that cost at most 0.005 of hold-out S; then the 1,000 ECSSD pairs (the test "
            "set, not used to choose) at k = 1 and the chosen k, at each model's own size, PySODMetrics conventions. "
            "max F does not depend on k (the scale keeps every pixel's rank).\n\n")
    ref.write_results(args.section, head + table(res))
    print(table(res))


if __name__ == "__main__":
    main()
