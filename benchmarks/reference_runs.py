"""Reference runs: the FS student and KD students at one budget, then the full ECSSD table.

    # the data layout (symlinks into ../shared/data) and the teacher's labels of the unlabeled pool
    .venv/bin/python benchmarks/reference_runs.py prepare
    sodkd label --input runs/ref/data/kd-pool --output runs/ref/labels-csnet-x2-hflip \\
        --teacher "../shared/teachers/csnet-L-x2.onnx?card=jobs/cards/csnet-L.card.yaml" tta=hflip label_size=224
    # (eighth pass) 4,000 synthetic views of the pool, labelled by the same teacher
    .venv/bin/python benchmarks/reference_runs.py prepare-views --count 4000
    sodkd label --input runs/ref/data/kd-views --output runs/ref/labels-views-csnet-x2-hflip \\
        --teacher "../shared/teachers/csnet-L-x2.onnx?card=jobs/cards/csnet-L.card.yaml" tta=hflip label_size=224
    # one training per process (run them side by side, one torch thread each); resumable by name
    .venv/bin/python benchmarks/reference_runs.py train fs --steps 4000
    .venv/bin/python benchmarks/reference_runs.py train kd-dice-bce --steps 4000
    # every finished run + the teachers on full ECSSD, into RESULTS.md
    .venv/bin/python benchmarks/reference_runs.py eval --section reference-runs-3

Data: DUTS-TR split by sorted name (every 17th pair is validation, 311 pairs; the other 4,966 train the FS
student); the KD pool is those 4,966 DUTS-TR images *without masks* plus the four unlabeled sets of
``../shared/data/unlabeled`` (3,509 images): 8,475 images the KD students see only through the teacher.
Validation (best checkpoint) is on the DUTS-TR hold-out; full ECSSD is the test set, scored once at the end.

Every run: ``scfnet_m3`` from random weights (no ImageNet weights can be downloaded here), decoded once at
``SIZE`` square, batch 16, one torch thread, SGD Nesterov 0.9 / 5e-4, lr 0.05 with a short warm-up and a
per-iteration cosine to 2%, every parameter at one rate, h-flip + crop + mild photometric augmentation, and
the same number of optimizer steps (``--steps``; epochs are rounded so each run gets at least that many).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd.augment import MILD  # noqa: E402  (the reference recipe's augmentation)
SHARED = Path(os.environ.get("SODKD_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
OUT = REPO / "runs" / "ref"

SIZE = 224
BATCH = 16
LR = 0.05
CARD = REPO / "jobs" / "cards" / "csnet-L.card.yaml"
TEACHERS = {
    "csnet-x1": f"{SHARED / 'teachers' / 'csnet-L-x1.onnx'}?card={CARD}",
    "csnet-x2": f"{SHARED / 'teachers' / 'csnet-L-x2.onnx'}?card={CARD}",
}
LABELS = OUT / "labels-csnet-x2-hflip"       # the best entry of the teacher table (benchmarks/teachers.py)
TEACHER_NAME = "CSNet-L-x2 + h-flip TTA"
UNLABELED_SETS = ("imagenet-1k", "imagenet-det200", "imagenet-val1300", "coco-mini")

# name -> (mode, loss sections, what it is)
RUNS = {
    "fs": ("supervised", {"mask_loss": {"boundary": 0.0, "bce": 1.0}}, "DUTS-TR masks; dice + BCE"),
    "fs-paper": ("supervised", {"mask_loss": {"boundary": 1.0, "bce": 0.0}},
                 "DUTS-TR masks; dice + boundary dice (KD-SCFNet)"),
    "kd-dice": ("distill", {"kd": {"structure": "dice", "pixel": "none"}}, "teacher labels; dice only (the paper)"),
    "kd-bce": ("distill", {"kd": {"structure": "none", "pixel": "bce"}}, "teacher labels; BCE only"),
    "kd-dice-bce": ("distill", {"kd": {"structure": "dice", "pixel": "bce"}}, "teacher labels; dice + BCE"),
    "kd-dice-bce-conf": ("distill", {"kd": {"structure": "dice", "pixel": "bce", "confidence": "teacher"}},
                         "teacher labels; dice + BCE x teacher confidence"),
    "kd-sharp": ("distill", {"kd": {"structure": "dice", "pixel": "bce", "confidence": "teacher", "sharpen": 0.5}},
                 "teacher labels sharpened (s = 0.5); dice + BCE x teacher confidence"),
}
RUNS["kd-views"] = ("distill", RUNS["kd-sharp"][1], "as kd-sharp, the pool + synthetic views of it (zoomed crops, "
                    "pasted object cut-outs) the teacher labelled")

# further cosine cycles from the weights a previous cycle left (the same extra steps for both): does a longer
# budget widen KD's margin over FS? name -> (the run whose recipe it repeats, the weights file it starts from,
# the cycle's peak lr, which cycle it is). c2 started from the fourth pass's files (weights/ at bb205c7), c3 from
# c2's (the committed files since 975a5ff). The paths name ``weights/`` files as they were when each pass ran; since
# 2026-12-06 they hold the four-cycle means (the eleventh pass's files: runs/ref/weights/uncalibrated, git f885927).
CYCLES = {"fs-c2": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.02, "second"),
          "kd-sharp-c2": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.02, "second"),
          "fs-c3": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.01, "third"),
          "kd-sharp-c3": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.01, "third"),
          "fs-c4": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.01, "fourth (longer)"),
          "kd-sharp-c4": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.01,
                          "fourth (longer)"),
          "fs-c5": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.005, "fifth"),
          "kd-sharp-c5": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.005, "fifth"),
          "kd-views-c5": ("kd-views", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.005, "fifth"),
          "fs-c6": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.005, "sixth"),
          "kd-sharp-c6": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.005, "sixth"),
          "kd-views-c6": ("kd-views", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.005, "sixth"),
          "fs-w32": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.01, "seventh (decoder widened to c = 32)"),
          "kd-sharp-w32": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.01,
                           "seventh (decoder widened to c = 32)"),
          "fs-w48": ("fs", OUT / "weights" / "fs-w32.fp16.pt", 0.01, "eighth (decoder widened again, to c = 48)"),
          "kd-sharp-w48": ("kd-sharp", OUT / "weights" / "kd-sharp-w32.fp16.pt", 0.01,
                           "eighth (decoder widened again, to c = 48)"),
          "fs-slim": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.02, "ninth (slimmed to x0.3, c = 8)"),
          "kd-sharp-slim": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.02,
                            "ninth (slimmed to x0.3, c = 8)"),
          "fs-slim2": ("fs", OUT / "weights" / "fs-slim.fp16.pt", 0.01, "tenth (at x0.3, c = 8)"),
          "kd-sharp-slim2": ("kd-sharp", OUT / "weights" / "kd-sharp-slim.fp16.pt", 0.01, "tenth (at x0.3, c = 8)"),
          "fs-slim25": ("fs", REPO / "weights" / "fs-scfnet_m3.fp16.pt", 0.02, "ninth (slimmed to x0.25, c = 8)"),
          "kd-sharp-slim25": ("kd-sharp", REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt", 0.02,
                              "ninth (slimmed to x0.25, c = 8)")}
# (tenth pass) the capacity route: the cycle starts from its file with the decoder widened function-preservingly
# (models.scfnet.widen_decoder, Net2WiderNet; noise 0.01 breaks the copies' symmetry): name -> decoder width
WIDEN = {"fs-w32": 32, "kd-sharp-w32": 32, "fs-w48": 48, "kd-sharp-w48": 48}
# (twelfth pass, issue 12) the fast student: the c = 48 files slimmed (models.scfnet.slim: the encoder to
# MobileNetV3 x0.3, the decoder to c = 8, keeping each layer's largest-|BN gamma| channels), then a cycle of
# fine-tuning: name -> (width_mult, decoder width)
SLIM = {"fs-slim": (0.3, 8), "kd-sharp-slim": (0.3, 8), "fs-slim25": (0.25, 8), "kd-sharp-slim25": (0.25, 8)}
# a views run that learns from the first N views only (by their draw index, so the mix of kinds is the draw's):
# with 3,370 views an epoch is 740 steps and five of them make 3,700, against KD's 7 x 529 and FS's 12 x 310
VIEW_SUBSET = {"kd-views-c6": 3370}
# (fifteenth pass) the twelfth pass's two runs again with other seeds (``run.seed``: the data order, the
# augmentation draws, torch's initial state; the slimmed start is the same file): how far apart are single runs of
# one recipe? name -> (the run it repeats, seed); the twelfth pass's own runs are seed 0
SEEDS = {f"{b}-s{s}": (b, s) for s in (1, 2) for b in ("fs-slim", "kd-sharp-slim")}
# (sixteenth pass) where KD's margin comes from: seed 2's KD run learning from the 4,966 DUTS-TR images of its pool
# only (the FS student's images, without their masks), so the 3,509 images from other sets are all it lacks
DUTS_ONLY = {"kd-sharp-slim-duts-s2"}
SEEDS["kd-sharp-slim-duts-s2"] = ("kd-sharp-slim", 2)
# (seventeenth pass) where should the sharpening live, in the targets or in the output? The DUTS-only arm, seed 2,
# FS's schedule, with the targets sharpened harder (s = 0.25) and not at all (s = 1, ``kd-dice-bce-conf``); FS has
# no such knob, so ``fs-slim-s2`` stays the baseline
RUNS["kd-sharp25"] = ("distill", {"kd": {**RUNS["kd-sharp"][1]["kd"], "sharpen": 0.25}},
                      RUNS["kd-sharp"][2].replace("s = 0.5", "s = 0.25"))
for _b in ("kd-sharp25", "kd-dice-bce-conf"):
    CYCLES[_b + "-slim"], SLIM[_b + "-slim"] = (_b, *CYCLES["kd-sharp-slim"][1:]), SLIM["kd-sharp-slim"]
    DUTS_ONLY.add(_b + "-slim-duts-s2")
    SEEDS[_b + "-slim-duts-s2"] = (_b + "-slim", 2)
for _k, (_b, _s) in SEEDS.items():
    CYCLES[_k], SLIM[_k] = CYCLES[_b], SLIM[_b]


# (eighteenth pass) the c = 48 pair, the shipped files as trained (weights/ at b673da1, before calibration; copies in
# runs/ref/weights/uncalibrated), given a ninth cycle at a lower peak rate with a data order of their own (seed 3):
# does more budget at the largest width the issue allows widen KD's margin, and does the shipped KD student gain?
for _b, _f in (("fs", "fs-scfnet_m3"), ("kd-sharp", "kd-scfnet_m3-from-csnet-L-x2")):
    CYCLES[_b + "-w48-c2"] = (_b, OUT / "weights" / "uncalibrated" / f"{_f}.fp16.pt", 0.005, "ninth (at c = 48)")
    SEEDS[_b + "-w48-c2"] = (_b + "-w48", 3)


# (nineteenth pass) a tenth cycle for the equal-budget pair of the eighteenth: FS from its finished run (2,170 steps),
# KD from its checkpoint after epoch 4 (2,116 steps), each for its own whole epochs again (``--steps 2170`` for FS:
# 7 x 310; ``--steps 2116`` for KD: 4 x 529, annealed to the end this time), seed 4: FS's hold-out MAE had stopped
# falling, KD's had not -- does the margin widen as FS, held to 4,966 masks, saturates and KD, on 8,475 images,
# does not?
for _b, _f in (("fs", "fs-w48-c2"), ("kd-sharp", "kd-sharp-w48-c2-e4")):
    CYCLES[_b + "-w48-c3"] = (_b, OUT / "weights" / f"{_f}.fp16.pt", 0.005, "tenth (at c = 48)")
    SEEDS[_b + "-w48-c3"] = (_b + "-w48", 4)
# (twentieth pass) an eleventh cycle, the same again from the nineteenth pass's files, seed 5: a second point of the
# trend at c = 48
for _b in ("fs", "kd-sharp"):
    CYCLES[_b + "-w48-c4"] = (_b, OUT / "weights" / f"{_b}-w48-c3.fp16.pt", 0.005, "eleventh (at c = 48)")
    SEEDS[_b + "-w48-c4"] = (_b + "-w48", 5)
# (twenty-first pass) a twelfth cycle from each chain's four-cycle mean (``sodkd average`` of the eleventh, eighteenth
# -- KD at epoch 4 --, nineteenth and twentieth pass ends; runs/ref/weights/soup), seed 6: does a cycle from the
# averaged weights go below the mean itself, and where does the ratio land from there?
for _b in ("fs", "kd-sharp"):
    CYCLES[_b + "-w48-c5"] = (_b, OUT / "weights" / "soup" / f"{_b}-w48-soup4.fp16.pt", 0.005,
                              "twelfth (at c = 48, from the four-cycle mean)")
    SEEDS[_b + "-w48-c5"] = (_b + "-w48", 6)
# (twenty-second pass) a thirteenth cycle from each chain's five-file mean (the four + the twenty-first pass's end;
# runs/ref/weights/soup), seed 7, the first pass trained in the channels_last layout (``scaling.channels_last``, the
# default since): the twenty-first pass's steps, lr and side-by-side conditions, so its wall and CPU time per step
# measure the layout's gain in the whole pipeline, and its ends give the chains a sixth point
for _b in ("fs", "kd-sharp"):
    CYCLES[_b + "-w48-c6"] = (_b, OUT / "weights" / "soup" / f"{_b}-w48-soup5.fp16.pt", 0.005,
                              "thirteenth (at c = 48, from the five-file mean, channels_last)")
    SEEDS[_b + "-w48-c6"] = (_b + "-w48", 7)


# (twenty-third pass, eleventh session) the recognition route: the KD student's fit error is whole regions, not edges
# (RESULTS `kd-gap`, `output-stride`), and widening the decoder to c = 48 helped FS more than KD (`reference-runs-10`):
# so spend the 0.3-GMAC budget on the encoder instead -- MobileNetV3 x1.0 with c = 24 (2.94 M params, 0.285 GMACs at
# 224) against the shipped x0.5 / c = 48 (1.03 M, 0.293) -- a new pair of chains from random weights, the first
# cycle at the first pass's peak rate; name -> scfnet_m3 keyword overrides. Later cycles start from the committed
# fp16 ends (``CYCLES``), since a session's runs/ do not outlive it.
CHAINS = REPO / "benchmarks" / "chains"   # committed cycle ends that later sessions go on from
ARCH = {f"{b}-x1c24": {"width_mult": 1.0, "channels": 24} for b in ("fs", "kd-sharp")}
for _b in ("fs", "kd-sharp"):
    RUNS[_b + "-x1c24"] = (RUNS[_b][0], RUNS[_b][1], RUNS[_b][2] + "; MobileNetV3 x1.0 encoder, c = 24, from random "
                           "weights")
    # the second cycle, as the x0.5 chain's (`reference-runs-5`: peak lr 0.02, FS 9 epochs, KD 5)
    CYCLES[_b + "-x1c24-c2"] = (_b + "-x1c24", OUT / "weights" / f"{_b}-x1c24.fp16.pt", 0.02, "second")
    # the third, as the x0.5 chain's (`reference-runs-6`: lr 0.01, FS 7 epochs, KD 4), from the second cycle's ends
    # as committed (benchmarks/chains/: runs/ref does not outlive a session)
    CYCLES[_b + "-x1c24-c3"] = (_b + "-x1c24", CHAINS / f"{_b}-x1c24-c2.fp16.pt", 0.01, "third")  # files: git 0a57720
    # the fourth, as the x0.5 chain's (`reference-runs-7`: lr 0.01, longer: FS 20 epochs, KD 12), from the third's ends
    CYCLES[_b + "-x1c24-c4"] = (_b + "-x1c24", CHAINS / f"{_b}-x1c24-c3.fp16.pt", 0.01,
                                "fourth (longer)")  # files: git f9c84e5
    # the fifth, as the x0.5 chain's (`reference-runs-8`: lr 0.005, FS 12 epochs, KD 7), from the fourth's ends
    CYCLES[_b + "-x1c24-c5"] = (_b + "-x1c24", CHAINS / f"{_b}-x1c24-c4.fp16.pt", 0.005, "fifth")  # git 254274c
    # the sixth, as the x0.5 chain's (`reference-runs-9`: lr 0.005, FS 12 epochs, KD 7), from the fifth's ends
    CYCLES[_b + "-x1c24-c6"] = (_b + "-x1c24", CHAINS / f"{_b}-x1c24-c5.fp16.pt", 0.005, "sixth")
    # the seventh, from the sixth's ends (the x0.5 chain had no plain seventh cycle: it widened its decoder there)
    CYCLES[_b + "-x1c24-c7"] = (_b + "-x1c24", CHAINS / f"{_b}-x1c24-c6.fp16.pt", 0.005, "seventh")
    CYCLES[_b + "-x1c24-c8"] = (_b + "-x1c24", CHAINS / f"{_b}-x1c24-c7.fp16.pt", 0.005, "eighth")  # git d3f637b
    CYCLES[_b + "-x1c24-c9"] = (_b + "-x1c24", CHAINS / f"{_b}-x1c24-c8.fp16.pt", 0.005, "ninth")
# (thirty-first pass, fifteenth session) the sixth ends again given a seventh cycle at four times the peak rate
# (0.02, the second cycle's): the KD student fits its teacher no better on the images it learnt from than on unseen
# ones (`kd-gap-x1c24`: MAE to the teacher's labels .053 on pool images, .051 on the hold-out), so it is short of
# fit, not of data -- does a higher rate let it fit further where 0.005 levelled off? FS gets the same cycle, so
# the pair stays at equal budget. The start files are the sixth ends (benchmarks/chains/ at git b40ce6f, same sha256)
for _b in ("fs", "kd-sharp"):
    CYCLES[_b + "-x1c24-c7hi"] = (_b + "-x1c24", OUT / "weights" / f"{_b}-x1c24-c6.fp16.pt", 0.02,
                                  "seventh")
# (thirty-second pass) a second-round teacher: the seventh cycle of the KD chain again (lr 0.005, seed 0: only the
# labels differ from `kd-sharp-x1c24-c7`), learning from the teacher's labels blended with the sixth KD end's own
# maps (`benchmarks/co_teacher.py`: w = 0.2 in logit space, chosen on the DAVIS frames; no mask anywhere). The
# teacher is the KD student's ceiling (it levels off .006 above it): a better label set is the lever left
# (thirty-third pass) the same with w = 0.33 (the DAVIS probe's label MAE at w = 0.1-0.33 lies within .001);
# the two are chosen between on the hold-out, not on ECSSD
CO_LABELS = {"kd-sharp-x1c24-c7co": OUT / "labels-blend-c6-w0.2",
             "kd-sharp-x1c24-c7co33": OUT / "labels-blend-c6-w0.33"}
for _k, _w in (("kd-sharp-x1c24-c7co", "0.2"), ("kd-sharp-x1c24-c7co33", "0.33")):
    CYCLES[_k] = ("kd-sharp-x1c24", OUT / "weights" / "kd-sharp-x1c24-c6.fp16.pt", 0.005,
                  f"seventh (labels: the teacher's blended with the sixth end's maps, w = {_w})")
# (thirty-fourth pass, sixteenth session) the second-round teacher one cycle earlier: the sixth cycle again from the
# fifth ends (lr 0.005, seed 0: only the labels differ from `kd-sharp-x1c24-c6`), the labels blended with the fifth
# KD end's maps (`co_teacher.py probe` with that student chose w = 0.2 on DAVIS again; w = 0.1 is the next best and
# the hold-out MAE's choice on duts-val at scale 1). The sixth cycle is where KD / FS was lowest as trained (0.866)
# and calibrated (0.8501); its FS end (.0872) is the equal-budget baseline. The hold-out chooses between w = 0.2 and
# 0.1, not ECSSD
for _k, _w in (("kd-sharp-x1c24-c6co", "0.2"), ("kd-sharp-x1c24-c6co10", "0.1")):
    CO_LABELS[_k] = OUT / f"labels-blend-c5-w{_w}"
    CYCLES[_k] = ("kd-sharp-x1c24", OUT / "weights" / "kd-sharp-x1c24-c5.fp16.pt", 0.005,
                  f"sixth (labels: the teacher's blended with the fifth end's maps, w = {_w})")
# a second seed of the sixth-cycle pair (data order, augmentation draws; the same start files, which are
# benchmarks/chains/ at git 9e7e8fc, same sha256): is one pair's ratio more than seed noise?
CYCLES["fs-x1c24-c6-s1"] = ("fs-x1c24", OUT / "weights" / "fs-x1c24-c5.fp16.pt", 0.005, "sixth")
CYCLES["kd-sharp-x1c24-c6co-s1"] = CYCLES["kd-sharp-x1c24-c6co"]
CO_LABELS["kd-sharp-x1c24-c6co-s1"] = CO_LABELS["kd-sharp-x1c24-c6co"]
for _k in ("fs-x1c24-c6-s1", "kd-sharp-x1c24-c6co-s1"):
    SEEDS[_k] = (_k[:-3], 1)
# the second round again, one cycle on: the seventh cycle from the sixth second-round end, learning from the
# teacher's labels blended with that end's maps (w = 0.2); its equal-budget baseline is `fs-x1c24-c7` (.0841)
CO_LABELS["kd-sharp-x1c24-c7co2"] = OUT / "labels-blend-c6co-w0.2"
CYCLES["kd-sharp-x1c24-c7co2"] = ("kd-sharp-x1c24", OUT / "weights" / "kd-sharp-x1c24-c6co.fp16.pt", 0.005,
                                  "seventh (labels: the teacher's blended with the second-round sixth end's maps, "
                                  "w = 0.2)")


def run_seed(name: str) -> int:
    """The ``run.seed`` of run ``name``: its ``SEEDS`` entry's, else 0."""
    return SEEDS.get(name, ("", 0))[1]


for _k, (_base, _w, _lr, _nth) in CYCLES.items():
    RUNS[_k] = (RUNS[_base][0], RUNS[_base][1], RUNS[_base][2] + f"; + {'an' if _nth[0] in 'aeio' else 'a'} {_nth} cycle (lr {_lr}) from "
                f"`{_w.relative_to(REPO)}`" + (f"; seed {SEEDS[_k][1]}" if _k in SEEDS else "")
                + ("; the pool's 4,966 DUTS-TR images only" if _k in DUTS_ONLY else ""))

# (eighteenth pass) --steps 2170 gave the KD run 5 epochs of 529 (2,645 steps) against FS's 7 of 310 (2,170): its
# checkpoint after epoch 4 (2,116 steps, its cosine not yet at the end) is the equal-budget row; its state file is
# written from the run's checkpoint by hand (weights: runs/ref/weights/kd-sharp-w48-c2-e4.fp16.pt)
RUNS["kd-sharp-w48-c2-e4"] = (RUNS["kd-sharp-w48-c2"][0], RUNS["kd-sharp-w48-c2"][1], RUNS["kd-sharp-w48-c2"][2]
                              + "; its checkpoint after epoch 4 of 5 (FS's budget; lr not yet annealed)")
SEEDS["kd-sharp-w48-c2-e4"] = SEEDS["kd-sharp-w48-c2"]

# the KD-loss ablation at a shorter budget (all four rows at the same steps): abl-dice, abl-bce, ...
RUNS.update({"abl-" + k[3:]: v for k, v in list(RUNS.items()) if k.startswith("kd-")})


def holdout_stems() -> list[str]:
    """The DUTS-TR stems held out for validation (every 17th of the sorted list: 311 pairs)."""
    return sorted(p.stem for p in (DATA / "duts-tr" / "images").glob("*.jpg"))[::17]


def prepare() -> None:
    """Symlink trees under runs/ref/data: duts-train, duts-val (pairs) and kd-pool (images only)."""
    stems = sorted(p.stem for p in (DATA / "duts-tr" / "images").glob("*.jpg"))
    val = set(holdout_stems())
    train = [s for s in stems if s not in val]
    root = OUT / "data"
    for name, sel in (("duts-train", train), ("duts-val", sorted(val))):
        for sub, ext in (("images", ".jpg"), ("masks", ".png")):
            d = root / name / sub
            d.mkdir(parents=True, exist_ok=True)
            for s in sel:
                if not (d / (s + ext)).exists():
                    os.symlink(DATA / "duts-tr" / sub / (s + ext), d / (s + ext))
    d = root / "kd-pool" / "duts"
    d.mkdir(parents=True, exist_ok=True)
    for s in train:
        if not (d / (s + ".jpg")).exists():
            os.symlink(DATA / "duts-tr" / "images" / (s + ".jpg"), d / (s + ".jpg"))
    n = len(train)
    for setname in UNLABELED_SETS:
        d = root / "kd-pool" / setname
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted((DATA / "unlabeled" / setname).iterdir()):
            if not (d / f.name).exists():
                os.symlink(f, d / f.name)
            n += 1
    print(f"duts-train {len(train)} pairs, duts-val {len(val)} pairs, kd-pool {n} images under {root}")


VIEWS = OUT / "data" / "kd-views"
VIEW_LABELS = OUT / "labels-views-csnet-x2-hflip"


def prepare_views(count: int, seed: int = 0) -> None:
    """``count`` synthetic views of the KD pool under runs/ref/data/kd-views: what ``sodkd views --input
    runs/ref/data/kd-pool --labels runs/ref/labels-csnet-x2-hflip --output runs/ref/data/kd-views --count N``
    writes (zoomed crops; objects cut out along the teacher's pool labels and pasted on other pool images). The
    teacher then labels the folder like the pool (the label command in the module docstring, with ``--input``
    this folder and ``--output`` ``runs/ref/labels-views-csnet-x2-hflip``)."""
    from cluster.views import make_views
    s = make_views(str(OUT / "data" / "kd-pool"), str(VIEWS), count, labels_uri=str(LABELS), seed=seed)
    print(f"{s.written} views written, {s.existing} already there ({dict(s.kinds)}) under {VIEWS}")


def views_subset(count: int) -> Path:
    """A folder of symlinks to the views whose draw index is below ``count`` (names are ``KIND-INDEX.jpg``); the
    views' labels join it by file name like the whole folder's."""
    d = VIEWS.parent / f"kd-views-first{count}"
    link_into(d, (f for f in VIEWS.glob("*.jpg") if int(f.stem.rsplit("-", 1)[1]) < count))
    return d


def link_into(d: Path, files) -> None:
    """Symlink each of ``files`` into folder ``d`` under its own name (made if missing; existing links kept)."""
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (d / f.name).exists():
            os.symlink(f.resolve(), d / f.name)


def duts_pool() -> Path:
    """A folder of symlinks to the KD pool's DUTS-TR images alone, keyed like the pool (``duts/NAME.jpg``), so the
    pool's labels join it by id."""
    d = OUT / "data" / "kd-pool-duts"
    link_into(d / "duts", (OUT / "data" / "kd-pool" / "duts").glob("*.jpg"))
    return d


def reshaped(init: Path, name: str) -> Path:
    """``init`` with its decoder widened (``WIDEN``) or the whole model slimmed (``SLIM``) for run ``name``,
    written once per run, so a resumed run reuses it; the file's header gives the model its widths
    (config_from_init_weights)."""
    from models import load_weights, save_weights
    from models.scfnet import slim, widen_decoder
    if name in WIDEN:
        kind, tag, how = "widened", f"c{WIDEN[name]}", lambda m: widen_decoder(m, WIDEN[name])
    else:
        kind, tag, how = "slimmed", "x{}-c{}".format(*SLIM[name]), lambda m: slim(m, *SLIM[name])
    out = OUT / "weights" / kind / f"{name}-from-{init.stem.split('.')[0]}-{tag}.pt"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(how(load_weights(init).float()), out, extra_meta={f"{kind}_from": str(init)})
    return out


def train_config(name: str, steps: int) -> dict:
    mode, loss, _ = RUNS[name]
    views = name == "kd-views" or CYCLES.get(name, ("",))[0] == "kd-views"     # its rows: the pool + the views
    view_dir = views_subset(VIEW_SUBSET[name]) if name in VIEW_SUBSET else VIEWS
    rows = 4966 if mode == "supervised" or name in DUTS_ONLY else \
        8475 + (len(list(view_dir.glob("*.jpg"))) if views else 0)
    per_epoch = rows // BATCH
    epochs = max(1, math.ceil(steps / per_epoch))
    cfg = {
        "mode": mode,
        "model": {"name": "scfnet_m3"},
        "data": {"load_size": SIZE, "sizes": [SIZE], "decode_cpus": 1.0, "shuffle_buffer": 1024,
                 "augment": MILD.to_dict()},
        "val": {"uri": str(OUT / "data" / "duts-val"), "size": SIZE, "panel": 4},
        "optim": {"epochs": epochs, "batch_size": BATCH, "lr": LR, "lr_start": LR / 20, "lr_final": LR / 50,
                  "warmup_epochs": min(0.5, 100 / per_epoch), "backbone_lr_mult": 1.0, "nesterov": True},
        # the layout is the default, channels_last, since the twenty-second pass (the passes before it trained
        # in NCHW, the default then; same maths, so a resumed earlier run is not changed by it)
        "scaling": {"num_workers": 1, "cpus_per_worker": 1.0, "torch_threads": 1},
        "run": {"name": name, "storage": str(OUT / "runs"), "max_failures": 2, "seed": run_seed(name)},
        "mlflow": {"uri": f"sqlite:///{OUT / 'mlflow.db'}", "experiment": "sodkd-reference",
                   "registered_model": None, "log_every": 20, "onnx": False},
        "output": {"dir": str(OUT / "weights"), "fp16": True},
        **loss,
    }
    if name in ARCH:
        cfg["model"]["kwargs"] = dict(ARCH[name])
    if name in CYCLES:
        _, init, lr, _ = CYCLES[name]
        if name in WIDEN or name in SLIM:
            init = reshaped(init, name)
        cfg["model"]["init_weights"] = str(init)
        cfg["optim"].update(lr=lr, lr_start=lr / 10, lr_final=LR / 50)
    if mode == "supervised":
        cfg["data"]["paired"] = [{"uri": str(OUT / "data" / "duts-train")}]
    else:
        pool = duts_pool() if name in DUTS_ONLY else OUT / "data" / "kd-pool"
        cfg["data"]["unlabeled"] = [{"uri": str(pool), "labels": str(CO_LABELS.get(name, LABELS))}]
        if views:
            cfg["data"]["unlabeled"].append({"uri": str(view_dir), "labels": str(VIEW_LABELS)})
    return cfg


def train(name: str, steps: int) -> None:
    from cluster.raylocal import start_private_ray
    from cluster.training.launch import run_training
    from cluster.training.sections import load_train_config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_train_config(train_config(name, steps))
    start_private_ray(2, worker_niceness=0)
    t0 = time.perf_counter()
    res = run_training(cfg)
    state = {"name": name, "mode": cfg.mode, "what": RUNS[name][2], "rows": res.rows,
             "steps_per_epoch": res.steps_per_epoch, "epochs": cfg.optim.epochs,
             "steps": res.steps_per_epoch * cfg.optim.epochs, "wall_s_this_session": time.perf_counter() - t0,
             "train_wall_s": sum(res.summary.get("epoch_wall_s", [])),
             "train_cpu_s": sum(res.summary.get("epoch_cpu_s", [])), "resumed_from": res.resumed_from,
             "weights": res.weights, "best_val_mae": res.best_mae, "mlflow_run_id": res.mlflow_run_id,
             "val": {k: v for k, v in res.metrics.items() if k.startswith("val/")}}
    (OUT / "state").mkdir(parents=True, exist_ok=True)
    (OUT / "state" / f"{name}.json").write_text(json.dumps(state, indent=1))
    print(json.dumps(state, indent=1))


def _ecssd():
    from cluster.catalog import paired_folder
    return paired_folder(str(DATA / "ecssd"))


def score_teacher(spec, cat, size: int | None, tta: str = "none", threads: int = 2,
                  keep_samples: bool = False) -> dict:
    """A teacher / student spec on a paired catalog: kd.metrics + salient share + images/s (+ the maps)."""
    import numpy as np

    from cluster.evaluate import evaluate
    from cluster.teachers import build_teacher
    specs = [spec] if isinstance(spec, str) else list(spec)
    t = build_teacher(specs, tta=tta, device="cpu", precision="fp32", input_size=size, threads=threads)
    keys = [it.key for it in cat.items]
    r = evaluate(t, cat, name=str(spec), batch_size=16, progress_every=0, sample_keys=keys)
    fg = float(np.mean([np.mean(r.samples[k] > 127) for k in keys]))
    out = {"metrics": r.metrics, "images_per_s": r.images_per_s, "count": r.count, "fg_frac": fg,
           "size": t.input_size}
    return {**out, "samples": r.samples} if keep_samples else out


def write_results(section: str, body: str, results: Path = REPO / "benchmarks" / "RESULTS.md") -> None:
    """Replace (or append) the ``section`` block of ``results`` with benchmarks/models.py's writer, loaded by path
    (the repository's ``models`` package owns that module name)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "benchmarks" / "models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_section(results, section, body)


def evaluate_all(section: str, results: Path, threads: int, only: str | None = None) -> None:
    import numpy as np

    from cluster import storage
    from kd.imageio import decode_mask
    cat = _ecssd()
    gt_fg = float(np.mean([np.mean(decode_mask(storage.read_bytes(cat.fs, it.mask_path)) > 128)
                           for it in cat.items]))
    cache_path = OUT / "eval.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = []
    tkey = "teacher:csnet-x2+hflip"
    if tkey not in cache:
        cache[tkey] = score_teacher(TEACHERS["csnet-x2"], cat, None, tta="hflip", threads=threads)
    for name in RUNS:
        if only and not any(name == o[:-1] if o.endswith("$") else name.startswith(o) for o in only.split(",")):
            continue
        sp = OUT / "state" / f"{name}.json"
        if not sp.exists():
            continue
        st = json.loads(sp.read_text())
        w = next(x for x in st["weights"] if x.endswith(".fp16.pt"))
        key = f"{name}:{os.path.getmtime(w):.0f}"
        if key not in cache:
            cache[key] = score_teacher(f"scfnet_m3:{w}", cat, None, threads=threads)
        rows.append((st, cache[key]))
    cache_path.write_text(json.dumps(cache, indent=1))

    # the ratio's reference: the FS run among the rows shown (fs, or fs-c2 for the second cycle); where the rows
    # hold seed repeats, each row's ratio is to the FS run of its own seed
    fss = [(st, ev) for st, ev in rows if st["mode"] == "supervised" and st["name"].startswith("fs")]
    fs = fss[0][1] if fss else None
    fs_of = {run_seed(st["name"]): ev for st, ev in reversed(fss)}
    title = {"reference-runs-3": "third pass", "reference-runs-4": "fourth pass (block-shuffled epochs)",
             "reference-runs-5": "fifth pass (a second cosine cycle from the fourth pass's weights)",
             "reference-runs-6": "sixth pass (a third cosine cycle from the fifth pass's weights)",
             "reference-runs-7": "seventh pass (a fourth, longer cosine cycle from the sixth pass's weights)",
             "reference-runs-8": "eighth pass (a fifth cycle from the seventh pass's weights: does a pool grown with "
                                 "synthetic views widen KD's margin?)",
             "reference-runs-9": "ninth pass (a sixth cycle from the eighth pass's weights, views and no views at equal "
                                 "steps)",
             "reference-runs-10": "tenth pass (a seventh cycle from the ninth pass's weights with the decoder widened "
                                  "from c = 16 to 32: does capacity widen KD's margin?)",
             "reference-runs-11": "eleventh pass (an eighth cycle from the tenth pass's weights with the decoder "
                                  "widened again, from c = 32 to 48)",
             "reference-runs-12": "twelfth pass (the fast student: the eleventh pass's files slimmed to x0.3, c = 8, "
                                  "then a ninth cycle)",
             "reference-runs-13": "thirteenth pass (the fast student's second cycle at x0.3, c = 8)",
             "reference-runs-14": "fourteenth pass (the eleventh pass's files slimmed further, to x0.25, c = 8: does "
                                  "a smaller student widen KD's margin?)",
             "reference-runs-15": "fifteenth pass (the twelfth pass's two runs again with seed 1: how far apart are "
                                  "single runs of one recipe?)",
             "reference-runs-16": "sixteenth pass (the twelfth pass's two runs a third time, with seed 2, "
                                  "and seed 2's KD run on the pool's DUTS-TR images alone: where does KD's margin "
                                  "come from?)"}
    start = {"reference-runs-5": "the fourth pass's weights (FS: the third-pass file, 3,720 steps; KD: `kd-sharp`, 3,703 "
                                 "steps; sha256 f7992f1c0988dcc2 and 36f492c1fe2598b5, the files `weights/` held at commit "
                                 f"bb205c7) given a second cycle (lr {CYCLES['fs-c2'][2]} warm-up + cosine to {LR / 50:g}; the steps "
                                 "below are this cycle's)",
             "reference-runs-6": "the fifth pass's weights (FS: `fs-c2`, 6,510 steps in all; KD: `kd-sharp-c2`, 6,348 "
                                 "steps; sha256 eb52172be757e1a9 and 4fc35932e6403d11, the files `weights/` held at commit "
                                 f"975a5ff) given a third cycle (lr {CYCLES['fs-c3'][2]} warm-up + cosine to {LR / 50:g}; "
                                 "the steps below are this cycle's)",
             "reference-runs-7": "the sixth pass's weights (FS: `fs-c3`, 8,680 steps in all; KD: `kd-sharp-c3`, 8,464 "
                                 "steps; sha256 7838823b4bc28958 and 0f15f90c80d38ea6, the files `weights/` held at commit "
                                 f"f8626c2) given a fourth cycle, about three times as long (lr {CYCLES['fs-c4'][2]} "
                                 f"warm-up + cosine to {LR / 50:g}; the steps below are this cycle's)",
             "reference-runs-8": "the seventh pass's weights (FS: `fs-c4`, 14,880 steps in all; KD: `kd-sharp-c4`, "
                                 "14,812 steps; sha256 802ebe2cad41dde8 and 019d4ff08b02c2c4, the files `weights/` held "
                                 f"at commit 37ec3b5) given a fifth cycle (lr {CYCLES['fs-c5'][2]} warm-up + cosine to "
                                 f"{LR / 50:g}; the steps below are this cycle's). `kd-views-c5` learns from the KD pool "
                                 "plus 4,000 synthetic views of it (`kd.views`: about half zoomed crops, half objects "
                                 "cut out along the teacher's pool labels and pasted on other pool images, "
                                 "`benchmarks/reference_runs.py prepare-views`) labelled by the same teacher",
             "reference-runs-9": "the eighth pass's weights (FS: `fs-c5`, 18,600 steps in all; KD: `kd-sharp-c5`, "
                                 "18,515 steps; sha256 18ad24b3d04a6a37 and 1b128e863090923b, the files `weights/` held "
                                 f"at commit 24f22e2) given a sixth cycle (lr {CYCLES['fs-c6'][2]} warm-up + cosine to "
                                 f"{LR / 50:g}; the steps below are this cycle's). `kd-views-c6` starts from the same KD "
                                 f"file as `kd-sharp-c6` and learns from the KD pool plus the first "
                                 f"{VIEW_SUBSET['kd-views-c6']:,} of the eighth pass's 4,000 synthetic views (by draw "
                                 "index: the same mix of zooms and pastes), so that whole epochs give it the others' "
                                 "steps",
             "reference-runs-10": "the ninth pass's weights (FS: `fs-c6`, 22,320 steps in all; KD: `kd-sharp-c6`, "
                                  "22,218 steps; sha256 258450b1b9e74c8b and 8417b93debc48a68, the files `weights/` "
                                  "held at commit e41b036) with the decoder widened from c = 16 to 32 "
                                  "(`models.scfnet.widen_decoder`: each channel copied, the next layer's weights "
                                  "halved, so the wider model starts with the same maps; 1% noise on the copies "
                                  "breaks their symmetry; 0.89 M params, 0.17 GMACs at 224 against 0.10) and given "
                                  f"a seventh cycle (lr {CYCLES['fs-w32'][2]} warm-up + cosine to {LR / 50:g}; the "
                                  "steps below are this cycle's)",
             "reference-runs-11": "the tenth pass's files (FS: `fs-w32`, 25,110 steps in all; KD: `kd-sharp-w32`, "
                                  "24,863 steps; c = 32) with the decoder widened again by the same function-"
                                  "preserving copy, to c = 48 (1.03 M params, 0.29 GMACs at 224, inside the 0.3 the "
                                  "issue allows), and given an eighth cycle (lr "
                                  f"{CYCLES['fs-w48'][2]} warm-up + cosine to {LR / 50:g}; the steps below are this "
                                  "cycle's)",
             "reference-runs-12": "the eleventh pass's files (FS: `fs-w48`, 27,280 steps in all; KD: `kd-sharp-w48`, "
                                  "26,979 steps; c = 48; sha256 564c32d5d190fecf and 6db039c0c8785c60, the files "
                                  "`weights/` held at commit 7db26b8) slimmed by `models.scfnet.slim` to a MobileNetV3 "
                                  "x0.3 encoder and a c = 8 decoder (each layer keeps its largest-|BN gamma| channels; "
                                  "0.04 GMACs at 224 against 0.29) and given a ninth cycle (lr "
                                  f"{CYCLES['fs-slim'][2]} warm-up + cosine to {LR / 50:g}; the steps below are this "
                                  "cycle's)",
             "reference-runs-13": "the twelfth pass's slim files (FS: `fs-slim`, 5,580 steps at x0.3 / c = 8; KD: "
                                  "`kd-sharp-slim`, 5,290 steps) given a tenth cycle (lr "
                                  f"{CYCLES['fs-slim2'][2]} warm-up + cosine to {LR / 50:g}; the steps below are this "
                                  "cycle's)",
             "reference-runs-14": "the eleventh pass's files (as the twelfth pass: sha256 564c32d5d190fecf and "
                                  "6db039c0c8785c60) slimmed by `models.scfnet.slim` to a MobileNetV3 x0.25 encoder "
                                  "and a c = 8 decoder and given a ninth cycle (lr "
                                  f"{CYCLES['fs-slim25'][2]} warm-up + cosine to {LR / 50:g}; the steps below are this "
                                  "cycle's)",
             "reference-runs-15": "the eleventh pass's files slimmed to x0.3 / c = 8 exactly as in the twelfth pass (the "
                                  "same start files) and given its ninth cycle (lr "
                                  f"{CYCLES['fs-slim-s1'][2]} warm-up + cosine to {LR / 50:g}) with `run.seed` 1 in "
                                  "place of 0 (data order, augmentation draws, torch's initial state)"}
    start["reference-runs-16"] = start["reference-runs-15"].replace("`run.seed` 1", "`run.seed` 2")
    start["reference-runs-17"] = start["reference-runs-16"]
    start["reference-runs-18"] = ("the eleventh pass's files as trained (FS: `fs-w48`, KD: `kd-sharp-w48`; c = 48, "
                                  "0.29 GMACs at 224; sha256 564c32d5d190fecf and 6db039c0c8785c60, the files "
                                  "`weights/` held at commit b673da1, before their calibration) given a ninth cycle "
                                  f"(lr {CYCLES['fs-w48-c2'][2]} warm-up + cosine to {LR / 50:g}) with `run.seed` 3")
    title["reference-runs-18"] = ("eighteenth pass (the c = 48 pair, the shipped students as trained, given a ninth "
                                  "cycle: does more budget at the widest student widen KD's margin?)")
    start["reference-runs-19"] = ("the eighteenth pass's equal-budget pair (FS: `fs-w48-c2`, 29,450 steps in all; KD: "
                                  "`kd-sharp-w48-c2-e4`, its checkpoint after epoch 4, 29,095 steps; c = 48) given a "
                                  f"tenth cycle (lr {CYCLES['fs-w48-c3'][2]} warm-up + cosine to {LR / 50:g}, annealed "
                                  "to the end for both) with `run.seed` 4")
    title["reference-runs-19"] = ("nineteenth pass (the eighteenth pass's equal-budget pair given a tenth cycle: does "
                                  "KD's margin widen once FS, held to 4,966 masks, has stopped gaining?)")
    start["reference-runs-20"] = ("the nineteenth pass's files (FS: `fs-w48-c3`, 31,620 steps in all; KD: "
                                  "`kd-sharp-w48-c3`, 31,211 steps; c = 48) given an eleventh cycle (lr "
                                  f"{CYCLES['fs-w48-c4'][2]} warm-up + cosine to {LR / 50:g}) with `run.seed` 5")
    title["reference-runs-20"] = ("twentieth pass (the same pair, an eleventh cycle: a second point of the trend "
                                  "at c = 48)")
    start["reference-runs-21"] = ("each chain's four-cycle mean (`sodkd average` of its eleventh, eighteenth -- KD "
                                  "after epoch 4 --, nineteenth and twentieth pass ends; FS 33,790 steps behind the "
                                  "last, KD 33,327; c = 48; the shipped files before calibration) given a twelfth cycle "
                                  f"(lr {CYCLES['fs-w48-c5'][2]} warm-up + cosine to {LR / 50:g}) with `run.seed` 6")
    title["reference-runs-21"] = ("twenty-first pass (a twelfth cycle from the four-cycle means: does a cycle from the "
                                  "averaged weights go below the mean, and where does the ratio land?)")
    start["reference-runs-22"] = ("each chain's five-file mean (`sodkd average` of the four cycle ends behind the "
                                  "twenty-first pass's start and that pass's end; FS 35,960 steps behind the last, KD "
                                  "35,443; c = 48) given a thirteenth cycle (lr "
                                  f"{CYCLES['fs-w48-c6'][2]} warm-up + cosine to {LR / 50:g}) with `run.seed` 7, the "
                                  "first pass trained in the channels_last layout (`scaling.channels_last`)")
    title["reference-runs-22"] = ("twenty-second pass (a thirteenth cycle from the five-file means, in channels_last: "
                                  "the layout's speed in the whole pipeline, and a sixth point of each chain)")
    title["reference-runs-23"] = ("twenty-third pass (the recognition route: the 0.3-GMAC budget spent on the encoder, "
                                  "MobileNetV3 x1.0 with c = 24, a new pair of chains from random weights; the fourth "
                                  "pass's first cycle at x0.5 / c = 16 is its control)")
    start["reference-runs-24"] = ("the twenty-third pass's files (MobileNetV3 x1.0, c = 24; FS 3,720 steps, KD 3,703) "
                                  f"given a second cycle (lr {CYCLES['fs-x1c24-c2'][2]} warm-up + cosine to "
                                  f"{LR / 50:g}), as the fifth pass gave the x0.5 / c = 16 chain")
    title["reference-runs-24"] = ("twenty-fourth pass (the x1.0 / c = 24 chains' second cycle; the fifth pass is its "
                                  "control)")
    # the x1.0 / c = 24 chains' later cycles: (pass, cycle, its CYCLES suffix, steps behind it FS / KD, the x0.5
    # chain's pass at the same point, None where it has none); each starts from the pass before's ends as committed
    nth = {24: "twenty-fourth", 25: "twenty-fifth", 26: "twenty-sixth", 27: "twenty-seventh", 28: "twenty-eighth",
           29: "twenty-ninth", 30: "thirtieth", 36: "thirty-sixth",
           6: "sixth", 7: "seventh", 8: "eighth", 9: "ninth"}
    for n, cycle, suffix, behind, extra, control in [
            (25, "third", "c3", "FS 6,510 steps, KD 6,348", "", 6),
            (26, "fourth, longer", "c4", "FS 8,680 steps, KD 8,464", "; FS 20 epochs, KD 12", 7),
            (27, "fifth", "c5", "FS 14,880 steps, KD 14,812", "", 8),
            (28, "sixth", "c6", "FS 18,600 steps, KD 18,515", "", 9),
            (29, "seventh", "c7", "FS 22,320 steps, KD 22,218", "", None),
            (30, "eighth", "c8", "FS 26,040 steps, KD 25,921", "", None),
            (36, "ninth", "c9", "FS 29,760 steps, KD 29,624", "", None)]:   # 31-35 went to other sixth / seventh cycles
        prev = 30 if n == 36 else n - 1
        start[f"reference-runs-{n}"] = (
            f"the {nth[prev]} pass's files as committed (`benchmarks/chains/`; MobileNetV3 x1.0, c = 24; {behind}) "
            f"given a {cycle} cycle (lr {CYCLES[f'fs-x1c24-{suffix}'][2]} warm-up + cosine to {LR / 50:g}{extra})"
            + (f", as the {nth[control]} pass gave the x0.5 / c = 16 chain" if control else ""))
        title[f"reference-runs-{n}"] = (f"{nth[n]} pass (the x1.0 / c = 24 chains' {cycle} cycle"
                                        + (f"; the {nth[control]} pass is its control)" if control else ")"))
    for n, what in ((31, "thirty-first pass (the sixth ends given a seventh cycle at four times the peak rate, 0.02: "
                         "does a higher rate let the KD student fit its teacher further?)"),
                    (32, "thirty-second pass (a second-round teacher: the KD chain's seventh cycle again, learning "
                         "from the teacher's labels blended with the sixth KD end's own maps, w = 0.2)"),
                    (33, "thirty-third pass (the second-round teacher at w = 0.33)")):
        title[f"reference-runs-{n}"] = what
        start[f"reference-runs-{n}"] = ("the sixth ends (MobileNetV3 x1.0, c = 24; FS 22,320 steps, KD 22,218) given a "
                                        "seventh cycle (the twenty-ninth pass: the same cycle at lr 0.005 on the "
                                        "teacher's own labels)")
    title["reference-runs-34"] = ("thirty-fourth pass (the second-round teacher one cycle earlier: the KD chain's "
                                  "sixth cycle again, learning from the teacher's labels blended with the fifth KD "
                                  "end's maps, w = 0.2 and 0.1)")
    title["reference-runs-35"] = ("thirty-fifth pass (the sixth-cycle pair again with seed 1: the FS arm as in the "
                                  "twenty-eighth pass, the KD arm as `kd-sharp-x1c24-c6co`; how far apart are single "
                                  "pairs at x1.0 / c = 24?)")
    start["reference-runs-34"] = ("the fifth ends (MobileNetV3 x1.0, c = 24; FS 18,600 steps, KD 18,515) given a sixth "
                                  "cycle (the twenty-eighth pass: the same cycle at lr 0.005 on the teacher's own "
                                  "labels)")
    start["reference-runs-35"] = start["reference-runs-34"]
    title["reference-runs-17"] = ("seventeenth pass (seed 2's KD run on the pool's DUTS-TR images alone, its targets "
                                  "sharpened harder, s = 0.25, and not at all, s = 1: where should the sharpening live?)")
    from models import count_params, load_weights
    sizes = sorted({count_params(load_weights(next(w for w in st["weights"] if w.endswith(".fp16.pt"))))
                    for st, _ in rows})
    params = " / ".join(f"{n / 1e6:.2f}" for n in sizes) + " M params"
    lines = [f"## Reference runs, {title.get(section, section)}: {TEACHER_NAME} as teacher, students at {SIZE} px", "",
             f"Machine: {os.cpu_count()} shared CPU cores, no GPU. Every student is `scfnet_m3` ({params}) from "
             + start.get(section, "random weights") + ", trained by `sodkd`'s Ray Train core (1 worker, 1 torch thread; runs side by side) with "
             f"the recipe in `benchmarks/reference_runs.py`: {SIZE}x{SIZE}, batch {BATCH}, SGD Nesterov, lr {LR} "
             "warm-up + cosine, every epoch in a new random order of 32-row blocks (`data.shuffle_blocks`) under a "
             "1,024-row local shuffle, same steps for every row. FS learns from 4,966 DUTS-TR masks; KD rows learn from "
             "8,475 images (the same 4,966 DUTS-TR images without masks + 3,509 unlabeled images) through the "
             f"teacher's soft labels only. Best checkpoint by MAE on a 311-pair DUTS-TR hold-out; the table is "
             "full ECSSD (1,000 pairs) at each model's own size, PySODMetrics conventions.", "",
             "| model | learns from | steps | train wall | ECSSD MAE | S | max F | mean E | salient px | MAE / FS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    t = cache[tkey]
    m = t["metrics"]
    lines.append(f"| teacher {TEACHER_NAME} (0.14 M, 0.50 GMACs at 224 x2 for TTA) | DUTS-TR (its authors) | - | - | "
                 f"{m['mae']:.3f} | {m['sm']:.3f} | {m['fm_max']:.3f} | {m['em_mean']:.3f} | {t['fg_frac']:.3f} | "
                 f"{m['mae'] / fs['metrics']['mae']:.2f} |" if fs else "")
    for st, ev in rows:
        m = ev["metrics"]
        ref = fs_of.get(run_seed(st["name"]), fs)
        ratio = f"{m['mae'] / ref['metrics']['mae']:.2f}" if ref else "-"
        lines.append(f"| `{st['name']}` | {st['what']} | {st['steps']} | {st['train_wall_s'] / 60:.0f} min | "
                     f"{m['mae']:.3f} | {m['sm']:.3f} | {m['fm_max']:.3f} | {m['em_mean']:.3f} | "
                     f"{ev['fg_frac']:.3f} | {ratio} |")
    lines += ["", f"Salient px: mean share of each map above 0.5 (ECSSD masks: {gt_fg:.3f}). CSNet-L-x2 alone, the "
              "public peer: MAE .068, S .887 (card preprocessing), .067 / .892 with flip TTA."]
    write_results(section, "\n".join(x for x in lines if x is not None), results)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    v = sub.add_parser("prepare-views")
    v.add_argument("--count", type=int, default=4000)
    t = sub.add_parser("train")
    t.add_argument("name", choices=sorted(RUNS))
    t.add_argument("--steps", type=int, default=4000)
    e = sub.add_parser("eval")
    e.add_argument("--section", default="reference-runs-3")
    e.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--only", default=None,
                   help="only runs whose name starts with one of these (comma-separated, e.g. abl- or fs-c2,kd-sharp-c2; "
                        "NAME$ matches that name alone)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare()
    elif args.cmd == "prepare-views":
        prepare_views(args.count)
    elif args.cmd == "train":
        train(args.name, args.steps)
    else:
        evaluate_all(args.section, Path(args.results), args.threads, args.only)


if __name__ == "__main__":
    main()
