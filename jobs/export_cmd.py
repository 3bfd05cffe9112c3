"""``sodkd export --model MODEL:WEIGHTS --output FILE.onnx|FILE.pt2``: export with a parity check and a card.

Writes ONNX (dynamic batch, height and width; H and W in multiples of 32 when the working size is one) or a
torch.export program (``.pt2``, the same dynamic dims), BatchNorm folded into the convolutions. TorchScript is
no longer written (torch deprecates it); ``.ts`` files written by older releases still load as teachers.

The exported file is self-describing (preprocessing and model config in its metadata), so it can be handed
to ``sodkd label --teacher FILE`` or ``sodkd predict --model FILE`` as is. After writing, the file is loaded
back through the loader the labelling job uses and compared with the eager model on a few inputs (images of
``--images``, else seeded random ones): max |p_export - p_eager| beyond ``--atol`` is an error. Beside the file
goes its teacher card ``FILE.card.yaml`` (kd/card.py: the format third-party model files use, with the parity
in ``notes``), and the file is read back once more through that card (``FILE?card=FILE.card.yaml``), which must
give the same maps: a tool that only reads cards runs the export right.

``--int8`` (ONNX only) writes an ONNX Runtime static-quantised file instead (:mod:`cluster.quantize`:
per-channel int8 weights, uint8 activations calibrated on ``--calibration-count`` images of ``--calibration``,
a folder or an ``s3://`` prefix, preprocessed as the model expects; ``--quant-format qdq|qoperator``). Its
parity is the accuracy it keeps: the MAE of fp32 eager and of the INT8 file on ``--eval-set`` (``images/`` +
``masks/``, default the repository's ``sample-data/ecssd``); a change beyond 0.005 is refused (exit code 1,
no file left) unless ``--force``. The card's ``quantization`` section records the calibration source and
count and the measured MAE change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cluster.export import export_card, export_teacher
from cluster.teachers import build_teacher, parse_teacher_spec

FORMAT_OF_SUFFIX = {".onnx": "onnx", ".pt2": "pt2"}
DEFAULT_EVAL_SET = Path(__file__).resolve().parents[1] / "sample-data" / "ecssd"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MODEL:WEIGHTS, e.g. scfnet_m3:weights/scfnet_m3_kd.pt")
    p.add_argument("--output", required=True, type=Path, help="output file (.onnx or .pt2)")
    p.add_argument("--format", choices=sorted(set(FORMAT_OF_SUFFIX.values())), default=None,
                   help="default: from the output suffix")
    p.add_argument("--size", type=int, default=None, help="working size S (default: the weights')")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed probability difference")
    p.add_argument("--onnx-exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.export-based (default) or the older, faster tracer-based ONNX exporter "
                        "(both write ONNX)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of images for the parity check (default: seeded random images)")
    q = p.add_argument_group("INT8 (ONNX Runtime static quantisation)")
    q.add_argument("--int8", action="store_true", help="write an INT8 ONNX file (needs --calibration)")
    q.add_argument("--calibration", default=None,
                   help="folder or s3:// prefix of calibration images (a labelled set's images/ are used)")
    q.add_argument("--calibration-count", type=int, default=64, help="calibration images (default 64)")
    q.add_argument("--quant-format", choices=["qdq", "qoperator"], default="qdq",
                   help="QDQ (default: the faster layout measured here, benchmarks/RESULTS.md) or QOperator")
    q.add_argument("--eval-set", type=Path, default=DEFAULT_EVAL_SET,
                   help="labelled set (images/, masks/) the MAE change is measured on (default sample-data/ecssd)")
    q.add_argument("--max-mae-change", type=float, default=None, help="default 0.005")
    q.add_argument("--force", action="store_true", help="keep the INT8 file even if the MAE change is too large")


def parity_inputs(size: int, images: Path | None, n: int = 4) -> np.ndarray:
    if images is not None:
        from kd.imageio import decode_image, resize
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        if not files:
            raise FileNotFoundError(f"{images}: no images for the parity check")
        return np.stack([resize(decode_image(f.read_bytes()), (size, size)) for f in files])
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def format_of(output: Path, fmt: str | None) -> str:
    """The export format asked for: ``--format``, else the output's suffix; TorchScript is refused."""
    suffix = output.suffix.lower()
    if suffix in (".ts", ".torchscript") or fmt == "torchscript":
        raise ValueError(f"--output {output}: sodkd no longer writes TorchScript (deprecated in torch); export to "
                         ".onnx or .pt2 (existing .ts files still load as teachers)")
    fmt = fmt or FORMAT_OF_SUFFIX.get(suffix)
    if fmt is None:
        raise ValueError(f"--output {output}: expected a .onnx or .pt2 file (or --format)")
    return fmt


def image_model(model_spec: str):
    """The image model of ``MODEL:WEIGHTS`` (what ``sodkd export`` exports); a clear error for an exported
    file, weights of another model, or a video model."""
    from models import load_weights
    spec = parse_teacher_spec(model_spec)
    if spec.kind != "registered":
        raise ValueError(f"--model {model_spec}: give MODEL:WEIGHTS (an exported file is already exported)")
    model = load_weights(spec.path)
    if spec.model is not None and getattr(model, "name", spec.model) != spec.model:
        raise ValueError(f"--model {model_spec}: the weights file holds {model.name}, not {spec.model}")
    if hasattr(model, "streamer"):
        raise ValueError(f"--model {model_spec}: {model.name} is a video model (it streams state between frames); "
                         "export an image model")
    return model


def export_with_parity(model_spec: str, output: Path, fmt: str, size: int | None = None, atol: float = 1e-4,
                       images: Path | None = None, onnx_exporter: str = "dynamo") -> dict:
    """Export, check parity against eager, write and read back the card; returns the report (a dict)."""
    from kd.card import card_beside

    fmt = format_of(output, fmt)
    model = image_model(model_spec)
    meta = export_teacher(model.eval(), output, fmt, input_size=size, onnx_exporter=onnx_exporter)
    s = meta["input_size"]
    eager = build_teacher(model_spec, device="cpu", input_size=s)
    exported = build_teacher(str(output), device="cpu")
    x = parity_inputs(s, images)
    with torch.inference_mode():
        p_eager, p_export = eager.predict(x), exported.predict(x)
    diff = float(np.abs(p_eager - p_export).max())
    if diff > atol:
        raise ValueError(f"{output}: exported {fmt} differs from eager by {diff:.2e} > atol {atol:.0e}")
    parity = {"max_abs_diff": diff, "inputs": f"{len(x)} {'images of ' + str(images) if images else 'random images'}"
                                             f" at {s} px"}
    card_path = Path(card_beside(str(output)))
    card = export_card(meta, fmt, parity)
    card_path.write_text(f"# Teacher card of {output.name}, written by sodkd export (kd/card.py).\n" + card.to_yaml())
    carded = build_teacher(f"{output}?card={card_path}", device="cpu")
    if images is None:     # a trained model may rightly see no object in noise: the card's check wants images
        carded._checked = True
    via_card = carded.predict(x)
    card_diff = float(np.abs(via_card - p_export).max())
    if card_diff > atol:
        raise ValueError(f"{card_path}: the file run through its card differs from its metadata by {card_diff:.2e}")
    return {"output": str(output), "format": fmt, "input_size": s, "dynamic_hw": meta["dynamic_hw"],
            "max_abs_diff": diff, "card": str(card_path), "model": meta["model"], "bytes": output.stat().st_size}


def export_int8(model_spec: str, output: Path, calibration: str, count: int = 64, size: int | None = None,
                eval_set: Path | str = DEFAULT_EVAL_SET, quant_format: str = "qdq", force: bool = False,
                max_change: float | None = None, onnx_exporter: str = "dynamo", eval_limit: int | None = None,
                s3=None) -> dict:
    """fp32 ONNX export (kept only as a temporary file) -> static INT8 (:mod:`cluster.quantize`) -> MAE change
    against fp32 eager on ``eval_set`` -> card. Raises :class:`cluster.quantize.QuantizationRejected` (and
    removes the file) when ``|change| > max_change`` and not ``force``; returns the report."""
    import tempfile

    from cluster.quantize import MAX_MAE_CHANGE, QuantizationRejected, calibration_inputs, mae_change, quantize_onnx
    from kd.card import card_beside

    if format_of(output, None) != "onnx":
        raise ValueError(f"--int8: the output must be an .onnx file (ONNX Runtime quantisation), got {output}")
    if not calibration:
        raise ValueError("--int8 needs --calibration DIR_OR_URI (images like the ones the model will see)")
    max_change = MAX_MAE_CHANGE if max_change is None else float(max_change)
    model = image_model(model_spec)
    output.parent.mkdir(parents=True, exist_ok=True)
    card_path = Path(card_beside(str(output)))
    with tempfile.TemporaryDirectory(prefix="sodkd-export-", dir=output.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        meta = export_teacher(model.float().eval(), fp32, "onnx", input_size=size, onnx_exporter=onnx_exporter)
        s = meta["input_size"]
        calib = calibration_inputs(calibration, count, s, meta["mean"], meta["std"], s3)
        quantize_onnx(fp32, output, calib, quant_format)
    try:
        eager = build_teacher(model_spec, device="cpu", input_size=s)
        int8 = build_teacher(str(output), device="cpu", threads=1)
        change = mae_change(eager, int8, eval_set, limit=eval_limit)
        refused = abs(change["mae_change"]) > max_change
        if refused and not force:
            raise QuantizationRejected(
                f"{output}: INT8 moves the MAE on {change['eval_set']} ({change['eval_count']} images) from "
                f"{change['mae_fp32']:.4f} (fp32 eager) to {change['mae_int8']:.4f}: change "
                f"{change['mae_change']:+.4f} exceeds {max_change}; the file is not kept (more or other "
                "--calibration images, --quant-format, or --force to keep it anyway)")
    except BaseException:
        output.unlink(missing_ok=True)
        card_path.unlink(missing_ok=True)
        raise
    quant = {"precision": "int8", "format": quant_format, "per_channel": True, "activations": "uint8",
             "weights": "int8", "calibration": calib.source, "calibration_count": len(calib.keys),
             "eval_set": change["eval_set"], "eval_count": change["eval_count"],
             "mae_reference": change["mae_fp32"], "mae": change["mae_int8"], "mae_change": change["mae_change"],
             "forced": bool(refused)}
    int8_meta = {**meta, "precision": "int8"}
    card = export_card(int8_meta, "onnx", {"mae_change": change["mae_change"],
                                           "max_map_diff_255": change["max_map_diff_255"]}, quantization=quant)
    card_path.write_text(f"# Teacher card of {output.name}, written by sodkd export --int8 (kd/card.py).\n"
                         + card.to_yaml())
    build_teacher(f"{output}?card={card_path}", device="cpu")      # the card reads back and loads the file
    return {"output": str(output), "format": "onnx", "precision": "int8", "quant_format": quant_format,
            "input_size": s, "dynamic_hw": meta["dynamic_hw"], "card": str(card_path), "model": meta["model"],
            "calibration": calib.source, "calibration_count": len(calib.keys), "calibration_skipped": calib.skipped,
            **change, "refused_but_forced": bool(refused), "bytes": output.stat().st_size}


def run(args: argparse.Namespace) -> int:
    if args.int8:
        from cluster.quantize import QuantizationRejected
        try:
            report = export_int8(args.model, args.output, args.calibration, args.calibration_count, args.size,
                                 args.eval_set, args.quant_format, args.force, args.max_mae_change,
                                 args.onnx_exporter)
        except QuantizationRejected as e:
            print(f"sodkd export: {e}", file=sys.stderr)
            return 1
        print(json.dumps(report, indent=2))
        flag = " (over the limit, kept by --force)" if report["refused_but_forced"] else ""
        print(f"int8 ok{flag}: MAE {report['mae_fp32']:.4f} (fp32 eager) -> {report['mae_int8']:.4f} "
              f"({report['mae_change']:+.4f}) on {report['eval_count']} images of {report['eval_set']}; "
              f"calibrated on {report['calibration_count']} images of {report['calibration']}; card {report['card']}")
        return 0
    fmt = format_of(args.output, args.format)
    report = export_with_parity(args.model, args.output, fmt, args.size, args.atol, args.images, args.onnx_exporter)
    print(json.dumps(report, indent=2))
    print(f"parity ok: max |eager - {fmt}| = {report['max_abs_diff']:.2e} on {args.images or 'random images'}; "
          f"card {report['card']}")
    return 0
