"""Reference run of issue 6: the video student distilled on DAVIS frames, against the image student per frame.

    .venv/bin/python benchmarks/video_reference.py [--teacher W] [--image-student W] [--out runs/video-reference]

Stages (each skipped when its output already exists in ``OUT/state.json``, so a killed run continues):

1. labels   the teacher's soft labels on every frame of ../shared/data/davis2016-dev (``sodkd label``,
            layout video: rows carry sequence and frame; the masks are not read);
2. video    ``video_scfnet_m3`` initialised from the image student, distilled with the spatiotemporal loss
            (per-frame soft dice + change consistency + inter-frame relation) on the clips of the TRAIN
            sequences (``sodkd distill --task video``'s core);
   With ``--stills LABELS IMAGES`` every step also gets ``--stills-per-step`` still clips (three copies of one
            image the teacher labelled, e.g. the image reference run's KD pool): rehearsal of single-image
            saliency while the student fits five sequences;
   ``--loss KEY=VALUE`` changes this run's temporal terms (e.g. ``steady=1``: :func:`kd.temporal.steadiness_loss`);
3. spatial  the same with the temporal terms off (``loss.change=0 loss.relation=0 loss.steady=0``): the ablation
            that separates the temporal distillation from the extra training and the architecture;
4. eval     teacher and image student frame by frame, both video students in streaming mode, on all ten
            sequences against the DAVIS masks: S, max F, MAE per sequence, and flicker (mean |p_t - p_t-1|
            where the mask changes on < 1% of the pixels), averaged over the TRAIN and the HELD-OUT sequences.

Defaults come from the image reference run (``benchmarks/reference_runs.py``: ``--reference``/state.json,
``runs/reference`` holds its teacher and KD student); pass ``--teacher`` / ``--image-student`` to use other
weights. Figures go to RESULTS.md, section ``video-reference``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("SODKD_SHARED_DATA", REPO.parent / "shared" / "data"))
DAVIS = DATA / "davis2016-dev"

SIZE = 224                      # default: the image student's own size (its weights record it)
EPOCHS = 4
DEFAULT_TEACHER = str(REPO / "weights" / "csnet-L-x2.onnx")   # card beside it
DEFAULT_STUDENT = str(REPO / "weights" / "kd-scfnet_m3-from-csnet-L-x2.fp16.pt")
BATCH = 4
LR = 0.005                      # from a trained image student: half the default
TRAIN_SEQS = ("blackswan", "breakdance", "car-roundabout", "cows", "dog")
HELD_OUT = ("bmx-trees", "camel", "car-shadow", "dance-twirl", "drift-chicane")


def _reference_weights(key: str, reference: Path) -> str | None:
    state = reference / "state.json"
    if state.exists():
        s = json.loads(state.read_text())
        if key in s:
            return s[key]["weights"][0]
    return None


def _numbers(flag: str, items: list[str]) -> dict[str, float]:
    """``["a=1", "b=0.5"]`` -> ``{"a": 1.0, "b": 0.5}``; anything else stops the script naming ``flag``. (A dict
    keyed by part patterns, which the config's dotted overrides cannot name.)"""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = float(value) if sep and key else float("x")
        except ValueError:
            raise SystemExit(f"{flag} {item!r}: expected KEY=NUMBER") from None
    return out


def reference_info(reference: Path) -> list[str]:
    """How the image reference run's teacher and KD student were trained (recorded when first used)."""
    ref = reference / "state.json"
    if not ref.exists():
        return []
    r = json.loads(ref.read_text())
    return [f"{r[k]['name']}: {r[k]['epochs']} epoch(s) of {r[k]['steps_per_epoch']} steps, best ECSSD-200 val MAE "
            f"{_f(r[k].get('best_val_mae'))}" for k in ("teacher", "kd") if k in r]


def distill(out: Path, name: str, teacher_labels: Path, init: str | None, loss: dict, log,
            stills: dict | None = None, kd: list[str] | None = None, freeze: list[str] | None = None,
            lr_mult: dict[str, float] | None = None, loss_overrides: list[str] | None = None) -> dict:
    from cluster.training.video import load_video_config, run_video_distill
    cfg = load_video_config({
        "model": {"name": "video_scfnet_m3", "init_weights": init, "freeze": freeze or [], "lr_mult": lr_mult or {}},
        "data": {"labels": str(teacher_labels), "images": str(DAVIS), "size": SIZE, "sequences": list(TRAIN_SEQS),
                 "stills": stills or {}},
        "loss": loss,
        "optim": {"epochs": EPOCHS, "batch_size": BATCH, "lr": LR, "lr_start": LR / 100, "lr_final": LR / 100,
                  "warmup_epochs": 0.3},
        "scaling": {"num_workers": 0, "torch_threads": 2},
        "run": {"name": name, "storage": str(out / "runs")},
        "mlflow": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "sodkd-video-reference", "log_every": 10},
        "output": {"dir": str(out / "weights"), "fp16": False},
    }, [f"kd.{item}" for item in kd or []] + [f"loss.{item}" for item in loss_overrides or []])
    t0 = time.perf_counter()
    res = run_video_distill(cfg)
    wall = time.perf_counter() - t0
    log.info("%s: %d clips, %d steps/epoch, %.0f s; history %s", name, res.clips, res.steps_per_epoch, wall,
             res.history)
    return {"name": name, "weights": res.weights[0], "clips": res.clips, "frames": res.frames, "kd": cfg.kd.describe(),
            "loss": {k: v for k, v in dataclasses.asdict(cfg.loss).items() if k in ("change", "relation", "steady",
                                                                                    "steady_below")},
            "freeze": list(cfg.model.freeze), "lr_mult": dict(cfg.model.lr_mult),
            "steps": res.steps_per_epoch * EPOCHS, "epochs": EPOCHS, "wall_s": wall, "history": res.history,
            "stills": stills, "lr": LR,
            "mlflow_run_id": res.mlflow_run_id}


def evaluate_teacher(spec: str, seqs: dict) -> dict:
    """A teacher file sodkd did not write (ONNX with a card) frame by frame at its card's size, scored like
    :func:`jobs.eval_video_cmd.evaluate_model` scores a student."""
    import numpy as np

    from cluster.teachers import build_teacher
    from kd.augment import postprocess
    from kd.imageio import resize
    from kd.video_eval import VideoEvaluator
    import torch
    t = build_teacher(spec, device="cpu")
    ev, t0, frames = VideoEvaluator(), time.perf_counter(), 0
    for seq, (images, masks) in seqs.items():
        maps = []
        for frame in images:
            p = t.predict(resize(frame, (t.input_size, t.input_size))[None])[0]
            maps.append(postprocess(torch.from_numpy(np.ascontiguousarray(p)), frame.shape[:2]))
        ev.add_sequence(seq, maps, masks)
        frames += len(images)
    res = ev.results()
    res.update(model=t.id, size=t.input_size, seconds_per_frame=(time.perf_counter() - t0) / max(frames, 1))
    return res


def summarize(results: dict) -> dict:
    """Means over the train and held-out sequences of S, max F, MAE and flicker (flicker over the sequences
    that have at least one pair of frames whose mask barely changes; ``flicker_seqs`` says how many)."""
    out = {}
    for split, seqs in (("train", TRAIN_SEQS), ("held_out", HELD_OUT), ("all", TRAIN_SEQS + HELD_OUT)):
        figs = [results["sequences"][s] for s in seqs if s in results["sequences"]]
        row = {k: float(sum(f[k] for f in figs) / len(figs)) for k in ("sm", "fm_max", "mae")}
        flick = [f["flicker"] for f in figs if f["flicker"] is not None and math.isfinite(f["flicker"])]
        row["flicker"] = float(sum(flick) / len(flick)) if flick else float("nan")
        row["flicker_seqs"] = len(flick)
        out[split] = row
    return out


def main() -> None:
    global DAVIS, EPOCHS, LR
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "video-reference"))
    ap.add_argument("--teacher", default=None, help="teacher weights (default: the image reference run's)")
    ap.add_argument("--image-student", default=None, help="image student weights (default: the reference KD one)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--data", default=str(DAVIS), help="DAVIS-layout root (default ../shared/data/davis2016-dev)")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--size", type=int, default=None, help="training and evaluation size (default: the image "
                    "student's own; a carded teacher runs at its card's size)")
    ap.add_argument("--section", default="video-reference", help="RESULTS.md section to (re)write")
    ap.add_argument("--reference", default=str(REPO / "runs" / "reference"),
                    help="output folder of benchmarks/reference_runs.py the weights come from (its state.json)")
    ap.add_argument("--stills", nargs=2, metavar=("LABELS", "IMAGES"), default=None,
                    help="rehearsal: an image label job's output and input (e.g. runs/ref/labels-csnet-x2-hflip "
                         "runs/ref/data/kd-pool); --stills-per-step still clips join every step of both video runs")
    ap.add_argument("--stills-per-step", type=int, default=2)
    ap.add_argument("--kd", nargs="*", default=[], metavar="KEY=VALUE",
                    help="the video students' per-frame loss (the kd section, kd/step.py KDLoss), e.g. pixel=bce "
                         "confidence=teacher sharpen=0.5 (the image reference recipe); default: KDLoss() = dice only")
    ap.add_argument("--loss", nargs="*", default=[], metavar="KEY=VALUE",
                    help="the spatiotemporal run's loss weights (kd/temporal.py VideoKDConfig), e.g. steady=1 "
                         "steady_below=0.05; the spatial-only ablation keeps every temporal term at 0")
    ap.add_argument("--lr-mult", nargs="*", default=[], metavar="PART=M",
                    help="model.lr_mult of both video runs, e.g. 'scfm*=0.1' heads=0.1: the decoder at a tenth of --lr")
    ap.add_argument("--lr", type=float, default=LR, help="peak learning rate of both video runs")
    ap.add_argument("--freeze", nargs="*", default=[], metavar="PART",
                    help="model.freeze of both video runs, e.g. backbone mapping context 'scfm*' heads: only the "
                         "video student's new temporal and guidance parts learn")
    args = ap.parse_args()
    stills = ({"labels": str(Path(args.stills[0]).resolve()), "images": str(Path(args.stills[1]).resolve()),
               "per_step": args.stills_per_step} if args.stills else None)
    DAVIS, EPOCHS, LR = Path(args.data), args.epochs, args.lr
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("video-reference")
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    lr_mult = _numbers("--lr-mult", args.lr_mult)

    def save():
        state_path.write_text(json.dumps(state, indent=1, default=float))

    reference = Path(args.reference)
    teacher = (args.teacher or state.get("teacher_weights") or _reference_weights("teacher", reference)
               or DEFAULT_TEACHER)
    student = (args.image_student or state.get("image_student_weights") or _reference_weights("kd", reference)
               or DEFAULT_STUDENT)
    from cluster.teachers import parse_teacher_spec
    from models import read_metadata
    global SIZE
    SIZE = int(args.size or state.get("size") or read_metadata(student).get("input_size") or SIZE)
    registered = parse_teacher_spec(teacher).kind == "registered" or teacher.endswith(".pt")
    teacher_model = read_metadata(teacher.split(":", 1)[-1])["model"] if registered else Path(
        teacher.split("?", 1)[0]).name.rsplit(".", 1)[0]
    teacher_spec = (teacher if ":" in teacher else f"{teacher_model}:{teacher}") if registered else teacher
    state.update(teacher_weights=teacher, teacher_model=teacher_model, size=SIZE)
    if "reference_info" not in state:
        state["reference_info"] = reference_info(reference)
    save()

    import ray
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)

    labels = out / "davis-labels"
    if "labels" not in state:
        from cluster.label import load_label_config, run_labelling
        t0 = time.perf_counter()
        lcfg = load_label_config({
            "input": str(DAVIS), "output": str(labels), "teachers": [teacher_spec],
            "layout": "video", "label_size": SIZE, "teacher_size": SIZE if registered else None,
            "progress": False,
            "pool": {"size": 1, "num_cpus": 1.0, "batch_size": 16, "torch_threads": 2},
            "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "sodkd-video-reference"}})
        summary = run_labelling(lcfg, samples=4)
        log.info(summary.line())
        state["labels"] = {"labelled": summary.labelled, "wall_s": time.perf_counter() - t0}
        save()

    if not student:
        log.info("labels done; no image student yet (the image reference run's KD student, or --image-student): "
                 "rerun this script when it exists")
        return
    state["image_student_weights"] = student
    save()
    if "video" not in state:
        state["video"] = distill(out, "kdvideo-video_scfnet_m3", labels, student, {}, log, stills, args.kd,
                                 args.freeze, lr_mult, args.loss)
        save()
    if "spatial" not in state:
        state["spatial"] = distill(out, "kdvideo-spatial-only", labels, student,
                                   {"change": 0.0, "relation": 0.0, "steady": 0.0},
                                   log, stills, args.kd, args.freeze, lr_mult)
        save()

    if "eval" not in state:
        from cluster.video_data import load_sequences
        from jobs.eval_video_cmd import evaluate_model
        from models import load_weights
        from models.fuse import undo_output_scale
        seqs = load_sequences(str(DAVIS))
        state["eval"] = {}
        for key, path in (("teacher", teacher), ("image", student), ("video", state["video"]["weights"]),
                          ("spatial", state["spatial"]["weights"])):
            if key == "teacher" and not registered:
                r = evaluate_teacher(teacher_spec, seqs)
            else:   # the image student as trained: what the video students start from (a calibrated file's
                file = path.split(":", 1)[-1]   # output scale undone, as their trainer does)
                model = load_weights(file)
                state.setdefault("output_scale", {})[key] = undo_output_scale(model, read_metadata(file))
                r = evaluate_model(model, seqs, SIZE)
            state["eval"][key] = {"summary": summarize(r), "overall": r["overall"],
                                  "sequences": r["sequences"], "ms_per_frame": r["seconds_per_frame"] * 1e3}
            log.info("%s: %s", key, state["eval"][key]["summary"])
        save()

    write_results(state, Path(args.results), args.section)


def _rel(path: str) -> str:
    """A path inside a checkout, relative to it (the run may have used a frozen copy of the repository)."""
    p = path.split("?", 1)[0]
    return p.split("/weights/", 1)[1].join(("weights/", "")) if "/weights/" in p else p


def _f(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_results(state: dict, results: Path, section: str = "video-reference") -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "benchmarks" / "models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ev = state["eval"]
    names = {"teacher": f"teacher {state['teacher_model']} (per frame)",
             "image": "image student scfnet_m3 (per frame)",
             "spatial": "video_scfnet_m3, spatial KD only (streaming)",
             "video": "video_scfnet_m3, spatiotemporal KD (streaming)"}
    v = state["video"]
    lines = [
        "## Video reference run (issue 6" + (f", `{section}`" if section != "video-reference" else "")
        + "): video student vs image student on DAVIS-2016 (10 dev sequences)",
        "",
        f"Teacher `{_rel(state['teacher_weights'])}` ({state['teacher_model']}), image student "
        f"`{_rel(state['image_student_weights'])}` (the reference teacher and image student"
        + (f"; its calibrated output scale {state['output_scale']['image']:g} undone: the image student as trained, "
           "which is what the video students start from" if state.get("output_scale", {}).get("image", 1) != 1 else "")
        + "). Soft labels: "
        f"{state['labels']['labelled']} DAVIS frames labelled by the teacher at {SIZE} px in "
        f"{state['labels']['wall_s'] / 60:.1f} min; no DAVIS mask is used for training.",
        "",
        f"Both video students start from the image student's weights and train {v['epochs']} epochs on the clips "
        f"(3 frames, stride 2) of the TRAIN sequences {', '.join(TRAIN_SEQS)} ({v['clips']} clips, {v['steps']} "
        f"steps of {BATCH} clips, {SIZE} px, SGD lr {v.get('lr', LR)}, warm-up + cosine; per-frame loss "
        f"{v.get('kd', 'dice')}; temporal terms: change {v.get('loss', {}).get('change', 1.0):g}, relation "
        f"{v.get('loss', {}).get('relation', 1.0):g}"
        + (f", steadiness {v['loss']['steady']:g} below a teacher change of {v['loss']['steady_below']:g}"
           if v.get("loss", {}).get("steady") else "")
        + (f"; frozen: {', '.join(v['freeze'])}" + ("" if v.get("lr_mult") or "heads" not in v["freeze"] else
                                                      " (only the new temporal and guidance parts learn)")
           if v.get("freeze") else "")
        + ("; learning rate per part: " + ", ".join(f"{k} {m:g}x" for k, m in v["lr_mult"].items())
           if v.get("lr_mult") else "") + ")"
        + (f", each step with {v['stills']['per_step']} still clips beside them (rehearsal: 3 copies of one "
           f"image of `{os.path.relpath(v['stills']['images'], REPO)}` with its teacher label from "
           f"`{os.path.relpath(v['stills']['labels'], REPO)}`)"
           if v.get("stills") else "") + f", in {v['wall_s'] / 60:.1f} and "
        f"{state['spatial']['wall_s'] / 60:.1f} min on 2 shared CPU cores. HELD-OUT sequences: "
        f"{', '.join(HELD_OUT)}. Everything is evaluated at {SIZE} px against the DAVIS masks (PySODMetrics, "
        "per-frame min-max normalisation), averaged per sequence then over the sequences of each split; "
        "flicker = mean |p_t - p_t-1| (probabilities, not normalised) over consecutive frames whose mask changes "
        "on < 1% of the pixels (lower = steadier).",
        "",
        "| model | split | S | max F | MAE | flicker (sequences) |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("teacher", "image", "spatial", "video"):
        for split in ("train", "held_out"):
            s = ev[key]["summary"][split]
            lines.append(f"| {names[key]} | {split.replace('_', '-')} | {_f(s['sm'])} | {_f(s['fm_max'])} | "
                         f"{_f(s['mae'])} | {_f(s['flicker'], 4)} ({s['flicker_seqs']}) |")
    lines += ["", "Per sequence (S / max F / MAE / flicker):", "",
              "| sequence | split | " + " | ".join(names[k] for k in ("image", "video")) + " |", "|---|---|---|---|"]
    for seq in TRAIN_SEQS + HELD_OUT:
        cells = []
        for key in ("image", "video"):
            f = ev[key]["sequences"][seq]
            cells.append(f"{_f(f['sm'])} / {_f(f['fm_max'])} / {_f(f['mae'])} / {_f(f['flicker'], 4)}")
        lines.append(f"| {seq} | {'train' if seq in TRAIN_SEQS else 'held-out'} | " + " | ".join(cells) + " |")
    def delta(key: str, split: str, metric: str) -> str:
        a, b = ev["image"]["summary"][split][metric], ev[key]["summary"][split][metric]
        return f"{b - a:+.3f}" if metric != "flicker" else f"{100 * (b - a) / a:+.0f}%"
    lines += ["", "Against the image student run per frame (video minus image; flicker as a relative change): "
              + "; ".join(f"{names[k].split(',')[1].strip().split(' (')[0]}: "
                          + ", ".join(f"{split.replace('_', '-')} S {delta(k, split, 'sm')}, MAE "
                                      f"{delta(k, split, 'mae')}, flicker {delta(k, split, 'flicker')}"
                                      for split in ("train", "held_out"))
                          for k in ("spatial", "video")) + "."]
    if state.get("reference_info"):
        lines += ["", "The image reference run's weights used here: " + "; ".join(state["reference_info"]) + "."]
    lines += ["", f"Reading: minutes of CPU fine-tuning on five sequences at {SIZE} px, so every figure is far from "
              "the paper's DAVIS regime (SSAV reference: S .893, max F .861, MAE .028); what the run shows is the "
              "video pipeline end to end (label -> clips -> spatiotemporal KD -> streaming evaluation) and, under "
              "equal training, what the temporal terms change: compare the two video rows (same data, steps and "
              "initialisation; only the temporal terms differ) for the temporal KD, and either video "
              "row against the image student for the effect of fine-tuning on five DAVIS sequences."]
    lines += ["", "Final training losses (mean of the last epoch): " + "; ".join(
        f"{k}: " + ", ".join(f"{m.split('/')[-1]} {_f(val, 4)}" for m, val in state[k]['history'][-1].items()
                             if m.startswith('train/')) for k in ("video", "spatial")) + "."]
    bench.write_section(results, section, "\n".join(lines))


if __name__ == "__main__":
    main()
