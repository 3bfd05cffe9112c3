"""``sodkd demo`` (``make demo``): the main job end to end on embedded defaults, a few minutes on 2 cores.

1. a local directory plays the bucket: unlabeled images (the shared pool when ``../shared/data`` exists,
   else ``sample-data/``) are copied into ``demo-out/bucket/unlabeled``;
2. ``sodkd label``: the best teacher the repository ships (``weights/csnet-L-x2.onnx``, a public CSNet-L-x2
   with its teacher card beside it) soft-labels them with Ray Data at its card's size;
3. ``sodkd distill``: ``scfnet_m3`` learns from those labels on Ray Train (one worker) with the calibrated KD
   loss (dice + BCE x confidence, to the teacher's sharpened map). ``start=kd`` (default) goes on from the
   shipped KD student (``weights/kd-scfnet_m3-from-csnet-L-x2.fp16.pt``: distilled by sodkd from the same
   teacher on 8,475 unlabeled images; its model card is ``weights/README.md``): what a user does to adapt the
   student to their own images.
   ``start=fs`` goes on from the FS student's weights instead, ``start=scratch`` from random weights (both need
   far more steps than a demo has: a hundred steps of a new loss on a few hundred images moved the FS student
   by -0.001 to +0.005 MAE in our runs). The best epoch is chosen on a DUTS-TR hold-out that ships with the
   repository (``sample-data/duts-val``), never on the ECSSD images the table scores, and so is the student's
   output scale (``output.calibrate``, :mod:`kd.calibration`; ``calibrate=false`` keeps the map as trained);
4. the teacher, the supervised-only (FS) student and the shipped KD student (both trained for the same
   steps, size and batch: ``weights/README.md``) when their weights exist, and this
   demo's student are evaluated on ECSSD; a table is printed and an HTML report with saliency panels and PR
   curves is written;
5. every step is an MLflow run in ``demo-out/mlflow.db`` (sqlite); the demo's own run holds the report.
Reduced sizes and epochs keep it short: the figures show the pipeline working, not the paper's numbers
(those are in ``benchmarks/RESULTS.md``, reference runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
log = logging.getLogger("sodkd.demo")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    teacher: str = "weights/csnet-L-x2.onnx"   # the best teacher shipped (card: weights/csnet-L-x2.onnx.card.yaml)
    fs_student: str | None = "scfnet_m3:weights/fs-scfnet_m3.fp16.pt"  # supervised-only baseline, if present
    kd_student: str | None = "scfnet_m3:weights/kd-scfnet_m3-from-csnet-L-x2.fp16.pt"  # shipped KD student
    unlabeled: int = 400          # images labelled and distilled on
    size: int | None = None       # student training/eval size; None = the FS student's own (its weights say)
    epochs: int = 4
    batch_size: int = 16
    start: str = "kd"             # kd / fs: distil on from the shipped KD / FS student; scratch: random weights
    lr: float | None = None       # None: 0.005 from kd or fs (fine-tuning), 0.02 from scratch
    val: str = "sample-data/duts-val"   # hold-out pairs for the best epoch (never the ECSSD images scored)
    calibrate: bool = True        # choose the demo student's output scale on `val` (sodkd calibrate)
    eval_images: int = 200        # ECSSD images scored per model
    panels: int = 6
    data: str | None = None       # root with unlabeled/ and ecssd/; None = ../shared/data or sample-data


def _data_roots(cfg: DemoConfig) -> tuple[list[Path], Path, str]:
    """(unlabeled image sources, ECSSD root, description)."""
    if cfg.data:
        root = Path(cfg.data)
        return [root / "unlabeled"], root / "ecssd", str(root)
    if (SHARED / "unlabeled" / "imagenet-1k").is_dir():
        return ([SHARED / "unlabeled" / "imagenet-1k", SHARED / "duts-tr" / "images"], SHARED / "ecssd",
                f"{SHARED} (ImageNet pool + DUTS-TR images without masks)")
    return [REPO / "sample-data" / "unlabeled"], REPO / "sample-data" / "ecssd", "sample-data/ (no ../shared/data)"


def _fill_bucket(sources: list[Path], dest: Path, n: int) -> int:
    """Copy up to ``n`` images, interleaving the sources, into ``dest`` (the demo's bucket)."""
    dest.mkdir(parents=True, exist_ok=True)
    lists = [sorted(p for p in s.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for s in sources]
    picked: list[Path] = []
    i = 0
    while len(picked) < n and any(i < len(lst) for lst in lists):
        picked += [lst[i] for lst in lists if i < len(lst)]
        i += 1
    for p in picked[:n]:
        shutil.copy(p, dest / f"{p.parent.parent.name}-{p.name}" if p.parent.name == "images" else dest / p.name)
    return min(n, len(picked))


def _weights_path(spec: str | None) -> Path | None:
    if not spec:
        return None
    path = Path(spec.split(":", 1)[1] if ":" in spec else spec)
    return path if path.is_absolute() else REPO / path


def _size_of(spec: str, size: int) -> dict[str, str]:
    """Params and GMACs of a registered model's weights, params of an ONNX file (its initialisers)."""
    from models import count_macs, count_params, create_model, read_metadata
    if spec.lower().endswith(".onnx"):
        import onnx
        import numpy as np
        proto = onnx.load(spec)
        n = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
        return {"params": f"{n / 1e6:.2f}M", "GMACs": "-"}
    meta = read_metadata(str(_weights_path(spec)))
    net = create_model(meta["model"], **meta.get("config", {}))
    return {"params": f"{count_params(net) / 1e6:.2f}M", "GMACs": f"{count_macs(net, size=size) / 1e9:.2f}"}


def run_demo(cfg: DemoConfig) -> dict:
    import mlflow

    from cluster import catalog
    from cluster.evaluate import evaluate
    from cluster.label import load_label_config, run_labelling
    from cluster.raypool import ensure_ray
    from cluster.teachers import build_teacher
    from cluster.training.launch import run_training
    from cluster.training.sections import load_train_config
    from kd import report
    from kd.augment import MILD
    from kd.imageio import decode_image, decode_mask, resize
    from models import read_metadata

    t_start = time.perf_counter()
    ensure_ray()   # local Ray unless this runs as a submitted job (then RAY_ADDRESS points at the cluster)
    out = Path(cfg.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = "sodkd-demo"
    from cluster.teachers import parse_teacher_spec
    teacher_registered = parse_teacher_spec(cfg.teacher).kind == "registered"
    teacher_w = _weights_path(cfg.teacher)
    if teacher_w is None or not teacher_w.is_file():
        raise FileNotFoundError(f"{teacher_w}: the reference teacher weights are missing (see weights/README.md)")
    teacher_spec = f"{cfg.teacher.split(':', 1)[0]}:{teacher_w}" if teacher_registered else str(teacher_w)
    fs_w = _weights_path(cfg.fs_student)
    fs_meta = read_metadata(str(fs_w)) if fs_w is not None and fs_w.is_file() else {}
    size = int(cfg.size or fs_meta.get("input_size") or 224)
    sources, ecssd_root, data_desc = _data_roots(cfg)
    bucket = out / "bucket"
    n = _fill_bucket(sources, bucket / "unlabeled", cfg.unlabeled)
    print(f"[1/4] bucket {bucket}: {n} unlabeled images from {data_desc}", flush=True)

    track = {"enabled": True, "uri": tracking_uri, "experiment": experiment}
    label_cfg = load_label_config({
        "input": str(bucket / "unlabeled"), "output": str(bucket / "soft-labels"), "teachers": [teacher_spec],
        "teacher_size": size if teacher_registered else None, "label_size": size, "progress": False,
        "pool": {"size": 1, "num_cpus": 1.0, "batch_size": 16, "device": "cpu"},
        "tracking": {**track, "run_name": "demo-label"}})
    summary = run_labelling(label_cfg)
    print(f"[2/4] labelled {summary.labelled} images ({summary.images_per_s:.1f} images/s), "
          f"rejected {summary.rejected}; shards in {bucket / 'soft-labels'}", flush=True)

    starts = {"kd": ("kd_student", "the shipped KD student"), "fs": ("fs_student", "the FS student"),
              "scratch": (None, "scratch")}
    if cfg.start not in starts:
        raise ValueError(f"start: expected one of {', '.join(starts)}, got {cfg.start!r}")
    key, start_desc = starts[cfg.start]
    init = None
    if key is not None:
        init = _weights_path(getattr(cfg, key))
        if init is None or not init.is_file():
            raise FileNotFoundError(f"start={cfg.start}: weights {init} ({key}) not found; pass start=scratch")
    val_root = Path(cfg.val) if Path(cfg.val).is_absolute() else REPO / cfg.val
    lr = cfg.lr if cfg.lr is not None else (0.005 if init is not None else 0.02)
    train_cfg = load_train_config({
        "mode": "distill",
        # the reference runs' loss: dice + BCE x teacher confidence, to the teacher's map sharpened at s = 0.5
        # (kd.step: the MAE optimum of a calibrated teacher is its thresholded map; s chosen on DUTS-TR hold-out)
        "kd": {"structure": "dice", "pixel": "bce", "confidence": "teacher", "sharpen": 0.5},
        "model": {"name": "scfnet_m3", "init_weights": str(init) if init is not None else None},
        "data": {"unlabeled": [{"uri": str(bucket / "unlabeled"), "labels": str(bucket / "soft-labels")}],
                 "load_size": size, "sizes": [size], "shuffle_buffer": 256,
                 # the FS student's own recipe: fine-tuning under the paper's stronger augmentation (blur,
                 # vertical flips) first costs accuracy while batch-norm statistics move
                 "augment": MILD.to_dict()},
        "val": {"uri": str(val_root), "size": size, "panel": 4},
        "optim": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": lr, "lr_start": lr / 100,
                  "lr_final": lr / 100, "warmup_epochs": 1.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1.0, "torch_threads": 2},
        "run": {"name": "demo-kd-scfnet_m3", "storage": str(out / "runs")},
        "mlflow": {**track, "run_name": "demo-distill", "registered_model": "sodkd-demo-scfnet_m3",
                   "log_every": 5},
        # its output scale chosen on the same hold-out (kd.calibration), as the shipped students' were
        "output": {"dir": str(out / "weights"), "fp16": False, "calibrate": cfg.calibrate}})
    outcome = run_training(train_cfg)
    student_w = next(w for w in outcome.weights if w.endswith(".pt") and ".fp16." not in w)
    print(f"[3/4] distilled scfnet_m3 (from {start_desc}) for "
          f"{cfg.epochs} epochs in {outcome.wall_s:.0f} s -> {student_w}", flush=True)

    ecssd = catalog.paired_folder(str(ecssd_root))
    items = ecssd.items[:cfg.eval_images]
    step = max(1, len(items) // cfg.panels)
    panel_keys = [it.key for it in items[::step][:cfg.panels]]
    teacher_name = cfg.teacher.split(":")[0] if teacher_registered else Path(cfg.teacher).name.rsplit(".", 1)[0]
    models = {f"teacher ({teacher_name})": teacher_spec}
    if fs_w is not None and fs_w.is_file():
        models["FS student (labels only)"] = f"{cfg.fs_student.split(':', 1)[0]}:{fs_w}"
    kd_w = _weights_path(cfg.kd_student)
    if kd_w is not None and kd_w.is_file():
        models["KD student (shipped)"] = f"{cfg.kd_student.split(':', 1)[0]}:{kd_w}"
    models["KD student (this demo)"] = f"scfnet_m3:{student_w}"
    results, curves, samples, extra = {}, {}, {}, {}
    for name, spec in models.items():
        t = build_teacher(spec, device="cpu")   # every model at its own size (weights and cards say)
        res = evaluate(t, ecssd, name=name, limit=cfg.eval_images, sample_keys=panel_keys)
        results[name], curves[name], samples[name] = res.metrics, res.curves, res.samples
        extra[name] = {**_size_of(spec, t.input_size), "size": str(t.input_size), "img/s": f"{res.images_per_s:.1f}"}
    rows = []
    for key in panel_keys:
        it = next(i for i in items if i.key == key)
        image = decode_image(Path(it.path).read_bytes())
        gt = decode_mask(Path(it.mask_path).read_bytes())
        row = {"image": resize(image, gt.shape), "mask": gt}
        row.update({name: samples[name][key] for name in models})
        rows.append(row)
    cols = ["image", *models, "mask"]
    figures = {
        "Saliency panels (ECSSD)": report.figure_png(report.panel_figure(rows, cols)),
        "PR curves and F-measure (ECSSD)": report.figure_png(report.pr_figure(curves, f"ECSSD, {len(items)} images")),
    }
    table = report.metrics_table_text(results, extra)
    notes = [f"Data: {n} unlabeled images from {data_desc}; evaluation on {len(items)} ECSSD images at "
             f"each model's own size (students {size}x{size}; min-max normalised predictions, PySODMetrics).",
             f"Labelling: {summary.labelled} labelled at {summary.images_per_s:.1f} images/s with {teacher_spec}.",
             f"Distillation: scfnet_m3 from {start_desc}, best epoch on {val_root.name}, "
             f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {lr:g}, size {size}, loss {train_cfg.kd.describe()}, "
             f"{outcome.wall_s:.0f} s on this machine.",
             "Demo scale: short schedules on CPU. Reference-run figures are in benchmarks/RESULTS.md."]
    html_path = report.write_html(out / "report.html", "sodkd demo: distilling a SOD teacher into scfnet_m3",
                                  results, figures, notes, extra)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="demo-report") as run:
        mlflow.log_params({"unlabeled": n, "size": size, "epochs": cfg.epochs, "eval_images": len(items),
                           "teacher": cfg.teacher, "data": data_desc})
        for name, m in results.items():
            slug = name.split(" ")[0].lower()
            mlflow.log_metrics({f"ecssd/{slug}/{k}": v for k, v in m.items()})
        mlflow.log_artifact(str(html_path))
        for caption, png in figures.items():
            p = out / (caption.split(" ")[0].lower() + ".png")
            p.write_bytes(png)
            mlflow.log_artifact(str(p), "figures")
        report_run = run.info.run_id
    (out / "results.json").write_text(json.dumps({"results": results, "extra": extra}, indent=2))
    wall = time.perf_counter() - t_start
    print(f"[4/4] evaluated {len(models)} models on {len(items)} ECSSD images\n")
    print(table)
    print(f"\nDemo finished in {wall / 60:.1f} min.")
    print(f"  Report:    {html_path}   (open it in a browser)")
    print(f"  MLflow UI: {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {tracking_uri} "
          f"--port 5000   then open http://127.0.0.1:5000 (experiment '{experiment}', run {report_run})")
    return {"results": results, "report": str(html_path), "wall_s": wall, "tracking_uri": tracking_uri}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML with DemoConfig keys")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=2 unlabeled=100")


def run(args: argparse.Namespace) -> int:
    from kd.config import load_config
    logging.getLogger("ray").setLevel(logging.WARNING)
    cfg = load_config(DemoConfig, args.config, args.overrides)
    run_demo(cfg)
    return 0
