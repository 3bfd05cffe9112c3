"""Teachers for offline labelling: what a teacher spec names, how it is loaded, how it predicts.

A *teacher spec* is one string, the form the CLI and configs use:

- ``NAME:WEIGHTS`` -- a model of the registry (``models.create_model``) with a weights file written by
  ``models.save_weights`` (or a bare state dict), e.g. ``scfnet_r50:/ckpt/teacher.pt`` or
  ``scfnet_r50:s3://bucket/teachers/r50.pt``;
- ``FILE.onnx`` -- an ONNX model written by :func:`export_teacher`, run by onnxruntime (CUDA provider when
  one is available and asked for, else CPU);
- ``FILE.pt2`` -- a torch.export program written by :func:`export_teacher` (``torch.export.load``);
- ``FILE.ts`` / ``FILE.torchscript`` -- a TorchScript module that older sodkd releases wrote (still read, with a
  DeprecationWarning; sodkd no longer writes TorchScript);
- any of these file kinds written by someone else, run as its teacher card says (``FILE.card.yaml``, kd/card.py).
  ``sodkd export`` writes such a card beside every file it exports;
- ``models:/NAME/VERSION`` (or ``models:/NAME/latest``, ``models:/NAME@ALIAS``) -- a model of the MLflow
  registry that training logged (the ONNX flavour: an exported file and its card, no pickle): downloaded
  through MLflow's artifact download (:mod:`cluster.registry`; tracking URI: ``MLFLOW_TRACKING_URI`` or
  the process's ``mlflow.set_tracking_uri``) and loaded as that file.

Every teacher declares its preprocessing: RGB mean and std in 0..255 units and the square input size. A
registered model carries them as attributes; an exported file carries them as JSON metadata (ONNX
``metadata_props``, ``.pt2`` / TorchScript extra files) next to the graph, so labelling never guesses them. Exported
graphs take the *normalised* image ``(x - mean) / std`` (N, 3, S, S) and return probabilities (N, 1, S, S),
the sigmoid of the finest side output -- the same quantity ``SODModel.predict`` returns, so the three forms
of one set of weights give the same labels (tested).

:class:`Teacher` is the common interface: ``predict(uint8 N x S x S x 3) -> float32 N x S x S`` probabilities.
:class:`Ensemble` averages the probabilities of several teachers and :class:`HFlipTTA` averages a teacher
with its prediction on the mirrored image (flipped back) -- both beyond the paper, both cheap gains in label
quality. On CUDA the torch forms run in half precision unless ``precision="fp32"``.

The maps such a mean is taken over are the teacher's *views*: ``views(x)`` returns them (a list of (N, H, W)
maps whose mean is ``probs(x)``; one view for a single network, the members' views concatenated for an
ensemble, the views of ``x`` then the flipped-back views of ``flip(x)`` for hflip TTA), and
``probs_views(x)`` returns both from the same forward pass. The labelling job measures how far the views
disagree per image (``cluster.labelling``).

Every teacher also has an ``id`` (which model, which form) and a ``weights_hash`` (sha256 of the file it runs,
16 hex chars) that the label shards record, so a label can always be traced to the weights that made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster import storage
from cluster.storage import S3Config

__all__ = [
    "TeacherSpec", "TeacherSpecError", "parse_teacher_spec", "Teacher", "EagerTeacher", "TorchScriptTeacher",
    "ExportTeacher", "OnnxTeacher", "CardTeacher", "Ensemble", "HFlipTTA", "load_teacher", "build_teacher",
    "export_teacher", "export_card", "read_export_metadata", "EXPORT_FORMATS", "weights_hash", "METADATA_KEY",
    "REGISTRY_PREFIX", "is_registry_spec", "resolve_registry_spec",
]

METADATA_KEY = "sodkd_teacher"          # TorchScript extra file "<key>.json", ONNX metadata_props key
EXPORT_FORMAT = "sodkd-teacher"
EXPORT_FORMAT_VERSION = 1
TORCHSCRIPT_SUFFIXES = (".ts", ".torchscript")
ONNX_SUFFIXES = (".onnx",)
EXPORT_SUFFIXES = (".pt2",)
CARD_QUERY = "?card="
_NAME_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(.+)$")
_URI_SCHEMES = ("s3", "file")
REGISTRY_PREFIX = "models:/"

Kind = Literal["registered", "torchscript", "onnx", "export", "mlflow"]


class TeacherSpecError(ValueError):
    """A teacher spec is malformed or names something that cannot be loaded; the message quotes it."""


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher spec: ``kind``, the file's URI and, for registered models, the model name."""

    kind: Kind
    path: str
    model: str | None = None
    text: str = ""
    card: str | None = None     # a teacher card given explicitly (``FILE?card=CARD.yaml``)

    def __str__(self) -> str:
        return self.text or (f"{self.model}:{self.path}" if self.model else self.path)


def parse_teacher_spec(spec: str) -> TeacherSpec:
    """``"scfnet_r50:w.pt"`` / ``"t.ts"`` / ``"t.onnx"`` / ``"t.pt2"`` -> :class:`TeacherSpec` (no file is read).

    A model file may name its teacher card: ``"t.onnx?card=t-card.yaml"`` (else ``t.onnx.card.yaml`` is
    looked for beside it when the file carries no sodkd metadata)."""
    if not isinstance(spec, str) or not spec.strip():
        raise TeacherSpecError(f"teacher spec {spec!r}: empty")
    text = spec.strip()
    card = None
    if CARD_QUERY in text:
        text, card = text.split(CARD_QUERY, 1)
        if not card:
            raise TeacherSpecError(f"teacher spec {spec!r}: empty card path after {CARD_QUERY!r}")
        if not text.lower().endswith(TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES + EXPORT_SUFFIXES):
            raise TeacherSpecError(f"teacher spec {spec!r}: a card describes a model file (*.onnx, *.ts, *.pt2)")
    if is_registry_spec(text):
        if len(text) <= len(REGISTRY_PREFIX) or text[len(REGISTRY_PREFIX):].startswith("/"):
            raise TeacherSpecError(f"teacher spec {spec!r}: expected models:/NAME/VERSION, models:/NAME/latest "
                                   "or models:/NAME@ALIAS")
        return TeacherSpec("mlflow", text, None, spec.strip(), card)
    lower = text.lower()
    m = _NAME_RE.match(text)
    named = m is not None and m.group(1).lower() not in _URI_SCHEMES
    if named:
        name, path = m.group(1), m.group(2)
        if path.lower().endswith(TORCHSCRIPT_SUFFIXES + ONNX_SUFFIXES):
            raise TeacherSpecError(f"teacher spec {text!r}: TorchScript and ONNX files carry their own model; "
                                   f"give the file alone ({path!r})")
        from models import list_models
        if name not in list_models():
            raise TeacherSpecError(f"teacher spec {text!r}: unknown model {name!r}; registered models: "
                                   f"{', '.join(list_models())}")
        return TeacherSpec("registered", path, name, text)
    full = spec.strip()
    if lower.endswith(TORCHSCRIPT_SUFFIXES):
        return TeacherSpec("torchscript", text, None, full, card)
    if lower.endswith(ONNX_SUFFIXES):
        return TeacherSpec("onnx", text, None, full, card)
    if lower.endswith(EXPORT_SUFFIXES):
        return TeacherSpec("export", text, None, full, card)
    raise TeacherSpecError(
        f"teacher spec {text!r}: expected MODEL:WEIGHTS (e.g. scfnet_r50:weights.pt), a TorchScript file "
        f"(*{', *'.join(TORCHSCRIPT_SUFFIXES)}), an ONNX file (*.onnx) or a torch.export program (*.pt2)")


def is_registry_spec(spec: str) -> bool:
    """``models:/...``: a model of the MLflow registry."""
    return isinstance(spec, str) and spec.strip().startswith(REGISTRY_PREFIX)


def resolve_registry_spec(spec: str, dst: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """``models:/...`` -> the spec of the local model file it holds (:func:`cluster.registry.resolve`)."""
    from cluster.registry import resolve
    return resolve(spec, dst, tracking_uri)


def weights_hash(data: bytes) -> str:
    """sha256 of a weights/model file's bytes, 16 hex chars: what label shards record."""
    return hashlib.sha256(data).hexdigest()[:16]


def _read_file(uri: str, s3: S3Config | None, spec: str) -> bytes:
    fs, path = storage.get_filesystem(uri, s3)
    info = fs.get_file_info(path)
    if info.type.name != "File":
        raise TeacherSpecError(f"teacher spec {spec!r}: file not found: {uri}")
    return storage.read_bytes(fs, path)


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


class Teacher:
    """A frozen saliency teacher: uint8 images in, probabilities out.

    Attributes:
        id: which teacher (``scfnet_r50``, ``torchscript:scfnet_r50``, ``ensemble(a,b)``).
        weights_hash: sha256 (16 hex) of the file(s) it runs.
        input_size: the square size S its images must have.
        mean, std: RGB statistics in 0..255 units (its preprocessing).
        device: where its outputs live.
    """

    id: str
    weights_hash: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float32 (N, 3, H, W) RGB in 0..255 on any device -> float32 (N, H, W) on ``self.device``."""
        raise NotImplementedError

    def probs_views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(probs(x), views(x))`` from one forward pass; ``probs`` is computed exactly as :meth:`probs` does.

        A single network has one view, its probabilities (the same tensor, no copy).
        """
        p = self.probs(x)
        return p, [p]

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (N, H, W) maps on ``self.device`` whose mean is ``probs(x)``: one per ensemble member and flip."""
        return self.probs_views(x)[1]

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) in 0..255 on ``self.device`` (one copy to the device)."""
        if isinstance(images, np.ndarray):
            with warnings.catch_warnings():  # Ray hands out read-only batches; we only read them
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.from_numpy(np.ascontiguousarray(images))
        else:
            t = images
        if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"{self.id}: expected uint8 images (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
        return t.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()

    @torch.inference_mode()
    def predict_tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 probabilities (N, S, S) on ``self.device``."""
        return self.probs(self.to_input(images))

    @torch.inference_mode()
    def predict_views(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """uint8 (N, S, S, 3) -> ``(probabilities, views)`` (:meth:`probs_views`), one forward pass."""
        return self.probs_views(self.to_input(images))

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, S, S, 3) at the teacher's size -> float32 (N, S, S) saliency probabilities in [0, 1]."""
        return self.predict_tensor(images).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "weights_hash": self.weights_hash, "input_size": self.input_size,
                "mean": list(self.mean), "std": list(self.std), "device": str(self.device)}


class _SingleTeacher(Teacher):
    """Shared preprocessing of one network: resize to its size if needed, normalise, run, resize back."""

    def __init__(self, id: str, weights_hash: str, mean: Sequence[float], std: Sequence[float],
                 input_size: int, device: torch.device, half: bool):
        self.id, self.weights_hash, self.input_size = id, weights_hash, int(input_size)
        self.mean = tuple(float(v) for v in mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise TeacherSpecError(f"{id}: bad preprocessing mean={self.mean} std={self.std}")
        self.device, self.half = device, half
        self.out_resize = "bilinear"
        self._mean_t = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._inv_std_t = 1.0 / torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, S, S) -> probabilities (N, 1, S, S)."""
        raise NotImplementedError

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        h, w = x.shape[-2:]
        s = self.input_size
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        xn = (x - self._mean_t) * self._inv_std_t
        p = self._run(xn.half() if self.half else xn).float()
        if (h, w) != (s, s):
            p = (F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False) if self.out_resize == "bilinear"
                 else F.interpolate(p, size=(h, w), mode="nearest"))
        return p[:, 0]


class EagerTeacher(_SingleTeacher):
    """A registered ``SODModel`` in PyTorch eager mode (``model.predict``)."""

    def __init__(self, model: nn.Module, id: str, weights_hash: str, device: torch.device, half: bool,
                 input_size: int | None = None):
        super().__init__(id, weights_hash, model.mean, model.std, input_size or model.input_size, device, half)
        self.model = model.to(device).eval()
        if half:
            self.model.half()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        return self.model.predict(xn)


class TorchScriptTeacher(_SingleTeacher):
    """A TorchScript module from :func:`export_teacher` (normalised image -> probabilities)."""

    def __init__(self, module: torch.jit.ScriptModule, meta: dict[str, Any], id: str, weights_hash: str,
                 device: torch.device, half: bool):
        super().__init__(id, weights_hash, meta["mean"], meta["std"], meta["input_size"], device, half)
        self.meta = meta
        self.module = module.to(device).eval()
        if half:
            self.module.half()

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        return self.module(xn)


class ExportTeacher(_SingleTeacher):
    """A torch.export program from :func:`export_teacher` (normalised image -> probabilities), run in float32.

    ``program.module()`` is a graph module: it has no train/eval mode (the graph was captured in eval mode) and is
    only moved to the device (half precision would need a program exported in it)."""

    def __init__(self, module: nn.Module, meta: dict[str, Any], id: str, weights_hash: str, device: torch.device):
        super().__init__(id, weights_hash, meta["mean"], meta["std"], meta["input_size"], device, False)
        self.meta = meta
        self.module = module.to(device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.meta.get("precision", "fp32")}

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        return self.module(xn)


class OnnxTeacher(_SingleTeacher):
    """An ONNX model from :func:`export_teacher`, run by onnxruntime.

    Its tensors live on the CPU (onnxruntime copies them to the GPU itself when it runs the CUDA provider);
    it runs in the precision the file was exported in (float32).
    """

    def __init__(self, session: Any, meta: dict[str, Any], id: str, weights_hash: str):
        super().__init__(id, weights_hash, meta["mean"], meta["std"], meta["input_size"], torch.device("cpu"), False)
        self.meta = meta
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.providers = session.get_providers()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.meta.get("precision", "fp32"), "providers": self.providers}

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(xn.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out)


class CardTeacher(_SingleTeacher):
    """A model file sodkd did not write (ONNX, TorchScript or torch.export), run as its teacher card says.

    ``runner(x: np.ndarray float32) -> list of np.ndarray`` runs the file on the prepared input (the card's
    layout and channel order); the first batch is checked against the card (:func:`kd.card.check_first_batch`)
    and every batch's map is selected, turned into probabilities and resized to the input size as the card says.
    """

    def __init__(self, runner, card, id: str, weights_hash: str, input_size: int | None, device: torch.device,
                 card_uri: str):
        size = int(input_size or card.input.size)
        try:
            card.input.check_size(size)
        except Exception as e:  # ConfigError: name the card
            raise TeacherSpecError(f"{id}: {card_uri}: {e}") from e
        mean, std = card.input.mean_std_255()
        super().__init__(id, weights_hash, mean, std, size, device, False)
        self.card, self.card_uri, self.runner = card, card_uri, runner
        self.out_resize = card.output.resize
        self._checked = False

    def _run(self, xn: torch.Tensor) -> torch.Tensor:
        from kd.card import check_first_batch, select_maps
        c = self.card
        x = xn.flip(1) if c.input.channels == "BGR" else xn
        if c.input.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        outs = [np.asarray(o) for o in self.runner(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))]
        n, s = xn.shape[0], xn.shape[-1]
        if not self._checked:
            maps = check_first_batch(outs, c, n, (s, s), f"teacher {self.id} (card {self.card_uri})")
            self._checked = True
        else:
            maps = select_maps(outs, c)
        p = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None].to(self.device)
        if p.shape[-2:] != (s, s):
            p = (F.interpolate(p, size=(s, s), mode="bilinear", align_corners=False) if self.out_resize == "bilinear"
                 else F.interpolate(p, size=(s, s), mode="nearest"))
        return p

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "card": self.card_uri, "licence": self.card.licence}


class Ensemble(Teacher):
    """Mean of the members' probabilities: ``p = (1/K) * sum_k p_k``.

    Members may have different input sizes: the ensemble works at the first member's size and each member
    resizes its input and output itself. ``weights_hash`` hashes the members' hashes in order.
    """

    def __init__(self, members: Sequence[Teacher]):
        if len(members) < 2:
            raise ValueError("Ensemble: needs at least two teachers")
        self.members = list(members)
        first = self.members[0]
        self.id = "ensemble(" + ",".join(m.id for m in self.members) + ")"
        self.weights_hash = hashlib.sha256(":".join(m.weights_hash for m in self.members).encode()).hexdigest()[:16]
        self.input_size, self.mean, self.std, self.device = first.input_size, first.mean, first.std, first.device

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for m in self.members:
            p = m.probs(x).to(self.device)
            total = p if total is None else total + p
        return total / len(self.members)

    def probs_views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The mean as :meth:`probs` computes it, and the members' views concatenated (in member order)."""
        total, views = None, []
        for m in self.members:
            p, vs = m.probs_views(x)
            p = p.to(self.device)
            total = p if total is None else total + p
            views.extend(v.to(self.device) for v in vs)
        return total / len(self.members), views

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["members"] = [m.describe() for m in self.members]
        return d


class HFlipTTA(Teacher):
    """Horizontal-flip test-time augmentation: ``p = (t(x) + flip(t(flip(x)))) / 2``, one batched forward.

    The id and hash are the wrapped teacher's; the label shards record the TTA in their own column.
    """

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        for attr in ("id", "weights_hash", "input_size", "mean", "std", "device"):
            setattr(self, attr, getattr(teacher, attr))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        p = self.teacher.probs(torch.cat([x, x.flip(-1)], dim=0))
        return 0.5 * (p[:n] + p[n:].flip(-1))

    def probs_views(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The mean as :meth:`probs` computes it; views: the wrapped teacher's views of ``x``, then its views of
        ``flip(x)`` flipped back (one batched forward over both)."""
        n = x.shape[0]
        p, vs = self.teacher.probs_views(torch.cat([x, x.flip(-1)], dim=0))
        return 0.5 * (p[:n] + p[n:].flip(-1)), [v[:n] for v in vs] + [v[n:].flip(-1) for v in vs]

    def describe(self) -> dict[str, Any]:
        return {**self.teacher.describe(), "tta": "hflip"}


# --- loading ---------------------------------------------------------------------------------------------

def _load_registered(spec: TeacherSpec, data: bytes, device: torch.device, half: bool,
                     input_size: int | None) -> EagerTeacher:
    from models import WeightsFormatError, create_model, load_state, load_weights
    try:
        try:
            model = load_weights(io.BytesIO(data))
        except WeightsFormatError as e:
            if "no sodkd metadata header" not in str(e):
                raise
            model = load_state(create_model(spec.model), io.BytesIO(data))  # a bare state dict
    except (WeightsFormatError, RuntimeError, ValueError) as e:
        raise TeacherSpecError(f"teacher spec {spec}: {e}") from e
    if model.name != spec.model:
        raise TeacherSpecError(f"teacher spec {spec}: the weights file holds {model.name!r}, not {spec.model!r}")
    return EagerTeacher(model, spec.model, weights_hash(data), device, half, input_size)


def _check_meta(meta: Any, spec: TeacherSpec) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise TeacherSpecError(f"teacher spec {spec}: no sodkd teacher metadata (export it with "
                               "cluster.teachers.export_teacher)")
    if meta.get("format_version", 0) > EXPORT_FORMAT_VERSION:
        raise TeacherSpecError(f"teacher spec {spec}: metadata version {meta['format_version']} is newer than "
                               f"this sodkd understands ({EXPORT_FORMAT_VERSION})")
    for key in ("mean", "std", "input_size"):
        if key not in meta:
            raise TeacherSpecError(f"teacher spec {spec}: metadata lacks {key!r}")
    return meta


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


def _jit_load(data: bytes, device: torch.device, extra: dict[str, Any]) -> Any:
    # TorchScript is deprecated upstream in favour of torch.export, but it is the format asked for here
    # (self-contained, loadable without sodkd): silence the per-load deprecation warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        return torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=extra)


def _load_torchscript(spec: TeacherSpec, data: bytes, device: torch.device, half: bool,
                      input_size: int | None, card=None, card_uri=None) -> Teacher:
    extra = {f"{METADATA_KEY}.json": ""}
    try:
        module = _jit_load(data, device, extra)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or others for a foreign file
        raise TeacherSpecError(f"teacher spec {spec}: not a TorchScript file ({type(e).__name__}: {e})") from e
    raw = extra[f"{METADATA_KEY}.json"]
    if (not raw or spec.card) and card is not None:
        return CardTeacher(_torch_runner(module.eval(), device), card, _card_id("torchscript", card, spec),
                           weights_hash(data), input_size, device, card_uri)
    if not raw:
        raise _no_card(spec)
    meta = _check_meta(json.loads(raw), spec)
    _check_size(spec, meta, input_size)
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
    meta = _check_meta(json.loads(raw), spec)
    _check_size(spec, meta, input_size)
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
    meta = _check_meta(json.loads(raw), spec)
    _check_size(spec, meta, input_size)
    return OnnxTeacher(session, meta, f"onnx:{meta.get('model', 'unknown')}", weights_hash(data))


def _check_size(spec: TeacherSpec, meta: dict[str, Any], input_size: int | None) -> None:
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
    data = _read_file(spec.path, s3, str(spec))
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
                  threads: int | None = None) -> Teacher:
    """One spec -> that teacher; several -> their :class:`Ensemble`; ``tta="hflip"`` wraps in :class:`HFlipTTA`."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise TeacherSpecError("no teacher spec given")
    if tta not in ("none", "hflip"):
        raise ValueError(f"tta: expected 'none' or 'hflip', got {tta!r}")
    members = [load_teacher(s, s3, device, precision, input_size, threads) for s in specs]
    teacher = members[0] if len(members) == 1 else Ensemble(members)
    return HFlipTTA(teacher) if tta == "hflip" else teacher


# --- export ----------------------------------------------------------------------------------------------

EXPORT_FORMATS = ("onnx", "pt2")
SIZE_MULTIPLE = 32      # exported graphs take any H, W that are multiples of the encoder's stride


class _ProbsHead(nn.Module):
    """Normalised image (N, 3, S, S) -> probabilities of the finest side output (N, 1, S, S)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x)[0])


def _dynamic_shapes(size: int) -> dict[str, Any]:
    """torch.export dims: free batch; H and W free in multiples of 32 when the working size is one.

    Writing H as ``32 * k`` is what lets torch.export prove the guards of ``upsample_like`` (feature maps at
    strides 4..32 differ in size) for every input instead of failing on a plain free dim."""
    dim = torch.export.Dim
    dims: dict[int, Any] = {0: dim("batch", max=4096)}
    if size % SIZE_MULTIPLE == 0:
        dims[2] = SIZE_MULTIPLE * dim("h32", min=2, max=128)
        dims[3] = SIZE_MULTIPLE * dim("w32", min=2, max=128)
    return {"x": dims}


def export_teacher(model: nn.Module, path: str | os.PathLike, fmt: Literal["onnx", "pt2"],
                   input_size: int | None = None, extra_meta: dict[str, Any] | None = None,
                   onnx_exporter: Literal["dynamo", "torchscript"] = "dynamo") -> dict[str, Any]:
    """Write ``model`` (a ``SODModel``) as a self-describing ONNX or torch.export (``.pt2``) file.

    BatchNorm is folded into the convolutions first (:func:`models.fuse.fold_batchnorm`, on a copy). The
    graph maps the normalised image ``(x - mean) / std``, float32 (N, 3, H, W), to probabilities
    (N, 1, H, W); N is dynamic, and so are H and W in multiples of 32 when ``input_size`` (default
    ``model.input_size``) is one (``meta["dynamic_hw"]``), else they are fixed at it. The metadata (model name
    and config, mean, std, working size, I/O description, ``extra_meta``) is stored as JSON under
    ``sodkd_teacher`` in the ONNX ``metadata_props`` / the ``.pt2`` extra files. The file is written atomically
    (temporary name + rename). Returns the metadata.

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
    dynamic = size % SIZE_MULTIPLE == 0
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
                program = torch.export.export(head, (example,), dynamic_shapes=_dynamic_shapes(size))
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
                          dynamic_shapes=_dynamic_shapes(example.shape[-1]), external_data=False,
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
    data = _read_file(spec.path, s3, path)
    extra = {f"{METADATA_KEY}.json": ""}
    if spec.kind == "torchscript":
        _jit_load(data, torch.device("cpu"), extra)
        raw = extra[f"{METADATA_KEY}.json"]
    elif spec.kind == "export":
        torch.export.load(io.BytesIO(data), extra_files=extra)
        raw = extra[f"{METADATA_KEY}.json"]
    else:
        import onnx
        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        raw = props.get(METADATA_KEY)
    return _check_meta(json.loads(raw) if raw else None, spec)
