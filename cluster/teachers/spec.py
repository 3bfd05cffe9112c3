"""What a teacher spec names (``NAME:WEIGHTS``, ``FILE.onnx``, ``FILE.pt2``, ``FILE.ts``, ``models:/...``, each
optionally ``?card=CARD.yaml``) and the sodkd metadata an exported teacher file carries."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from typing import Any, Literal

from cluster import storage
from cluster.storage import S3Config
from kd.config import ConfigError

__all__ = ["TeacherSpec", "TeacherSpecError", "parse_teacher_spec", "is_registry_spec", "resolve_registry_spec",
           "weights_hash", "read_spec_file", "check_export_meta", "METADATA_KEY", "EXPORT_FORMAT",
           "EXPORT_FORMAT_VERSION", "CARD_QUERY", "REGISTRY_PREFIX", "EnsembleConfig"]

METADATA_KEY = "sodkd_teacher"          # TorchScript extra file "<key>.json", ONNX metadata_props key
EXPORT_FORMAT = "sodkd-teacher"
EXPORT_FORMAT_VERSION = 1
TORCHSCRIPT_SUFFIXES = (".ts", ".torchscript")
WEIGHTS_SUFFIXES = (".pt", ".pth")
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
    """``"scfnet_r50:w.pt"`` / ``"w.pt"`` / ``"t.ts"`` / ``"t.onnx"`` / ``"t.pt2"`` -> :class:`TeacherSpec` (no file is
    read). A bare ``w.pt`` is a registered model whose name the weights file's header gives (``model`` None until
    it is loaded); ``MODEL:w.pt`` also takes a bare state dict.

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
    if lower.endswith(WEIGHTS_SUFFIXES):      # a sodkd weights file names its model in its header
        return TeacherSpec("registered", text, None, full)
    raise TeacherSpecError(
        f"teacher spec {text!r}: expected a sodkd weights file (*.pt), MODEL:WEIGHTS (e.g. scfnet_r50:weights.pt), "
        "a TorchScript file "
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


def read_spec_file(uri: str, s3: S3Config | None, spec: str) -> bytes:
    fs, path = storage.get_filesystem(uri, s3)
    info = fs.get_file_info(path)
    if info.type.name != "File":
        raise TeacherSpecError(f"teacher spec {spec!r}: file not found: {uri}")
    return storage.read_bytes(fs, path)


def check_export_meta(meta: Any, spec: TeacherSpec) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise TeacherSpecError(f"teacher spec {spec}: no sodkd teacher metadata (export it with "
                               "cluster.export.export_teacher)")
    if meta.get("format_version", 0) > EXPORT_FORMAT_VERSION:
        raise TeacherSpecError(f"teacher spec {spec}: metadata version {meta['format_version']} is newer than "
                               f"this sodkd understands ({EXPORT_FORMAT_VERSION})")
    for key in ("mean", "std", "input_size"):
        if key not in meta:
            raise TeacherSpecError(f"teacher spec {spec}: metadata lacks {key!r}")
    return meta


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """How an ensemble's members are combined (config section ``ensemble`` of ``sodkd label`` and of a training run's
    online teacher).

    ``combine``: ``mean`` -- the weighted mean of the members' probabilities, ``p = sum_k w_k p_k``; ``logit`` --
    the weighted mean in logit space, ``p = sigmoid(sum_k w_k logit(p_k))`` (each ``p_k`` clipped to
    [1e-4, 1 - 1e-4] first), which keeps a confident member's certainty where a probability mean halves it.
    ``weights``: one per teacher spec, in their order, normalised to sum 1; None = equal weights.

    A *second-round teacher* is a logit ensemble of the teacher and a student distilled from it, weighted towards
    the teacher (``teachers: [TEACHER, STUDENT.pt]``, ``ensemble: {combine: logit, weights: [0.8, 0.2]}``): the
    two err in different places, so the blend can be better than either (benchmarks/RESULTS.md, `co-teacher`;
    the reference students distilled from it gained little, `reference-runs-34-reading`); no mask is used, so a
    student trained on its labels still learns from unlabeled images only.
    """

    combine: Literal["mean", "logit"] = "mean"
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.combine not in ("mean", "logit"):
            raise ConfigError(f"ensemble.combine: expected 'mean' or 'logit', got {self.combine!r}")
        if self.weights is not None:
            w = [float(x) for x in self.weights]
            if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ConfigError(f"ensemble.weights: need finite weights >= 0 with a positive sum, got {list(w)}")
            object.__setattr__(self, "weights", tuple(w))

    @property
    def is_default(self) -> bool:
        return self.combine == "mean" and (self.weights is None or len(set(self.weights)) == 1)

    def check_members(self, n: int) -> None:
        """Raise :class:`ConfigError` unless the weights (if given) match ``n`` teacher specs."""
        if self.weights is not None and len(self.weights) != n:
            raise ConfigError(f"ensemble.weights: {len(self.weights)} weight(s) for {n} teacher spec(s)")
