"""Export of any model of the registry (a ``SODModel``: student or teacher) to a self-describing file: ONNX or
torch.export (``.pt2``), BatchNorm folded, the sodkd metadata inside and a teacher card beside it, so that
:func:`cluster.teachers.load_teacher` (and any tool that reads cards) runs it without guessing."""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cluster.storage import S3Config
from cluster.teachers.loading import jit_load
from cluster.teachers.spec import (EXPORT_FORMAT, EXPORT_FORMAT_VERSION, METADATA_KEY, TeacherSpecError,
                                   check_export_meta, parse_teacher_spec, read_spec_file, resolve_registry_spec)

__all__ = ["EXPORT_FORMATS", "SIZE_MULTIPLE", "export_teacher", "export_card", "read_export_metadata"]

EXPORT_FORMATS = ("onnx", "pt2")
SIZE_MULTIPLE = 32      # exported graphs take any H, W that are multiples of the encoder's stride


class _ProbsHead(nn.Module):
    """Normalised image (N, 3, S, S) -> probabilities of the finest side output (N, 1, S, S)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(x)


def _dynamic_shapes(size: int, dynamic_hw: bool = True) -> dict[str, Any]:
    """torch.export dims: free batch; H and W free in multiples of 32 when ``dynamic_hw`` and the working size is
    one.

    Writing H as ``32 * k`` is what lets torch.export prove the guards of ``upsample_like`` (feature maps at
    strides 4..32 differ in size) for every input instead of failing on a plain free dim."""
    dim = torch.export.Dim
    dims: dict[int, Any] = {0: dim("batch", max=4096)}
    if dynamic_hw and size % SIZE_MULTIPLE == 0:
        dims[2] = SIZE_MULTIPLE * dim("h32", min=2, max=128)
        dims[3] = SIZE_MULTIPLE * dim("w32", min=2, max=128)
    return {"x": dims}


def export_teacher(model: nn.Module, path: str | os.PathLike, fmt: Literal["onnx", "pt2"],
                   input_size: int | None = None, extra_meta: dict[str, Any] | None = None,
                   onnx_exporter: Literal["dynamo", "torchscript"] = "dynamo",
                   fixed_size: bool = False) -> dict[str, Any]:
    """Write ``model`` (a ``SODModel``) as a self-describing ONNX or torch.export (``.pt2``) file.

    BatchNorm is folded into the convolutions first (:func:`models.fuse.fold_batchnorm`, on a copy). The
    graph maps the normalised image ``(x - mean) / std``, float32 (N, 3, H, W), to probabilities
    (N, 1, H, W); N is dynamic, and so are H and W in multiples of 32 when ``input_size`` (default
    ``model.input_size``) is one and ``fixed_size`` is false (``meta["dynamic_hw"]``), else they are fixed at it:
    in ``benchmarks/inference.py`` (row ``onnx-fp32-fixed``) a fixed-size graph was 5-6% *slower* in ONNX
    Runtime than the free-size one on this project's AVX2 CPU (7-12% faster in one earlier probe), so predictors
    keep the free-size export and ``fixed_size`` is there to measure it. The metadata (model name and config,
    mean, std, working size, I/O description, ``extra_meta``) is stored as JSON under ``sodkd_teacher`` in the
    ONNX ``metadata_props`` / the ``.pt2`` extra files. The file is written atomically (temporary name +
    rename). Returns the metadata.

    ``onnx_exporter``: ``dynamo`` (``torch.export``, the supported path) or ``torchscript`` (the older,
    faster tracer-based ONNX exporter; it writes ONNX, not TorchScript). sodkd no longer writes TorchScript
    (deprecated in torch); the ``.ts`` files older releases wrote still load, with a deprecation message.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    for attr in ("mean", "std", "input_size"):
        if not hasattr(model, attr):
            raise TypeError(f"export_teacher: model lacks {attr!r} (expected a models.SODModel)")
    from models.fuse import fold_batchnorm
    size = int(input_size or model.input_size)
    dynamic = size % SIZE_MULTIPLE == 0 and not fixed_size
    meta: dict[str, Any] = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
        "model": getattr(model, "name", type(model).__name__),
        "config": json.loads(json.dumps(getattr(model, "config", {}))),
        "mean": [float(v) for v in model.mean], "std": [float(v) for v in model.std], "input_size": size,
        "dynamic_hw": dynamic, "size_multiple": SIZE_MULTIPLE if dynamic else size, "bn_folded": True,
        "input": "float32 (N, 3, H, W) RGB normalised as (x - mean) / std with x in 0..255",
        "output": "float32 (N, 1, H, W) saliency probabilities (sigmoid of the finest side output)",
        "torch_version": str(torch.__version__),
    }
    meta.update(json.loads(json.dumps(extra_meta or {})))
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    head = _ProbsHead(fold_batchnorm(model).cpu().float()).eval()
    example = torch.zeros(2, 3, size, size)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp" + dest.suffix)
    os.close(fd)
    try:
        with torch.no_grad():
            if fmt == "pt2":
                program = torch.export.export(head, (example,), dynamic_shapes=_dynamic_shapes(size, dynamic))
                torch.export.save(program, tmp, extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
            else:
                _export_onnx(head, example, tmp, meta, onnx_exporter)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return meta


def _export_onnx(head: nn.Module, example: torch.Tensor, tmp: str, meta: dict[str, Any], exporter: str) -> None:
    import onnx
    if exporter == "dynamo":
        torch.onnx.export(head, (example,), tmp, input_names=["image"], output_names=["probs"],
                          dynamic_shapes=_dynamic_shapes(example.shape[-1], meta["dynamic_hw"]),
                          external_data=False,
                          dynamo=True, verbose=False)
    elif exporter == "torchscript":
        axes = {0: "batch", 2: "height", 3: "width"} if meta["dynamic_hw"] else {0: "batch"}
        with warnings.catch_warnings():   # the tracer-based exporter is deprecated; it is the fast option here
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(head, (example,), tmp, input_names=["image"], output_names=["probs"],
                              dynamic_axes={"image": axes, "probs": axes}, dynamo=False)
    else:
        raise ValueError(f"onnx_exporter: expected 'dynamo' or 'torchscript', got {exporter!r}")
    proto = onnx.load(tmp)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, tmp)


def export_card(meta: dict[str, Any], fmt: str, parity: dict[str, Any] | None = None, quantization=None):
    """The teacher card (:mod:`kd.card`) that describes a file :func:`export_teacher` wrote.

    It says what the embedded metadata says, in the format third-party model files use, so any tool that
    reads cards runs the file right: input ``image`` (NCHW, RGB, 0-255 scale, the model's mean/std), free H and
    W in multiples of 32 when the export is dynamic, output 0 = probabilities. ``parity`` (the export's check
    against eager: max |p - p_eager|, on what, and optionally the MAE change) goes into ``notes``;
    ``quantization`` (a :class:`kd.card.CardQuantization`) is the card section of an INT8 file."""
    from kd.card import CardInput, CardOutput, CardQuantization, TeacherCard
    if isinstance(quantization, dict):
        quantization = CardQuantization(**quantization)
    size, dynamic = int(meta["input_size"]), bool(meta.get("dynamic_hw"))
    precision = meta.get("precision", "fp32")
    notes = [f"sodkd export to {fmt} ({precision}) of {meta['model']} (torch {meta.get('torch_version')}, "
             "BatchNorm folded)"]
    if quantization is not None:
        notes.append(f"{quantization.precision} {quantization.format} quantised by ONNX Runtime "
                     f"({quantization.calibration_count} calibration images)")
    if parity:
        notes.append("parity: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in parity.items()))
    return TeacherCard(
        model=str(meta["model"]), source="sodkd export", notes="; ".join(notes),
        input=CardInput(name="image" if fmt == "onnx" else None, size=size, free=dynamic,
                        multiple=SIZE_MULTIPLE if dynamic else 1, layout="NCHW", channels="RGB", scale="0-255",
                        mean=tuple(meta["mean"]), std=tuple(meta["std"])),
        output=CardOutput(index=0, channel=0, kind="probabilities", resize="bilinear"), quantization=quantization)


def read_export_metadata(path: str, s3: S3Config | None = None) -> dict[str, Any]:
    """The ``sodkd_teacher`` metadata of an exported ONNX, ``.pt2`` or (legacy) TorchScript file."""
    spec = parse_teacher_spec(path)
    if spec.kind == "mlflow":
        with tempfile.TemporaryDirectory(prefix="sodkd-registry-") as tmp:
            return read_export_metadata(resolve_registry_spec(spec.text, tmp), s3)
    if spec.kind == "registered":
        raise TeacherSpecError(f"{path}: not an exported teacher file (*.onnx, *.pt2, *.ts)")
    data = read_spec_file(spec.path, s3, path)
    extra = {f"{METADATA_KEY}.json": ""}
    if spec.kind == "torchscript":
        jit_load(data, torch.device("cpu"), extra)
        raw = extra[f"{METADATA_KEY}.json"]
    elif spec.kind == "export":
        torch.export.load(io.BytesIO(data), extra_files=extra)
        raw = extra[f"{METADATA_KEY}.json"]
    else:
        import onnx
        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        raw = props.get(METADATA_KEY)
    return check_export_meta(json.loads(raw) if raw else None, spec)
