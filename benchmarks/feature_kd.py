"""Does the teacher's *features*, beside its map, help the student learn what is salient? A probe in a plain loop.

    .venv/bin/python benchmarks/feature_kd.py --steps 800 --seed 0
    .venv/bin/python benchmarks/feature_kd.py --steps 800 --seed 1 --arms fs kd kd+fused kd+fused8 kd+deep
    .venv/bin/python benchmarks/feature_kd.py --steps 800 --seed 0 --pool unlabeled --arms fs kd kd+fused8 kd+deep
    .venv/bin/python benchmarks/feature_kd.py --steps 2400 --seed 0 --pool unlabeled --arms kd kd+fused8

(the four runs of RESULTS ``feature-kd``, whose table gathers them by hand; ``--section NAME`` writes one run's)

The reference runs distil the teacher's output map only (the paper's released recipe), and the student stays
behind its teacher in *recognition* -- which regions are salient -- not in resolution (RESULTS ``output-stride``).
A feature term (FitNets-style hints) is the usual lever for that: the student's own features, through a 1x1
adapter, regress the teacher's. CSNet-L-x2 is an ONNX file, so its features are read by adding graph outputs to
the loaded model (the file is not changed): ``fused`` = the 79-channel map its classifier reads (stride 2, 112 x 112
at 224), ``deep`` = a feature of its last stage (64 channels, stride 8).

Arms, each from the same random initialisation, the same batches in the same order, equal steps: ``fs`` (masks),
``kd`` (the teacher's probabilities), ``kd+fused`` (kd + hint from the student's finest decoder feature d2),
``kd+deep`` (kd + hint from the student's context feature f5), ``kd+fused8`` (the fused map average-pooled to stride 8
-- what a label table could store -- from d2). One loss for every arm's maps: deep-supervised BCE
+ soft dice (``KDLoss(pixel="bce")``); the hint is ``w * mean((adapter(s) - t)^2)`` with t standardised per
channel (statistics of the training images' teacher features) and s resized to t's size.

Data: FS learns from the first ``--train`` DUTS-TR pairs (sorted names) at 224 (square resize, the teacher's card
size); the KD arms from the same images (``--pool duts``) or from the unlabeled sets of ``../shared/data/unlabeled``
(``--pool unlabeled``: ImageNet and COCO images, as the reference runs' pool adds); validation: the last ``--val``
DUTS-TR pairs, never trained on -- the arms are compared there, not on ECSSD (CSNet was trained on DUTS-TR, so the
teacher's own figure there is flattering; the students' are not).
Plain PyTorch, 2 threads, channels_last; no Ray, no MLflow.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "benchmarks"))   # after the repo: its models package wins over benchmarks/models.py

import reference_runs as R  # noqa: E402  (the data paths and the teacher card of the reference runs)
from kd_gap import _images, _masks  # noqa: E402  (224 x 224 square-resized uint8 stacks)

TEACHER = R.SHARED / "teachers" / "csnet-L-x2.onnx"
DUTS = R.DATA / "duts-tr"
FEATURES = {"fused": "/m/oct_fuse/fuse1x1/prelus.0/PRelu_output_0", "deep": "/m/stage4.3/conv1x1/conv/Add_output_0"}


def load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """DUTS-TR pairs ``names``: images (N, 224, 224, 3) and masks (N, 224, 224), uint8."""
    return (_images([DUTS / "images" / f"{n}.jpg" for n in names]),
            _masks([DUTS / "masks" / f"{n}.png" for n in names]))


def teacher_outputs(images: np.ndarray, threads: int, full_fused: bool = True) -> dict[str, np.ndarray]:
    """The teacher's probabilities (uint8, N x 224 x 224) and its feature maps (float16), one ORT run: ``deep``,
    ``fused8`` (the fused map average-pooled to stride 8: 79 x 28 x 28, 124 KB a label in fp16 against 2 MB -- what
    a label table could store for a whole pool) and, with ``full_fused``, ``fused`` itself."""
    import onnx
    import onnxruntime as ort

    from kd.card import load_card
    mean, std = (np.array(v, np.float32) for v in load_card(R.CARD).input.mean_std_255())
    model = onnx.load(str(TEACHER))
    for name in FEATURES.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = ["logits", *FEATURES.values()]
    out: dict[str, list] = {k: [] for k in ("map", *FEATURES, "fused8")}
    for i in range(0, len(images), 16):
        x = ((images[i:i + 16].astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)
        logits, *feats = sess.run(names, {"image": np.ascontiguousarray(x)})
        out["map"].append((255 / (1 + np.exp(-logits[:, 0]))).round().astype(np.uint8))
        for k, f in zip(FEATURES, feats):
            if k == "fused":
                n, c, h, w = f.shape
                out["fused8"].append(f.reshape(n, c, h // 4, 4, w // 4, 4).mean(axis=(3, 5)).astype(np.float16))
                if not full_fused:
                    continue
            out[k].append(f.astype(np.float16))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def train_arm(arm: str, data: dict, steps: int, seed: int, weight: float, log_every: int = 100):
    import torch
    import torch.nn.functional as F

    from kd.step import KDLoss, batch_loss
    from models import create_model
    torch.manual_seed(seed)
    model = create_model("scfnet_m3").train()
    feat = arm.split("+")[1] if "+" in arm else None
    adapter = None
    if feat:
        tch = data["t_" + feat].shape[1]
        adapter = torch.nn.Conv2d(model.channels, tch, 1)
    model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters()) + (list(adapter.parameters()) if adapter else [])
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    rng = np.random.default_rng(seed)
    images = data["fs_images"] if arm == "fs" else data["kd_images"]
    n = len(images)
    loss_kd = KDLoss(pixel="bce")
    t0, hist = time.perf_counter(), []
    for step in range(steps):
        idx = rng.choice(n, 16, replace=False)
        flip = rng.random(16) < 0.5
        ims = images[idx].copy()
        ims[flip] = ims[flip, :, ::-1]
        x = model.normalize(torch.from_numpy(ims).permute(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
        tgt = (data["masks"] if arm == "fs" else data["t_map"])[idx].copy()
        tgt[flip] = tgt[flip, :, ::-1]
        target = torch.from_numpy(tgt).float().div(255).unsqueeze(1)
        feats = model.decode(model.encode(x))
        logits = model.side_outputs(feats, x.shape[-2:])
        loss = batch_loss(logits, target, torch.ones(16, dtype=torch.bool), 3, loss_kd)
        hint = torch.zeros(())
        if feat:
            t = data["t_" + feat][idx].astype(np.float32)
            t[flip] = t[flip, :, :, ::-1]
            t = (torch.from_numpy(t) - data["mu_" + feat]) / data["sd_" + feat]
            s = adapter(feats[3] if feat == "deep" else feats[0])
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            hint = weight * F.mse_loss(s, t)
        opt.zero_grad()
        (loss + hint).backward()
        opt.step()
        sched.step()
        hist.append((loss.item(), hint.item()))
        if (step + 1) % log_every == 0:
            m = np.mean(hist[-log_every:], axis=0)
            print(f"  {arm} step {step + 1}/{steps}: map loss {m[0]:.4f} hint {m[1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return model, time.perf_counter() - t0


def evaluate(model, images: np.ndarray, masks: np.ndarray, teacher_map: np.ndarray) -> dict[str, float]:
    import torch
    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            x = model.normalize(torch.from_numpy(images[i:i + 32]).permute(0, 3, 1, 2))
            preds.append(torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last))[0])[:, 0].numpy())
    p = np.concatenate(preds)
    m = masks.astype(np.float32) / 255
    return {"mae": float(np.abs(p - m).mean()), "fit": float(np.abs(p - teacher_map.astype(np.float32) / 255).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--arms", nargs="+", default=["fs", "kd", "kd+fused", "kd+deep"])
    ap.add_argument("--weight", type=float, default=1.0, help="hint weight w (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", choices=("duts", "unlabeled"), default="duts",
                    help="the KD arms' images: the FS arm's DUTS-TR images (default) or the unlabeled sets")
    ap.add_argument("--pool-count", type=int, default=3509, help="--pool unlabeled: how many (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", default=None, help="write the table into benchmarks/RESULTS.md under this name")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    names = sorted(p.stem for p in (DUTS / "images").glob("*.jpg"))
    t0 = time.perf_counter()
    tr_ims, tr_masks = load(names[:args.train])
    va_ims, va_masks = load(names[-args.val:])
    # KD: the FS images, or the unlabeled sets of ../shared/data/unlabeled (sorted paths), the first --pool-count
    kd_ims = tr_ims if args.pool == "duts" else \
        _images(sorted((R.DATA / "unlabeled").glob("*/*.jpg"))[:args.pool_count])
    t = teacher_outputs(kd_ims, args.threads, full_fused=any(a.endswith("+fused") for a in args.arms))
    tv = teacher_outputs(va_ims, args.threads, full_fused=False)
    data = {"fs_images": tr_ims, "masks": tr_masks, "kd_images": kd_ims, "t_map": t["map"]}
    for k in sorted(t.keys() - {"map"}):
        f = t[k].astype(np.float32)
        data["t_" + k] = t[k]
        data["mu_" + k] = torch.from_numpy(f.mean(axis=(0, 2, 3)))[None, :, None, None]
        data["sd_" + k] = torch.from_numpy(f.std(axis=(0, 2, 3)) + 1e-3)[None, :, None, None]
        print(f"teacher feature {k}: {t[k].shape[1:]} per image", flush=True)
    teacher_mae = float(np.abs(tv["map"].astype(np.float32) - va_masks).mean() / 255)
    print(f"data and teacher: {time.perf_counter() - t0:.0f} s; teacher on the validation pairs: MAE {teacher_mae:.4f}",
          flush=True)
    rows = []
    for arm in args.arms:
        model, secs = train_arm(arm, data, args.steps, args.seed, args.weight)
        r = evaluate(model, va_ims, va_masks, tv["map"])
        rows.append((arm, r, secs))
        print(f"{arm}: validation MAE {r['mae']:.4f}, fit to the teacher {r['fit']:.4f} ({secs:.0f} s)", flush=True)
    fs = next((r["mae"] for a, r, _ in rows if a == "fs"), None)
    lines = ["## Feature hints beside the map: a plain-loop probe (`benchmarks/feature_kd.py`)", "",
             f"`.venv/bin/python benchmarks/feature_kd.py --steps {args.steps} --weight {args.weight} --seed "
             f"{args.seed} --pool {args.pool}`: scfnet_m3 (c = 16) from random weights, {args.steps} steps of batch 16 "
             f"at 224; FS on the first {args.train} DUTS-TR pairs, KD on "
             + ("the same images" if args.pool == "duts" else f"{len(kd_ims)} unlabeled images")
             + f"; validation: the last {args.val} DUTS-TR pairs (teacher CSNet-L-x2 there: MAE {teacher_mae:.4f}).",
             "",
             "| arm | validation MAE | / FS | fit to the teacher (MAE) | train s |", "|---|---:|---:|---:|---:|"]
    for arm, r, secs in rows:
        ratio = f"{r['mae'] / fs:.3f}" if fs else "-"
        lines.append(f"| {arm} | {r['mae']:.4f} | {ratio} | {r['fit']:.4f} | {secs:.0f} |")
    print("\n".join(lines))
    if args.section:
        R.write_results(args.section, "\n".join(lines))


if __name__ == "__main__":
    main()
