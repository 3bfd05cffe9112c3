"""Models in the MLflow registry without pickle: log an exported ONNX file, resolve ``models:/`` specs.

Training registers its final model in MLflow's ONNX flavour (:func:`log_onnx_model`): the BatchNorm-folded
ONNX export that :func:`cluster.export.export_teacher` writes (sodkd metadata inside, one self-contained
file) with a tensor signature and its teacher card (``FILE.card.yaml``, kd/card.py) as an extra file. Neither
MLflow nor sodkd unpickles anything to load it (``mlflow.onnx.load_model`` reads the protobuf; sodkd runs the
file through ONNX Runtime).

Wherever sodkd takes a model spec (``sodkd predict --model``, ``sodkd label --teacher``, the
:class:`cluster.predictor.Predictor`, so ``sodkd serve`` too) ``models:/NAME/VERSION``, ``models:/NAME/latest``
and ``models:/NAME@ALIAS`` are accepted: :func:`resolve` downloads the model's artifacts with
``mlflow.artifacts.download_artifacts`` (tracking URI: ``MLFLOW_TRACKING_URI``, else the process's
``mlflow.set_tracking_uri``) and returns the local model file, its card beside it. A registered model that
holds only a pickled ``mlflow.pytorch`` model is refused with a message, never loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cluster.export import export_card
from cluster.teachers import CARD_QUERY, EXPORT_SUFFIXES, ONNX_SUFFIXES, TeacherSpecError

__all__ = ["log_onnx_model", "resolve", "MODEL_FILE_SUFFIXES"]

MODEL_FILE_SUFFIXES = ONNX_SUFFIXES + EXPORT_SUFFIXES


def _parity(model, onnx_path: str, size: int, n: int = 2) -> dict[str, Any]:
    """max |p_onnx - p_eager| on ``n`` seeded random normalised inputs at ``size``."""
    import onnxruntime as ort
    import torch
    x = np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    p_onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.inference_mode():
        p_eager = model.eval().cpu().float().predict(torch.from_numpy(x)).numpy()
    return {"max_abs_diff": float(np.abs(p_onnx - p_eager).max()), "inputs": f"{n} random inputs at {size} px"}


def log_onnx_model(model, onnx_path: str | os.PathLike, meta: dict[str, Any], registered_model_name: str | None,
                   pip_requirements: Sequence[str] | None = None, name: str = "model", atol: float = 1e-3):
    """Log the sodkd ONNX export ``onnx_path`` of ``model`` (metadata ``meta``) in the active MLflow run, in
    the ONNX flavour, with its card as an extra file; register it as ``registered_model_name`` if given.

    The export is checked against eager first (max probability difference <= ``atol`` on random inputs; the
    parity goes into the card's notes). Returns MLflow's ``ModelInfo``."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    onnx_path = str(onnx_path)
    parity = _parity(model, onnx_path, int(meta["input_size"]))
    if parity["max_abs_diff"] > atol:
        raise ValueError(f"{onnx_path}: the ONNX export differs from eager by {parity['max_abs_diff']:.2e} > {atol}")
    card_path = onnx_path + ".card.yaml"
    card = export_card(meta, "onnx", parity)
    Path(card_path).write_text(f"# Teacher card of {Path(onnx_path).name}, logged by sodkd training.\n"
                               + card.to_yaml())
    f32 = np.dtype(np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(f32, (-1, 3, -1, -1), "image")]),
                               outputs=Schema([TensorSpec(f32, (-1, 1, -1, -1), "probs")]))
    return mlflow.onnx.log_model(onnx.load(onnx_path), name=name, registered_model_name=registered_model_name,
                                 signature=signature, save_as_external_data=False, extra_files=[card_path],
                                 pip_requirements=list(pip_requirements) if pip_requirements else None,
                                 await_registration_for=60)


def resolve(spec: str, dst: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """``models:/NAME/VERSION`` (``latest``, ``@alias``) -> the spec of the model file it holds, downloaded into
    ``dst``, its card beside it as ``FILE.card.yaml``; ``?card=CARD`` on the spec is kept."""
    import mlflow

    from kd.card import CARD_SUFFIX
    text, card = spec.strip().split(CARD_QUERY, 1) if CARD_QUERY in spec else (spec.strip(), None)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst),
                                                         tracking_uri=tracking_uri))
    except Exception as e:  # noqa: BLE001 - MlflowException and friends: name the spec
        raise TeacherSpecError(f"model spec {spec!r}: cannot download it from the MLflow registry "
                               f"({type(e).__name__}: {e})") from e
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name.lower().endswith(MODEL_FILE_SUFFIXES))
    if not files:
        pickled = sorted(p.name for p in local.rglob("*") if p.suffix in (".pth", ".pkl", ".pt"))
        raise TeacherSpecError(
            f"model spec {spec!r}: the registered model holds no .onnx or .pt2 file"
            + (f" (only {', '.join(pickled)}: a pickled mlflow.pytorch model, which sodkd does not unpickle; "
               "register an export)" if pickled else ""))
    if len(files) > 1:
        raise TeacherSpecError(f"model spec {spec!r}: the registered model holds several model files "
                               f"({', '.join(p.name for p in files)})")
    model_file = files[0]
    cards = sorted(p for p in local.rglob(f"*{CARD_SUFFIX}") if p.is_file())
    beside = Path(str(model_file) + CARD_SUFFIX)
    if cards and not beside.exists():
        shutil.copyfile(cards[0], beside)
    return f"{model_file}{CARD_QUERY}{card}" if card else str(model_file)
