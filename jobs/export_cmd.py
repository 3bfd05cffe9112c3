"""``sodkd export --model MODEL:WEIGHTS --output FILE [--format onnx|torchscript]``: export with a parity check.

The exported file is self-describing (preprocessing and model config in its metadata), so it can be handed
to ``sodkd label --teacher FILE`` or ``sodkd predict --model FILE`` as is. After writing, the file is loaded
back through the same loader the labelling job uses and compared with the eager model on real-looking inputs;
a mismatch beyond ``--atol`` is an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cluster.teachers import build_teacher, export_teacher, parse_teacher_spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="MODEL:WEIGHTS, e.g. scfnet_m3:weights/scfnet_m3_kd.pt")
    p.add_argument("--output", required=True, type=Path, help="output file (.onnx, .ts or .torchscript)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default=None,
                   help="default: from the output suffix")
    p.add_argument("--size", type=int, default=None, help="input size S (default: the model's)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed probability difference")
    p.add_argument("--onnx-exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="torch.export-based (default) or the older, faster tracer-based ONNX exporter")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of images for the parity check (default: seeded random images)")


def parity_inputs(size: int, images: Path | None, n: int = 4) -> np.ndarray:
    if images is not None:
        from kd.imageio import decode_image, resize
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        if not files:
            raise FileNotFoundError(f"{images}: no images for the parity check")
        return np.stack([resize(decode_image(f.read_bytes()), (size, size)) for f in files])
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def export_with_parity(model_spec: str, output: Path, fmt: str, size: int | None = None, atol: float = 1e-4,
                       images: Path | None = None, onnx_exporter: str = "dynamo") -> dict:
    spec = parse_teacher_spec(model_spec)
    if spec.kind != "registered":
        raise ValueError(f"--model {model_spec}: give MODEL:WEIGHTS (an exported file is already exported)")
    from models import load_weights
    model = load_weights(spec.path)
    if getattr(model, "name", spec.model) != spec.model:
        raise ValueError(f"--model {model_spec}: the weights file holds {model.name}, not {spec.model}")
    model.eval()
    meta = export_teacher(model, output, fmt, input_size=size, onnx_exporter=onnx_exporter)
    s = meta["input_size"]
    eager = build_teacher(model_spec, device="cpu", input_size=s)
    exported = build_teacher(str(output), device="cpu")
    x = parity_inputs(s, images)
    with torch.inference_mode():
        diff = float(np.abs(eager.predict(x) - exported.predict(x)).max())
    if diff > atol:
        raise ValueError(f"{output}: exported {fmt} differs from eager by {diff:.2e} > atol {atol:.0e}")
    return {"output": str(output), "format": fmt, "input_size": s, "max_abs_diff": diff,
            "model": meta["model"], "bytes": output.stat().st_size}


def run(args: argparse.Namespace) -> int:
    fmt = args.format or ("onnx" if args.output.suffix.lower() == ".onnx" else "torchscript")
    report = export_with_parity(args.model, args.output, fmt, args.size, args.atol, args.images, args.onnx_exporter)
    print(json.dumps(report, indent=2))
    print(f"parity ok: max |eager - {fmt}| = {report['max_abs_diff']:.2e} on {args.images or 'random images'}")
    return 0
