"""Spec -> teacher: :func:`load_teacher` reads the file a spec names (local, ``s3://`` or the MLflow registry) and
runs it in its form; :func:`build_teacher` makes an ensemble of several and adds flip TTA."""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cluster import storage
from cluster.storage import S3Config
from cluster.teachers.spec import (CARD_QUERY, METADATA_KEY, EnsembleConfig, TeacherSpec, TeacherSpecError,
                                   check_export_meta, parse_teacher_spec, read_spec_file, resolve_registry_spec,
                                   weights_hash)
from cluster.teachers.teacher import (CardTeacher, EagerTeacher, Ensemble, ExportTeacher, HFlipTTA, OnnxTeacher,
                                      Teacher, TorchScriptTeacher)

__all__ = ["load_teacher", "build_teacher", "jit_load"]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this worker")
    return torch.device(device)


def _use_half(device: torch.device, precision: str) -> bool:
    if precision not in ("auto", "fp32", "fp16"):
        raise ValueError(f"precision: expected auto, fp32 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (CPU half-precision convolutions are slow or missing)")
    return device.type == "cuda" and precision != "fp32"


def _load_registered(spec: TeacherSpec, data: bytes, device: torch.device, half: bool,
                     input_size: int | None) -> EagerTeacher:
    from models import WeightsFormatError, create_model, load_state, load_weights
    try:
        try:
            model = load_weights(io.BytesIO(data))
        except WeightsFormatError as e:
            if "no sodkd metadata header" not in str(e):
                raise
            if spec.model is None:
                raise WeightsFormatError(f"{e}; for a bare state dict give MODEL:{spec.path}") from e
            model = load_state(create_model(spec.model), io.BytesIO(data))  # a bare state dict
    except (WeightsFormatError, RuntimeError, ValueError) as e:
        raise TeacherSpecError(f"teacher spec {spec}: {e}") from e
    if spec.model is not None and model.name != spec.model:
        raise TeacherSpecError(f"teacher spec {spec}: the weights file holds {model.name!r}, not {spec.model!r}")
    return EagerTeacher(model, model.name, weights_hash(data), device, half, input_size)


def _find_card(spec: TeacherSpec, s3: S3Config | None):
    """The spec's card (explicit, else ``FILE.card.yaml`` beside the file) as (card, uri), or (None, None)."""
    from kd.card import card_beside, load_card
    from kd.config import ConfigError
    uri = spec.card or card_beside(spec.path)
    fs, path = storage.get_filesystem(uri, s3)
    if fs.get_file_info(path).type.name != "File":
        if spec.card:
            raise TeacherSpecError(f"teacher spec {spec}: card not found: {uri}")
        return None, None
    try:
        return load_card(storage.read_bytes(fs, path), where=uri), uri
    except ConfigError as e:
        raise TeacherSpecError(f"teacher spec {spec}: bad teacher card: {e}") from e


def _no_card(spec: TeacherSpec) -> TeacherSpecError:
    from kd.card import card_beside
    return TeacherSpecError(
        f"teacher spec {spec}: the file carries no sodkd teacher metadata and has no teacher card: write "
        f"{card_beside(spec.path)} (input size, channel order, value scale, mean/std, output index and kind; see "
        f"kd/card.py) or name one with FILE{CARD_QUERY}CARD.yaml")


def _card_id(kind: str, card, spec: TeacherSpec) -> str:
    """``onnx:csnet-L-x2``: the card's model name, refined by the file's stem when one card serves several."""
    stem = Path(spec.path.rstrip("/")).name.rsplit(".", 1)[0]
    name = stem if stem.startswith(card.model) or card.model == "external" else f"{card.model}/{stem}"
    return f"{kind}:{name}"


def _torch_runner(module, device: torch.device):
    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to(device))
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        return [o.float().cpu().numpy() for o in outs]
    return run


def jit_load(data: bytes, device: torch.device, extra: dict[str, Any]) -> Any:
    # TorchScript is deprecated upstream in favour of torch.export, but it is the format asked for here
    # (self-contained, loadable without sodkd): silence the per-load deprecation warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        return torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=extra)


def _load_torchscript(spec: TeacherSpec, data: bytes, device: torch.device, half: bool,
                      input_size: int | None, card=None, card_uri=None) -> Teacher:
    extra = {f"{METADATA_KEY}.json": ""}
    try:
        module = jit_load(data, device, extra)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or others for a foreign file
        raise TeacherSpecError(f"teacher spec {spec}: not a TorchScript file ({type(e).__name__}: {e})") from e
    raw = extra[f"{METADATA_KEY}.json"]
    if (not raw or spec.card) and card is not None:
        return CardTeacher(_torch_runner(module.eval(), device), card, _card_id("torchscript", card, spec),
                           weights_hash(data), input_size, device, card_uri)
    if not raw:
        raise _no_card(spec)
    meta = check_export_meta(json.loads(raw), spec)
    check_export_size(spec, meta, input_size)
    warnings.warn(f"teacher {spec}: TorchScript is deprecated in torch; export the model to ONNX or "
                  "torch.export (.pt2) instead", DeprecationWarning, stacklevel=3)
    return TorchScriptTeacher(module, meta, f"torchscript:{meta.get('model', 'unknown')}", weights_hash(data),
                              device, half)


def _load_export(spec: TeacherSpec, data: bytes, device: torch.device, half: bool, input_size: int | None,
                 card, card_uri) -> Teacher:
    """A torch.export program (``torch.export.save``): sodkd metadata in its extra files, or a card."""
    extra = {f"{METADATA_KEY}.json": ""}
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - a foreign or broken file
        raise TeacherSpecError(f"teacher spec {spec}: not a torch.export program ({type(e).__name__}: {e})") from e
    module = program.module()
    raw = extra[f"{METADATA_KEY}.json"]
    if (not raw or spec.card) and card is not None:
        return CardTeacher(_torch_runner(module, device), card, _card_id("export", card, spec), weights_hash(data),
                           input_size, device, card_uri)
    if not raw:
        raise _no_card(spec)
    meta = check_export_meta(json.loads(raw), spec)
    check_export_size(spec, meta, input_size)
    return ExportTeacher(module, meta, f"export:{meta.get('model', 'unknown')}", weights_hash(data), device)


def _onnx_providers(device: torch.device | str) -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    wants_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if wants_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _load_onnx(spec: TeacherSpec, data: bytes, device: str, input_size: int | None,
               threads: int | None, card=None, card_uri=None) -> Teacher:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=_onnx_providers(device))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise TeacherSpecError(f"teacher spec {spec}: not a loadable ONNX model ({type(e).__name__}: {e})") from e
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if (not raw or spec.card) and card is not None:
        inputs = [i.name for i in session.get_inputs()]
        name = card.input.name or inputs[0]
        if name not in inputs:
            raise TeacherSpecError(f"teacher spec {spec}: card {card_uri}: input.name {name!r} is not an input of "
                                   f"the model ({', '.join(inputs)})")
        outputs = [o.name for o in session.get_outputs()]
        if card.output.name is not None:
            if card.output.name not in outputs:
                raise TeacherSpecError(f"teacher spec {spec}: card {card_uri}: output.name {card.output.name!r} "
                                       f"is not an output of the model ({', '.join(outputs)})")
            card = dataclasses.replace(card, output=dataclasses.replace(
                card.output, index=outputs.index(card.output.name)))

        def run(x: np.ndarray) -> list[np.ndarray]:
            return session.run(None, {name: x})
        t = CardTeacher(run, card, _card_id("onnx", card, spec), weights_hash(data), input_size, torch.device("cpu"),
                        card_uri)
        t.session, t.providers = session, session.get_providers()
        return t
    if not raw:
        raise _no_card(spec)
    meta = check_export_meta(json.loads(raw), spec)
    check_export_size(spec, meta, input_size)
    return OnnxTeacher(session, meta, f"onnx:{meta.get('model', 'unknown')}", weights_hash(data))


def check_export_size(spec: TeacherSpec, meta: dict[str, Any], input_size: int | None) -> None:
    if input_size is not None and int(input_size) != int(meta["input_size"]):
        how = (f"its graph takes other sizes in multiples of {meta.get('size_multiple')}: run it through its card "
               f"(FILE{CARD_QUERY}FILE.card.yaml, parity is checked at the export's size only)"
               if meta.get("dynamic_hw") else "export it again at that size")
        raise TeacherSpecError(f"teacher spec {spec}: exported at input size {meta['input_size']}, "
                               f"not the {input_size} asked for ({how})")


def load_teacher(spec: str | TeacherSpec, s3: S3Config | None = None, device: str = "auto",
                 precision: str = "auto", input_size: int | None = None, threads: int | None = None) -> Teacher:
    """Load one teacher from its spec (local path or ``s3://`` URI).

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        precision: ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32`` or ``fp16`` (CUDA only); torch forms only.
        input_size: override the registered model's working size (exported files are fixed at theirs).
        threads: onnxruntime intra-op threads (torch threads are per process: the caller sets them).
    """
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "mlflow":
        with tempfile.TemporaryDirectory(prefix="sodkd-registry-") as tmp:   # files are read into memory
            local = resolve_registry_spec(spec.text, tmp)
            teacher = load_teacher(local, s3, device, precision, input_size, threads)
        teacher.source = spec.text
        return teacher
    data = read_spec_file(spec.path, s3, str(spec))
    card, card_uri = _find_card(spec, s3) if spec.kind != "registered" else (None, None)
    if spec.kind == "onnx":
        return _load_onnx(spec, data, device, input_size, threads, card, card_uri)
    dev = _resolve_device(device)
    half = _use_half(dev, precision)
    if spec.kind == "torchscript":
        return _load_torchscript(spec, data, dev, half, input_size, card, card_uri)
    if spec.kind == "export":
        return _load_export(spec, data, dev, half, input_size, card, card_uri)
    return _load_registered(spec, data, dev, half, input_size)


def build_teacher(specs: str | Sequence[str], tta: str = "none", s3: S3Config | None = None,
                  device: str = "auto", precision: str = "auto", input_size: int | None = None,
                  threads: int | None = None, convert: Callable[[Teacher], Teacher] | None = None,
                  ensemble: EnsembleConfig | None = None) -> Teacher:
    """One spec -> that teacher; several -> their :class:`Ensemble` (combined as ``ensemble`` says: the mean of
    probabilities by default); ``tta="hflip"`` wraps in :class:`HFlipTTA`. ``convert`` is applied to each network
    as it is loaded (the teacher actor moves weights files onto the predictor's backend with it:
    :func:`cluster.predictor.runtime_teacher`).

    With flip TTA a mean ensemble is wrapped whole (one batched forward of the mirrored images through every
    member; the mean of means is the same either way); a logit ensemble combines each member's flip-averaged map,
    since ``sigmoid`` of a mean of logits does not commute with averaging probabilities."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise TeacherSpecError("no teacher spec given")
    if tta not in ("none", "hflip"):
        raise ValueError(f"tta: expected 'none' or 'hflip', got {tta!r}")
    ensemble = ensemble or EnsembleConfig()
    ensemble.check_members(len(specs))
    members = [load_teacher(s, s3, device, precision, input_size, threads) for s in specs]
    if convert is not None:
        members = [convert(m) for m in members]
    if len(members) == 1:
        return HFlipTTA(members[0]) if tta == "hflip" else members[0]
    if ensemble.combine == "logit" and tta == "hflip":
        return Ensemble([HFlipTTA(m) for m in members], ensemble)
    teacher = Ensemble(members, ensemble)
    return HFlipTTA(teacher) if tta == "hflip" else teacher
