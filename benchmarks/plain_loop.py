"""A plain single-process training loop over sodkd's own model and losses: the yardstick for the pipeline.

It answers one question: how good does ``scfnet_m3`` get per optimizer step when nothing but the model, the
loss and SGD stand between the data and the weights? Everything is decoded once into memory (square resize to
``--size``), batches are drawn uniformly at random, the only augmentation is a horizontal flip, and the model
is scored on the DUTS-TR hold-out (311 pairs, the reference runs' split) every ``--eval-every`` steps and on
ECSSD at the end (``--ecssd N``: the first N sorted pairs; 0 = all 1,000). The pipeline's reference runs
(``benchmarks/reference_runs.py``) train the same network through Ray Data and Ray Train; comparing the two
at one budget shows what the pipeline costs or gives.

    .venv/bin/python benchmarks/plain_loop.py --target fs --steps 500 --name fs-500
    .venv/bin/python benchmarks/plain_loop.py --target kd --steps 500 --name kd-500     # CSNet-L-x2 labels

``--target kd`` learns from CSNet-L-x2's probabilities (card preprocessing at 224, h-flip TTA, cached under
``runs/plain/labels-*.npy``) on the KD pool (the DUTS-TR training images without masks + the unlabeled sets);
``--target fs`` from the DUTS-TR training masks. A run checkpoints at every evaluation and resumes by name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd.imageio import decode_image, decode_mask, resize  # noqa: E402
from kd.metrics import SODEvaluator  # noqa: E402
from kd.step import KDLoss, MaskLoss, mask_loss, soft_loss  # noqa: E402
from models import create_model  # noqa: E402

SHARED = Path(os.environ.get("SODKD_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
OUT = REPO / "runs" / "plain"
UNLABELED_SETS = ("imagenet-1k", "imagenet-det200", "imagenet-val1300", "coco-mini")
TEACHER = SHARED / "teachers" / "csnet-L-x2.onnx"
CARD = REPO / "jobs" / "cards" / "csnet-L.card.yaml"


def split_duts() -> tuple[list[str], list[str]]:
    """The reference runs' split: every 17th sorted DUTS-TR stem is validation."""
    stems = sorted(p.stem for p in (DATA / "duts-tr" / "images").glob("*.jpg"))
    val = stems[::17]
    vs = set(val)
    return [s for s in stems if s not in vs], val


def load_rgb(path: Path, size: int) -> np.ndarray:
    return resize(decode_image(path.read_bytes()), (size, size))


def load_mask(path: Path, size: int | None = None) -> np.ndarray:
    m = decode_mask(path.read_bytes())
    return resize(m, (size, size)) if size else m


def cached(path: Path, make):
    if path.exists():
        return np.load(path)
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


def kd_pool_paths() -> list[Path]:
    train, _ = split_duts()
    paths = [DATA / "duts-tr" / "images" / f"{s}.jpg" for s in train]
    for name in UNLABELED_SETS:
        paths += sorted(p for p in (DATA / "unlabeled" / name).iterdir() if p.is_file())
    return paths


def teacher_labels(paths: list[Path], size: int, threads: int) -> np.ndarray:
    """CSNet-L-x2 + h-flip TTA through sodkd's teacher machinery and its card (224 px), maps resized to size."""
    from cluster.teachers import build_teacher
    t = build_teacher([f"{TEACHER}?card={CARD}"], tta="hflip", device="cpu", precision="fp32", threads=threads)
    out = np.zeros((len(paths), size, size), np.uint8)
    t0 = time.time()
    for i in range(0, len(paths), 16):
        p = torch.from_numpy(t.predict(np.stack([load_rgb(q, t.input_size) for q in paths[i:i + 16]])))
        p = F.interpolate(p[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        out[i:i + len(p)] = np.round(p.numpy() * 255).astype(np.uint8)
        if i % 800 == 0:
            print(f"teacher labels {i + len(p)}/{len(paths)} {(i + len(p)) / (time.time() - t0):.1f} img/s",
                  flush=True)
    return out


@torch.no_grad()
def predict(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    model.eval()
    outs = []
    for i in range(0, len(images), batch):
        x = model.normalize(torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2))
        outs.append(torch.sigmoid(model(x)[0])[:, 0].numpy())
    model.train()
    return np.concatenate(outs)


def score(model, images: np.ndarray, masks: list[np.ndarray]) -> dict:
    ev = SODEvaluator()
    for p, m in zip(predict(model, images), masks):
        ev.step(np.round(p * 255).astype(np.uint8), m)
    r = ev.results()
    return {"mae": round(r["mae"], 4), "s": round(r["sm"], 4), "maxF": round(r["fm_max"], 4), "meanE": round(r["em_mean"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--target", choices=("fs", "kd"), required=True)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--ecssd", type=int, default=0, help="first N sorted ECSSD pairs at the end; 0 = all")
    ap.add_argument("--sharpen", type=float, default=1.0, help="kd.sharpen for --target kd")
    ap.add_argument("--confidence", default="none", help="kd.confidence for --target kd")
    ap.add_argument("--model", default="scfnet_m3")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    S = a.size
    train, val = split_duts()
    t0 = time.time()
    if a.target == "fs":
        x = cached(OUT / f"duts-train-img-{S}.npy",
                   lambda: np.stack([load_rgb(DATA / "duts-tr" / "images" / f"{s}.jpg", S) for s in train]))
        y = cached(OUT / f"duts-train-mask-{S}.npy",
                   lambda: np.stack([load_mask(DATA / "duts-tr" / "masks" / f"{s}.png", S) for s in train]))
    else:
        paths = kd_pool_paths()
        x = cached(OUT / f"kd-pool-img-{S}.npy", lambda: np.stack([load_rgb(p, S) for p in paths]))
        y = cached(OUT / f"labels-csnet-x2-hflip-{S}.npy", lambda: teacher_labels(paths, S, a.threads))
    vx = cached(OUT / f"duts-val-img-{S}.npy",
                lambda: np.stack([load_rgb(DATA / "duts-tr" / "images" / f"{s}.jpg", S) for s in val]))
    vm = [load_mask(DATA / "duts-tr" / "masks" / f"{s}.png") for s in val]
    print(f"data {a.target}: {len(x)} rows at {S}, val {len(vx)}; {time.time() - t0:.0f} s", flush=True)

    model = create_model(a.model)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    kd_cfg = KDLoss(structure="dice", pixel="bce", sharpen=a.sharpen, confidence=a.confidence)
    fs_cfg = MaskLoss(boundary=0.0, bce=1.0)
    ck = OUT / "runs" / a.name / "last.pt"
    state = {"step": 0, "history": [], "train_s": 0.0}
    if ck.exists():   # our own checkpoint: tensors and plain containers only
        blob = torch.load(ck, weights_only=True)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["opt"])
        state = json.loads(blob["state"])
        rng = np.random.default_rng(a.seed + state["step"])
        print(f"resumed {a.name} at step {state['step']}", flush=True)

    def lr_at(k: int) -> float:
        if k < a.warmup:
            return a.lr * (0.05 + 0.95 * k / a.warmup)
        q = (k - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, q))))

    model.train()
    tick = time.time()
    while state["step"] < a.steps:
        k = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(k)
        idx = rng.integers(0, len(x), a.batch)
        xb = torch.from_numpy(x[idx]).permute(0, 3, 1, 2)
        yb = torch.from_numpy(y[idx]).float().div_(255).unsqueeze(1)
        flip = torch.from_numpy(rng.random(a.batch) < 0.5)
        xb[flip] = xb[flip].flip(-1)
        yb[flip] = yb[flip].flip(-1)
        outs = model(model.normalize(xb))
        if a.target == "fs":
            loss = mask_loss(outs, (yb > 0.5).float(), band=0, cfg=fs_cfg)
        else:
            loss = soft_loss(outs, yb, kd_cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] = k + 1
        if state["step"] % 50 == 0:
            print(f"step {state['step']}/{a.steps} loss {loss.item():.4f} lr {lr_at(k):.4f} "
                  f"{50 / (time.time() - tick):.2f} step/s", flush=True)
            state["train_s"] += time.time() - tick
            tick = time.time()
        if state["step"] % a.eval_every == 0 or state["step"] == a.steps:
            state["train_s"] += time.time() - tick
            v = score(model, vx, vm)
            state["history"].append({"step": state["step"], **v})
            print(f"val @ {state['step']}: {v}", flush=True)
            ck.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": json.dumps(state)},
                       ck.with_suffix(".tmp"))
            os.replace(ck.with_suffix(".tmp"), ck)
            tick = time.time()

    ecssd = sorted((DATA / "ecssd" / "images").glob("*.jpg"))
    if a.ecssd:
        ecssd = ecssd[:a.ecssd]
    ex = np.stack([load_rgb(p, S) for p in ecssd])
    em = [load_mask(DATA / "ecssd" / "masks" / f"{p.stem}.png") for p in ecssd]
    res = {"name": a.name, "target": a.target, "steps": a.steps, "size": S, "batch": a.batch, "lr": a.lr,
           "train_s": round(state["train_s"], 1), "val": state["history"][-1],
           f"ecssd{len(ecssd)}": score(model, ex, em), "history": state["history"]}
    torch.save(model.state_dict(), ck.parent / "final.pt")
    (ck.parent / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
