"""INT8 static quantisation of an exported student (ONNX Runtime), checked on a labelled set.

``sodkd export --int8`` runs :func:`quantize_onnx` on the BatchNorm-folded fp32 ONNX file that
:func:`cluster.export.export_teacher` writes:

1. calibration images (:func:`calibration_inputs`): a local folder or an ``s3://`` prefix, read through
   :mod:`cluster.catalog` (a paired layout's ``images/`` only, never its masks), a bounded number of them
   spread evenly over the sorted keys, each preprocessed exactly as the predictor does it (PIL bilinear
   square resize to the working size S, ``(x - mean) / std`` with the model's statistics in 0..255 units,
   NCHW float32);
2. ``onnxruntime.quantization.quantize_static``: per-channel int8 weights in the reduced 7-bit range
   (``reduce_range``), uint8 activations from MinMax calibration, in one of two layouts -- ``qdq`` (QuantizeLinear/DequantizeLinear pairs around float ops,
   which ORT's graph optimiser fuses into integer kernels when the session is created) or ``qoperator``
   (integer operators such as QLinearConv written directly);
   Why 7-bit weights: on x86 CPUs without VNNI (AVX2 only, or AVX-512 without VNNI) ONNX Runtime's u8 x s8
   kernels add pairs of products in 16 bits, which saturates with full-range weights; an exported file runs on
   whatever CPU it is deployed to, so every file is written safe for all of them. Measured on an AMD EPYC with
   AVX2 only: the KD student at 96 px on 6 ECSSD images moved MAE by +0.0118 with 8-bit weights (refused) and
   stayed within :data:`MAX_MAE_CHANGE` with 7-bit ones (``tests/unit/test_int8.py``);
3. the sodkd metadata is carried over (with an ``int8`` entry), so the file is self-describing and runs
   through the predictor's ``onnx`` backend like the fp32 one.

:func:`mae_change` scores fp32 eager and the quantised file on a labelled set (``images/`` + ``masks/``) with
the test-time protocol of :mod:`cluster.evaluate`; the export refuses a file whose MAE moves by more than
:data:`MAX_MAE_CHANGE`. Which of the two layouts is faster on this CPU is measured in benchmarks/inference.py
(figures in benchmarks/RESULTS.md).

This module never imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from cluster import storage
from cluster.storage import S3Config

__all__ = ["QUANT_FORMATS", "MAX_MAE_CHANGE", "CalibrationSet", "calibration_inputs", "quantize_onnx",
           "mae_change", "QuantizationRejected"]

QUANT_FORMATS = ("qdq", "qoperator")
MAX_MAE_CHANGE = 0.005          # largest |MAE_int8 - MAE_fp32| an INT8 export may have without --force


class QuantizationRejected(ValueError):
    """The INT8 file moves the labelled set's MAE by more than the allowed change."""


@dataclasses.dataclass
class CalibrationSet:
    """Preprocessed calibration inputs (N, 3, S, S) float32 and where they came from."""

    inputs: np.ndarray
    source: str
    keys: list[str]
    skipped: list[str]

    def batches(self) -> Iterator[np.ndarray]:
        for i in range(len(self.inputs)):
            yield self.inputs[i:i + 1]


def calibration_inputs(source: str | os.PathLike, count: int, size: int, mean, std,
                       s3: S3Config | None = None) -> CalibrationSet:
    """``count`` images of ``source`` (folder or ``s3://`` prefix; a paired layout's ``images/``), spread
    evenly over its sorted keys, preprocessed as the model expects. Undecodable images are skipped (listed)."""
    from cluster.catalog import image_folder
    from kd.imageio import ImageDecodeError, decode_image, resize
    if count < 1:
        raise ValueError(f"calibration count: must be >= 1, got {count}")
    uri = str(source)
    fs, root = storage.get_filesystem(uri, s3)
    if storage.is_dir(fs, storage.join(root, "images")) and storage.is_dir(fs, storage.join(root, "masks")):
        uri = storage.to_uri(fs, storage.join(root, "images"))     # a labelled set: its images, not its masks
    catalog = image_folder(uri, s3)
    items = catalog.items
    if not items:
        raise FileNotFoundError(f"{source}: no readable calibration images")
    pick = sorted(set(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int).tolist()))
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    inv = 1.0 / np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    xs, keys, skipped = [], [], []
    for i in pick:
        it = items[i]
        try:
            rgb = decode_image(storage.read_bytes(catalog.fs, it.path, s3))
        except ImageDecodeError:
            skipped.append(it.key)
            continue
        xs.append(resize(rgb, (size, size)).transpose(2, 0, 1)[None].astype(np.float32))
        keys.append(it.key)
    if not xs:
        raise FileNotFoundError(f"{source}: none of the {len(pick)} calibration images could be decoded")
    x = (np.concatenate(xs) - m) * inv
    return CalibrationSet(np.ascontiguousarray(x, np.float32), storage.to_uri(catalog.fs, catalog.root), keys,
                          skipped)


def _reader(calib: CalibrationSet, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = calib.batches()

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x}

        def rewind(self):
            self._it = calib.batches()
    return _Reader()


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, calib: CalibrationSet,
                  fmt: Literal["qdq", "qoperator"] = "qdq", per_channel: bool = True,
                  extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantise the fp32 sodkd ONNX file ``src`` into ``dst`` (written atomically); returns its metadata.

    The sodkd metadata of ``src`` goes into ``dst`` with ``precision: int8`` and an ``int8`` entry (format,
    per-channel, activation/weight types, calibration source and count, ``extra_meta``)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cluster.teachers import METADATA_KEY
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quantisation format: expected one of {', '.join(QUANT_FORMATS)}, got {fmt!r}")
    src, dst = Path(src), Path(dst)
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{src}: not an ONNX file written by sodkd export (no {METADATA_KEY} metadata)")
    meta = json.loads(props[METADATA_KEY])
    if meta.get("precision", "fp32") != "fp32":
        raise ValueError(f"{src}: already {meta['precision']}; quantise the fp32 export")
    input_name = proto.graph.input[0].name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sodkd-int8-", dir=dst.parent) as tmp:
        pre, out = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
        # shape inference + constant folding first (what ORT's docs ask before static quantisation)
        quant_pre_process(str(src), pre, skip_symbolic_shape=True)
        with _quiet_root_logger():      # the quantiser warns on every integer shape tensor it leaves alone
                quantize_static(pre, out, _reader(calib, input_name),
                            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                            per_channel=per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            reduce_range=True)
        q = onnx.load(out)
        meta = {**meta, "precision": "int8", "int8": {
            "format": fmt, "per_channel": per_channel, "activations": "uint8", "weights": "int8",
            "reduce_range": True,
            "calibration": "minmax", "calibration_source": calib.source, "calibration_count": len(calib.keys),
            **json.loads(json.dumps(extra_meta or {}))}}
        del q.metadata_props[:]
        for k, v in props.items():
            entry = q.metadata_props.add()
            entry.key, entry.value = k, (json.dumps(meta) if k == METADATA_KEY else v)
        onnx.save(q, out)
        os.replace(out, dst)
    return meta


def mae_change(fp32_eager, int8, eval_set: str | os.PathLike, limit: int | None = None,
               s3: S3Config | None = None) -> dict[str, Any]:
    """MAE of the fp32 eager teacher and of the INT8 teacher on the labelled set ``eval_set`` (``images/`` +
    ``masks/``, :func:`cluster.evaluate.evaluate`'s protocol) and the largest probability difference."""
    from cluster.catalog import paired_folder
    from cluster.evaluate import evaluate, predict_items
    from kd.metrics import MAE
    catalog = paired_folder(str(eval_set), s3, limit=limit)
    a = evaluate(fp32_eager, catalog, progress_every=0)
    b = evaluate(int8, catalog, progress_every=0)
    worst = 0
    for (_, _, pa), (_, _, pb) in zip(predict_items(fp32_eager, catalog, catalog.items[:8]),
                                      predict_items(int8, catalog, catalog.items[:8])):
        worst = max(worst, int(np.abs(pa.astype(int) - pb.astype(int)).max()))
    return {"eval_set": catalog.uri, "eval_count": len(catalog), "mae_fp32": a.metrics[MAE],
            "mae_int8": b.metrics[MAE], "mae_change": b.metrics[MAE] - a.metrics[MAE],
            "sm_fp32": a.metrics.get("sm"), "sm_int8": b.metrics.get("sm"), "max_map_diff_255": worst}
