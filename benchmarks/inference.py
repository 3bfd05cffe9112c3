"""CPU inference engines side by side: the students through every backend against third-party peers.

In ONE process, in interleaved rounds (every runner once per configuration per round, the order rotated
each round), at 352 and 224 px, batch 1 and 8, 1 and 2 threads:

- ``scfnet_m3`` (``--weights``, by default the committed fast KD student,
  ``weights/kd-scfnet_m3-x0.3-c8-from-csnet-L-x2.fp16.pt``) and
  ``dedecoder_m3`` (no committed weights: seeded random init, speed only) through each backend -- eager
  (PyTorch, BatchNorm folded), ONNX fp32 (free height and width, as ``sodkd export`` writes it, and
  ``onnx-fp32-fixed``: fixed at each measured size, to compare), ONNX INT8
  (``cluster.quantize``: QDQ for both, QOperator too for scfnet_m3) and torch.export ``.pt2`` -- all exported
  the way ``sodkd export`` and the predictor do;
- the peers of ``../shared/teachers``: CSNet-L-x1, CSNet-L-x2 and U2Net-p (random weights), through the same
  ONNX Runtime.

Timed is the network only: a seeded normalised float32 (N, 3, S, S) input, no decoding or resizing. Per cell
and round the runner is called until ``--min-s`` seconds have passed (at least once), after one warm-up call
per cell; img/s = images / wall seconds, img/CPU-s = images / CPU seconds of this process (all its threads).
Ratios to a peer are taken per round (both measured within seconds of each other), then the median over
rounds: on a machine loaded by other jobs, absolute figures are low and noisy, the ratios much less so.
``OMP_WAIT_POLICY=PASSIVE`` as in benchmarks/models.py; ONNX Runtime sessions have ``threads`` intra-op
threads and 1 inter-op thread.

Accuracy: the ECSSD MAE of every scfnet_m3 backend against fp32 eager (unfolded), at the weights' 224 px,
on ``--eval-limit`` images of ``--eval-set``. Kernels: the op types of the INT8 graphs after ONNX Runtime's
graph optimisation (what actually runs) and the CPU's ISA flags.

Exports are cached in ``--workdir`` (rerunning measures only). Writes the ``inference`` section of
benchmarks/RESULTS.md (``write_section`` of benchmarks/models.py).

    .venv/bin/python benchmarks/inference.py [--rounds 3] [--min-s 0.3] [--no-write]  (on a quiet machine)
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "inference"
TEACHERS = REPO.parent / "shared" / "teachers"
KD_WEIGHTS = REPO / "weights" / "kd-scfnet_m3-x0.3-c8-from-csnet-L-x2.fp16.pt"   # the fast student
PEERS = {"CSNet-L-x1": "csnet-L-x1.onnx", "CSNet-L-x2": "csnet-L-x2.onnx", "U2Net-p": "u2netp-random-weights.onnx"}


def _bench_models():
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "benchmarks" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Runner:
    """One model through one engine: ``run(x, threads)`` on a float32 NCHW array."""

    def __init__(self, name: str, backend: str, kind: str):
        self.name, self.backend, self.kind = name, backend, kind

    @property
    def label(self) -> str:
        return f"{self.name} {self.backend}" if self.kind == "student" else self.name

    def run(self, x: np.ndarray, threads: int) -> None:
        raise NotImplementedError


class TorchRunner(Runner):
    def __init__(self, name, backend, module):
        super().__init__(name, backend, "student")
        self.module = module

    def run(self, x, threads):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            self.module(torch.from_numpy(x))


class FixedOnnxRunner(Runner):
    """One ONNX file per input size (graphs fixed at their size), picked by the input's width."""

    def __init__(self, name, backend, paths: dict[int, Path], threads: list[int]):
        super().__init__(name, backend, "student")
        self.by_size = {size: OnnxRunner(name, backend, "student", path, threads) for size, path in paths.items()}

    def run(self, x, threads):
        self.by_size[x.shape[-1]].run(x, threads)


class OnnxRunner(Runner):
    def __init__(self, name, backend, kind, path: Path, threads: list[int]):
        import onnxruntime as ort
        super().__init__(name, backend, kind)
        self.path, self.sessions = path, {}
        for t in threads:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = t, 1
            self.sessions[t] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.sessions[threads[0]].get_inputs()[0].name

    def run(self, x, threads):
        self.sessions[threads].run(None, {self.input: x})


def build_exports(workdir: Path, calibration: str, count: int, exporter: str, weights: Path = KD_WEIGHTS,
                  sizes: tuple[int, ...] = ()) -> tuple[dict[str, dict[str, Path]], dict, dict[int, Path]]:
    """The students' exported files (cached per weights file): {model: {backend: path}}, the eager modules, and
    scfnet_m3 exported at a fixed size for each of ``sizes`` and its own: {size: path}."""
    from cluster.quantize import calibration_inputs, quantize_onnx
    from cluster.export import export_teacher
    from models import create_model, load_weights
    workdir = workdir / weights.name.split(".")[0]
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    students = {"scfnet_m3": load_weights(weights).float().eval(),
                "dedecoder_m3": create_model("dedecoder_m3").eval()}
    students["dedecoder_m3"].input_size = 224
    files: dict[str, dict[str, Path]] = {}
    for name, model in students.items():
        f = files[name] = {}
        f["onnx-fp32"] = workdir / f"{name}.onnx"
        f["pt2"] = workdir / f"{name}.pt2"
        if not f["onnx-fp32"].exists():
            t = time.perf_counter()
            export_teacher(model, f["onnx-fp32"], "onnx", input_size=224, onnx_exporter=exporter)
            print(f"exported {f['onnx-fp32'].name} in {time.perf_counter() - t:.0f} s", flush=True)
        if not f["pt2"].exists():
            export_teacher(model, f["pt2"], "pt2", input_size=224)
        calib = None
        for fmt in (("qdq", "qoperator") if name == "scfnet_m3" else ("qdq",)):
            f[f"onnx-int8-{fmt}"] = out = workdir / f"{name}.int8-{fmt}.onnx"
            if not out.exists():
                calib = calib or calibration_inputs(calibration, count, 224, model.mean, model.std)
                t = time.perf_counter()
                quantize_onnx(f["onnx-fp32"], out, calib, fmt)
                print(f"quantised {out.name} in {time.perf_counter() - t:.0f} s", flush=True)
    model, fixed = students["scfnet_m3"], {}
    for size in sorted({*sizes, int(model.input_size)}):
        fixed[size] = workdir / f"scfnet_m3.fixed{size}.onnx"
        if not fixed[size].exists():
            export_teacher(model, fixed[size], "onnx", input_size=size, onnx_exporter=exporter, fixed_size=True)
    return files, students, fixed


def build_runners(files, students, threads, fixed: dict[int, Path]) -> list[Runner]:
    from models.fuse import fold_batchnorm
    runners: list[Runner] = []
    for name, f in files.items():
        folded = fold_batchnorm(students[name]).eval()
        runners.append(TorchRunner(name, "eager", folded.predict))
        runners.append(OnnxRunner(name, "onnx-fp32", "student", f["onnx-fp32"], threads))
        if name == "scfnet_m3":
            runners.append(FixedOnnxRunner(name, "onnx-fp32-fixed", fixed, threads))
        for key in sorted(k for k in f if k.startswith("onnx-int8")):
            runners.append(OnnxRunner(name, key, "student", f[key], threads))
        runners.append(TorchRunner(name, "pt2", torch.export.load(str(f["pt2"])).module()))
    for peer, fname in PEERS.items():
        runners.append(OnnxRunner(peer, "onnx", "peer", TEACHERS / fname, threads))
    return runners


def measure(runners, configs, rounds: int, min_s: float, deadline: float):
    """{(label, cfg): [(img/s, img/CPU-s) per round]}; stops after the round that passes ``deadline``."""
    rng = np.random.default_rng(0)
    inputs = {(s, b): rng.standard_normal((b, 3, s, s)).astype(np.float32) for s, b, _ in configs}
    for cfg in configs:                     # warm-up: one call per cell (allocations, shape caches)
        for r in runners:
            r.run(inputs[cfg[:2]], cfg[2])
    out: dict = collections.defaultdict(list)
    done = 0
    for k in range(rounds):
        order = runners[k % len(runners):] + runners[:k % len(runners)]
        for cfg in configs:
            x = inputs[cfg[:2]]
            for r in order:
                n, t0, c0 = 0, time.perf_counter(), time.process_time()
                while True:
                    r.run(x, cfg[2])
                    n += x.shape[0]
                    wall = time.perf_counter() - t0
                    if wall >= min_s:
                        break
                cpu = max(time.process_time() - c0, 1e-9)
                out[(r.label, cfg)].append((n / wall, n / cpu))
        done += 1
        print(f"round {k + 1}/{rounds} done at {time.perf_counter() - START:.0f} s", flush=True)
        if time.perf_counter() > deadline:
            break
    return out, done


def accuracy(files, eval_set: str, limit: int, weights: Path = KD_WEIGHTS,
             fixed: dict[int, Path] | None = None) -> dict[str, float]:
    """MAE (py_sod_metrics, per-image min-max normalised) of each scfnet_m3 backend and of fp32 eager."""
    import py_sod_metrics as psm

    from cluster.catalog import paired_folder
    from cluster.evaluate import predict_items
    from cluster.predictor import Predictor
    from cluster.teachers import build_teacher
    from kd.imageio import decode_mask, resize
    from cluster import storage
    spec = f"scfnet_m3:{weights}"
    torch.set_num_threads(1)
    teachers = {"fp32 eager (reference)": build_teacher(spec, device="cpu", precision="fp32"),
                "eager": Predictor.load(spec, backend="eager").teacher}
    for key, path in files["scfnet_m3"].items():
        teachers[key] = Predictor.load(path, threads=1).teacher
    if fixed:
        teachers["onnx-fp32-fixed"] = Predictor.load(fixed[int(teachers["eager"].input_size)], threads=1).teacher
    catalog = paired_folder(eval_set, limit=limit)
    gts = [decode_mask(storage.read_bytes(catalog.fs, it.mask_path)) for it in catalog.items]
    maes = {}
    for name, t in teachers.items():
        m = psm.MAE()
        for (it, _, pred), gt in zip(predict_items(t, catalog, catalog.items), gts):
            m.step(pred=resize(pred, gt.shape), gt=gt)
        maes[name] = float(m.get_results()["mae"])
    return maes, len(catalog)


def int8_kernels(files, tmp: Path) -> dict[str, dict[str, int]]:
    """Op types of each INT8 graph after ONNX Runtime's optimisation (the kernels that run)."""
    import onnx
    import onnxruntime as ort
    out = {}
    for key, path in files["scfnet_m3"].items():
        if not key.startswith("onnx"):
            continue
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp / f"opt-{key}.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        g = onnx.load(opts.optimized_model_filepath).graph
        c = collections.Counter(n.op_type for n in g.node)
        out[key] = dict(c.most_common(6))
    return out


def isa_flags() -> str:
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8"]
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def med(v):
    return statistics.median(v)


def _load_note(machine) -> str:
    """How busy the machine was: the 1-minute load average before the run against its core count."""
    try:
        before = float(str(machine["load_before"]).split()[0])
    except (ValueError, IndexError):
        return "load unknown"
    cores = machine.get("cores") or 1
    return ("on a quiet machine" if before < 0.75 * cores else
            f"**on a loaded machine** (other jobs on the {cores} cores: absolute img/s are low and noisy)")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def render(res, rounds_done, args, configs, maes, n_eval, kernels, machine) -> str:
    labels = list(dict.fromkeys(lab for lab, _ in res))
    students = [lab for lab in labels if lab not in PEERS]
    ips = {(lab, cfg): med([a for a, _ in v]) for (lab, cfg), v in res.items()}
    ipcs = {(lab, cfg): med([c for _, c in v]) for (lab, cfg), v in res.items()}

    def ratio(lab, peer, cfg):
        return med([a / p for (a, _), (p, _) in zip(res[(lab, cfg)], res[(peer, cfg)])])

    head = (352, 1, 1)
    ref = maes["fp32 eager (reference)"]
    lines = [
        "### Inference engines: students vs. peers on this CPU (benchmarks/inference.py)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['isa']}); torch {torch.__version__}, "
        f"onnxruntime {machine['ort']}. Measured {machine['date']}, {_load_note(machine)} (load average "
        f"{machine['load_before']} before, {machine['load_after']} after): the ratios (both sides measured within "
        f"seconds in the same process, median over {rounds_done} interleaved rounds) are the figures to read.",
        "",
        f"Command: `.venv/bin/python {machine['command']}`"
        f" ({machine['wall_s']:.0f} s). Network only (seeded normalised input, no decode/resize); img/s = images / "
        "wall s, img/CPU-s = images / CPU s of the process. scfnet_m3 = the KD student "
        f"`{_shown(args.weights)}` ({machine['student']}); dedecoder_m3 = "
        "random init (speed only). onnx-fp32 = the graph `sodkd export` writes and a predictor runs (free "
        "height and width); onnx-fp32-fixed = the same exported at each measured size (height and width fixed). "
        f"INT8 = ONNX Runtime static quantisation, per-channel int8 weights (7-bit range), uint8 "
        f"activations, MinMax calibration on {args.calibration_count} images of {args.calibration}.",
        "",
        f"#### scfnet_m3 at {head[0]} px, batch {head[1]}, {head[2]} thread (the issue's target: >= 60x U2Net-p, "
        ">= 30x CSNet-L-x1)",
        "",
        f"| backend | img/s | img/CPU-s | x U2Net-p | x CSNet-L-x1 | x CSNet-L-x2 | ECSSD MAE ({n_eval} imgs, 224 px) "
        "| MAE change vs fp32 eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lab in students:
        if not lab.startswith("scfnet_m3"):
            continue
        b = lab.split(" ", 1)[1]
        mae = maes.get(b)       # accuracy() names each backend as the runners do
        lines.append(f"| {b} | {ips[(lab, head)]:.1f} | {ipcs[(lab, head)]:.1f} | {ratio(lab, 'U2Net-p', head):.1f} "
                     f"| {ratio(lab, 'CSNet-L-x1', head):.2f} | {ratio(lab, 'CSNet-L-x2', head):.2f} | "
                     f"{mae:.4f} | {mae - ref:+.4f} |")
    for peer in PEERS:
        lines.append(f"| peer {peer} | {ips[(peer, head)]:.1f} | {ipcs[(peer, head)]:.1f} | | | | | |")
    lines += ["", f"fp32 eager without BatchNorm folding (the reference): MAE {ref:.4f}.", "",
              "#### Every configuration: img/s (img/CPU-s)", "",
              "| runner | " + " | ".join(f"{s} px b{b} t{t}" for s, b, t in configs) + " |",
              "|---|" + "---:|" * len(configs)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(f"{ips[(lab, c)]:.1f} ({ipcs[(lab, c)]:.1f})" for c in configs) + " |")
    lines += ["", "#### Ratios of img/s to the peers (per-round ratio, median): x U2Net-p / x CSNet-L-x1", "",
              "| student backend | " + " | ".join(f"{s} b{b} t{t}" for s, b, t in configs) + " |",
              "|---|" + "---:|" * len(configs)]
    for lab in students:
        lines.append(f"| {lab} | " + " | ".join(f"{ratio(lab, 'U2Net-p', c):.0f} / {ratio(lab, 'CSNet-L-x1', c):.1f}"
                                               for c in configs) + " |")
    lines += ["", "#### Which ONNX Runtime kernels run (op types after ORT's graph optimisation, most frequent)", ""]
    for key, ops in kernels.items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
    return "\n".join(lines)


START = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=KD_WEIGHTS, help="the scfnet_m3 student's weights file")
    p.add_argument("--sizes", type=int, nargs="+", default=[352, 224])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-s", type=float, default=0.3, help="seconds per cell and round (at least one call)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop after the round that passes this")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sodkd-bench-inference"), help="export cache")
    p.add_argument("--calibration", default=str(REPO / "sample-data" / "ecssd"))
    p.add_argument("--calibration-count", type=int, default=32)
    p.add_argument("--onnx-exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--eval-set", default=str(REPO.parent / "shared" / "data" / "ecssd"))
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--setup-only", action="store_true", help="write the exports and stop")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    import onnxruntime as ort
    bm = _bench_models()
    machine = {"cpu": bm.cpu_model(), "cores": os.cpu_count(), "isa": isa_flags(), "ort": ort.__version__,
               "load_before": bm.load_average(), "command": " ".join(["benchmarks/inference.py", *(
                   sys.argv[1:] if argv is None else argv)]),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    files, students, fixed = build_exports(args.workdir, args.calibration, args.calibration_count,
                                           args.onnx_exporter, args.weights, tuple(args.sizes))
    from models import count_macs, count_params
    m = students["scfnet_m3"]
    machine["student"] = (f"width x{m.config['width_mult']:g}, decoder c = {m.config['channels']}, "
                          f"{count_params(m) / 1e6:.2f} M params, {count_macs(m, 352) / 1e9:.3f} GMACs at 352")
    if args.setup_only:
        return 0
    t0 = time.perf_counter()
    configs = [(s, b, t) for s in args.sizes for b in args.batches for t in args.threads]
    runners = build_runners(files, students, args.threads, fixed)
    res, done = measure(runners, configs, args.rounds, args.min_s, t0 + 60 * args.max_minutes)
    maes, n_eval = accuracy(files, args.eval_set, args.eval_limit, args.weights, fixed)
    kernels = int8_kernels(files, args.workdir)
    machine["load_after"], machine["wall_s"] = bm.load_average(), time.perf_counter() - t0
    text = render(res, done, args, configs, maes, n_eval, kernels, machine)
    print(text)
    if not args.no_write:
        bm.write_section(RESULTS, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
