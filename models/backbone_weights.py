"""Load ImageNet backbone weights from a torchvision or timm state-dict file into sodkd's own encoders.

    from models import create_model, load_backbone_weights
    student = create_model("scfnet_m3")
    report = load_backbone_weights(student, "mobilenet_v3_large_x0.5.pth")   # or the encoder itself
    print(report.summary())

The file is read with ``torch.load(path, map_location="cpu", weights_only=True)`` only, so it must hold
plain tensors (no pickled code ever runs). It may be a bare state dict, one wrapped in ``{"state_dict":
...}`` or ``{"model": ...}`` (training checkpoints, sodkd weight files) and may carry DataParallel's
``module.`` prefix. Nothing is downloaded: get the file with torchvision or timm on a machine that can
(``torch.save(torchvision.models.mobilenet_v3_large(weights=...).state_dict(), path)``).

Key mapping
-----------
How the keys of a torchvision or timm file pair with the encoder's: :mod:`models.backbone_keys`.

Checks
------
Every mapped tensor must have the encoder's shape. A module with a mismatched tensor is left whole
at its initialisation (its BatchNorm counter too) and the mismatches are listed in the report; if
nothing could be mapped, or the mismatched tensors are at least as many as those that fit (a file of
another architecture or another width), nothing is loaded and :class:`BackboneWeightsError` says
what the file looks like. ``strict=True`` also refuses a file that leaves any encoder tensor at its
initialisation. The encoder is only changed when no error is raised.

Known differences from the reference implementations
----------------------------------------------------
* torchvision builds MobileNetV3 with ``BatchNorm2d(eps=0.001, momentum=0.01)``; the sodkd encoder
  uses PyTorch's defaults (``eps=1e-5``, ``momentum=0.1``), like timm. The weights load exactly,
  but eval-mode features differ slightly from torchvision's (most in channels whose running
  variance is near or below 1e-3); the report carries a note saying so.
* timm scales MobileNetV3 by width differently from torchvision and sodkd (expansion *ratios* on
  rounded widths; the stem stays at 16 channels below x0.75), so only timm's x1.0 model matches
  ``MobileNetV3Large(width_mult=1.0)``; no timm model matches the x0.5 student encoder.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Union

import torch
from torch import nn

from .backbone_keys import describe_encoder, encoder_family, find_encoder, key_mapping
from .mobilenetv3 import MobileNetV3Large
from .resnet import Bottleneck

__all__ = ["load_backbone_weights", "BackboneLoadReport", "BackboneWeightsError", "ShapeMismatch",
           "SOURCES"]

log = logging.getLogger(__name__)

SOURCES = ("auto", "torchvision", "timm", "sodkd")
PathLike = Union[str, "os.PathLike[str]"]

# The last block's output width of MobileNetV3-Large at x1.0; used to guess a file's width multiplier.
_MNV3_LAST_WIDTH = 160
_TORCHVISION_MNV3_BN_EPS = 1e-3
_WRAPPER_KEYS = ("state_dict", "model")
_SHOW = 4  # names shown per list in messages and summaries


class BackboneWeightsError(ValueError):
    """A backbone weight file that cannot be loaded into the given encoder (the message says why)."""


class ShapeMismatch(NamedTuple):
    target: str                    # encoder key
    source: str                    # file key it maps from
    target_shape: tuple[int, ...]
    source_shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.target} {self.target_shape} <- {self.source} {self.source_shape}"


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did.

    Attributes:
        path: the file.
        source: the key naming used: ``"torchvision"``, ``"timm"`` or ``"sodkd"``.
        source_description: what the file looks like, e.g. "a torchvision MobileNetV3-Large state dict
            (width_mult ~0.5: stem 8 ch, last block 80 ch)".
        encoder: the encoder loaded into, e.g. ``"MobileNetV3Large(width_mult=0.5)"``.
        loaded: encoder keys (parameters and buffers) set from the file.
        missing: encoder keys left at their initialisation (no counterpart in the file, or a shape
            mismatch).
        ignored: file keys not used (classifier, last 1x1 conv, anything unmapped or mismatched).
        mismatched: mapped pairs whose shapes differ (left at their initialisation).
        notes: anything else worth knowing (e.g. a BatchNorm eps that differs from the source's).
    """

    path: str
    source: str
    source_description: str
    encoder: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    mismatched: list[ShapeMismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def complete(self) -> bool:
        """True when every encoder tensor came from the file."""
        return not self.missing and not self.mismatched

    def summary(self) -> str:
        """A few human-readable lines (also logged by :func:`load_backbone_weights`)."""
        total = len(self.loaded) + len(self.missing)
        lines = [f"backbone weights {self.path} ({self.source_description}) -> {self.encoder}: "
                 f"loaded {len(self.loaded)}/{total} tensors (parameters and BatchNorm buffers)"]
        if self.missing:
            lines.append(f"  left at initialisation: {len(self.missing)}: {_names(self.missing)}")
        if self.mismatched:
            lines.append(f"  shape mismatches: {len(self.mismatched)}: {_names(map(str, self.mismatched))}")
        lines.append(f"  ignored from the file: {len(self.ignored)}"
                     + (f": {_names(self.ignored)}" if self.ignored else ""))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def load_backbone_weights(model_or_backbone: nn.Module, path: PathLike, *, source: str = "auto",
                          strict: bool = False) -> BackboneLoadReport:
    """Load a torchvision- or timm-format ImageNet state dict into a sodkd encoder, in place.

    Args:
        model_or_backbone: a :class:`MobileNetV3Large` or :class:`ResNetEncoder`, or a model whose
            ``backbone`` attribute is one (``create_model("scfnet_m3")``, the teachers, ...).
        path: a ``torch.save``-d state dict (see the module docstring for the accepted layouts).
        source: ``"auto"`` (detect from the key names), ``"torchvision"``, ``"timm"`` or ``"sodkd"``.
        strict: also refuse a file that leaves any encoder tensor at its initialisation.

    Returns:
        A :class:`BackboneLoadReport`; its summary is logged (as a warning when something was left
        at its initialisation).

    Raises:
        BackboneWeightsError: the file is not a state dict of tensors, looks like another architecture
            or width, nothing maps, or too many shapes differ. The encoder is then left unchanged.
        FileNotFoundError: no such file.
        TypeError: ``model_or_backbone`` has no supported encoder.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    encoder = find_encoder(model_or_backbone)
    target_desc = describe_encoder(encoder)
    state = read_state_dict(path)
    info = detect_format(state)
    kind, family, file_desc = info.naming, info.family, info.description
    where = os.fspath(path)

    if source == "auto":
        if kind is None and family is not None:
            raise BackboneWeightsError(f"{where}: looks like {file_desc}; it cannot be mapped onto {target_desc}, "
                                       f"so nothing was loaded")
        if kind is None:
            raise BackboneWeightsError(f"{where}: {file_desc}; cannot tell its format, so nothing was loaded "
                                       f"into {target_desc} (pass source='torchvision' or 'timm' to force one)")
        source = kind
    if family is not None and family != encoder_family(encoder):
        raise BackboneWeightsError(f"{where}: looks like {file_desc}; this encoder is {target_desc}, "
                                   f"so nothing was loaded")
    if not _same_layout(info.layout, encoder_layout(encoder)):
        # Another depth (ResNet-50 into ResNet-18), variant (Small into Large) or width (a stem of
        # another width): some layers might still fit by shape, but the network would not be the same.
        raise BackboneWeightsError(f"{where}: looks like {file_desc}; this encoder is {target_desc} "
                                   f"({_layout_phrase(encoder)}), so nothing was loaded{_width_hint(kind, family)}")

    pairs = key_mapping(encoder, source, state)
    target_state = encoder.state_dict()
    # Decide module by module: a module with any tensor of another shape is left whole at its
    # initialisation (so a BatchNorm never gets a counter without its statistics).
    by_module: dict[str, list[str]] = {}
    for key in target_state:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    loaded, missing, mismatched, used = [], [], [], set()
    new_state = dict(target_state)
    for keys in by_module.values():
        found = [k for k in keys if pairs.get(k) in state]
        bad = [ShapeMismatch(k, pairs[k], tuple(target_state[k].shape), tuple(state[pairs[k]].shape))
               for k in found if tuple(state[pairs[k]].shape) != tuple(target_state[k].shape)]
        if bad:
            mismatched.extend(bad)
            missing.extend(keys)
            continue
        for key in keys:
            if key in found:
                new_state[key] = state[pairs[key]]
                loaded.append(key)
                used.add(pairs[key])
            else:
                missing.append(key)
    ignored = [k for k in state if k not in used]

    if mismatched and len(mismatched) >= len(loaded):
        raise BackboneWeightsError(
            f"{where}: looks like {file_desc}; this encoder is {target_desc}: {len(mismatched)} mapped tensors "
            f"have another shape and only {len(loaded)} fit (e.g. {_names(map(str, mismatched), 2)}), so nothing "
            f"was loaded{_width_hint(source, family)}")
    if not loaded:
        hint = f" (with source={source!r})" if kind != source else ""
        raise BackboneWeightsError(f"{where}: no tensor maps onto {target_desc}{hint}; the file looks like "
                                   f"{file_desc}; nothing was loaded")
    if strict and missing:
        raise BackboneWeightsError(
            f"{where}: strict load into {target_desc} refused: {len(missing)} tensors would stay at their "
            f"initialisation ({_names(missing)}; {len(mismatched)} shape mismatches), so nothing was loaded")

    encoder.load_state_dict(new_state, strict=True)
    report = BackboneLoadReport(path=where, source=source, source_description=file_desc, encoder=target_desc,
                                loaded=loaded, missing=missing, ignored=ignored, mismatched=mismatched,
                                notes=_notes(encoder, source, family))
    log.log(logging.WARNING if missing else logging.INFO, "%s", report.summary())
    return report


# ---------------------------------------------------------------------------------------------------
# Reading and recognising files


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict in ``path``: unwrapped, ``module.`` stripped, tensors only.

    Loads with ``weights_only=True``; anything else (pickled objects, a non-dict, non-tensor values)
    raises :class:`BackboneWeightsError` naming the file.
    """
    where = os.fspath(path)
    if not Path(where).is_file():
        raise FileNotFoundError(f"backbone weights file not found: {where}")
    try:
        obj = torch.load(where, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, UnicodeDecodeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneWeightsError(f"{where}: not a loadable tensor state dict (torch.load with "
                                   f"weights_only=True failed: {first})") from err
    for _ in range(3):  # {"state_dict": ...}, {"model": ...}, or nested once more
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is not None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise BackboneWeightsError(f"{where}: not a state dict of tensors (it holds {what})")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise BackboneWeightsError(f"{where}: not a state dict of tensors ({len(bad)} of {len(obj)} entries are "
                                   f"not named tensors, e.g. {_names(bad, 3)})")
    while all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


class FileInfo(NamedTuple):
    """What a state dict looks like, from its key names and a few shapes.

    naming: ``"torchvision"``, ``"timm"``, ``"sodkd"`` or None (unrecognised); family: ``"mobilenetv3"``,
    ``"resnet"`` or None; description: a phrase for messages ("a torchvision ResNet-50 state dict");
    layout: a comparable signature (see :func:`encoder_layout`), or None when unknown.
    """

    naming: str | None
    family: str | None
    description: str
    layout: tuple | None


def detect_format(state: dict[str, torch.Tensor]) -> FileInfo:
    """Recognise a torchvision / timm / sodkd MobileNetV3 or ResNet state dict."""
    keys = list(state)
    if any(_TV_BLOCK.match(k) for k in keys):
        return _mnv3_info(state, "torchvision", _TV_BLOCK, "features.0.0.weight",
                          lambda i, j: f"features.{i}.block.{j}.0.weight")
    if any(_TIMM_BLOCK.match(k) for k in keys):
        return _mnv3_info(state, "timm", _TIMM_BLOCK, "conv_stem.weight",
                          lambda s, j: f"blocks.{s}.{j}.conv_pwl.weight")
    if any(_RESNET_BLOCK.match(k) for k in keys):
        if "conv1.0.weight" in state:
            return FileInfo(None, "resnet", "a timm deep-stem ResNet ('resnet*d') state dict, whose stem sodkd "
                            "does not build", None)
        counts, bottleneck = _resnet_file_layout(state, "layer{}.", r"layer\d\.\d+\.conv3\.", start=1)
        return FileInfo("torchvision", "resnet", f"a torchvision/timm {_resnet_name(counts, bottleneck)} state dict",
                        ("resnet", counts, bottleneck))
    prefix = "backbone." if any(k.startswith("backbone.") for k in keys) else ""
    where = " (the backbone of a whole model)" if prefix else ""
    mnv3_block = re.compile(rf"{re.escape(prefix)}blocks\.(\d+)\.(expand|depthwise|se|project)\.")
    resnet_block = re.compile(rf"{re.escape(prefix)}stages\.\d\.\d+\.(body|shortcut)\.")
    if any(mnv3_block.match(k) for k in keys):
        n = len({m.group(1) for k in keys if (m := mnv3_block.match(k))})
        stem = _out_channels(state, f"{prefix}stem.0.weight")
        return FileInfo("sodkd", "mobilenetv3", f"a sodkd MobileNetV3Large state dict{where} ({n} blocks, stem "
                        f"{stem} ch)", ("mobilenetv3", n, stem))
    if any(resnet_block.match(k) for k in keys):
        counts, bottleneck = _resnet_file_layout(state, prefix + "stages.{}.",
                                                 rf"{re.escape(prefix)}stages\.\d\.\d+\.body\.6\.", start=0)
        return FileInfo("sodkd", "resnet", f"a sodkd {_resnet_name(counts, bottleneck)} encoder state dict{where}",
                        ("resnet", counts, bottleneck))
    shown = ", ".join(keys[:3])
    return FileInfo(None, None, f"an unrecognised state dict ({len(state)} tensors; first keys: {shown})", None)


def encoder_layout(encoder: nn.Module) -> tuple:
    """``("mobilenetv3", blocks, stem channels)`` or ``("resnet", blocks per stage, bottleneck?)``."""
    if isinstance(encoder, MobileNetV3Large):
        return ("mobilenetv3", len(encoder.blocks), encoder.stem[0].out_channels)
    counts = tuple(len(stage) for stage in encoder.stages)
    return ("resnet", counts, isinstance(encoder.stages[0][0], Bottleneck))


def _same_layout(file_layout: tuple | None, target_layout: tuple) -> bool:
    """Layouts agree where the file's is known (None: that part could not be read from the file)."""
    if file_layout is None:
        return True
    return all(a is None or a == b for a, b in zip(file_layout, target_layout))


_TV_BLOCK = re.compile(r"features\.(\d+)\.block\.(\d+)\.")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.conv_dw\.")
_RESNET_BLOCK = re.compile(r"layer[1-4]\.\d+\.(conv|bn)\d\.")
_RESNET_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                  ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}


def _out_channels(state: dict[str, torch.Tensor], key: str) -> int | None:
    tensor = state.get(key)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() >= 1 else None


def _mnv3_info(state: dict[str, torch.Tensor], naming: str, pattern: re.Pattern, stem_key: str,
               last_key) -> FileInfo:
    """torchvision: blocks are ``features.i.block.j`` (j = sub-module); timm: ``blocks.s.j`` (j = block)."""
    found = sorted({(int(m.group(1)), int(m.group(2))) for k in state if (m := pattern.match(k))})
    if naming == "torchvision":
        blocks = sorted({i for i, _ in found})
        n = len(blocks)
        last = _out_channels(state, last_key(blocks[-1], max(j for i, j in found if i == blocks[-1])))
    else:
        n = len(found)
        last = _out_channels(state, last_key(*found[-1])) if found else None
    stem = _out_channels(state, stem_key)
    variant = {15: "MobileNetV3-Large", 11: "MobileNetV3-Small"}.get(n, f"MobileNetV3 ({n} blocks)")
    width = f"width_mult ~{last / _MNV3_LAST_WIDTH:.2g}: " if last and n == 15 else ""
    return FileInfo(naming, "mobilenetv3", f"a {naming} {variant} state dict ({width}stem {stem} ch, last block "
                    f"{last} ch)", ("mobilenetv3", n, stem))


def _resnet_file_layout(state: dict[str, torch.Tensor], stage_prefix: str, bottleneck: str,
                        start: int) -> tuple[tuple[int, ...], bool]:
    """Blocks per stage, and whether the blocks have a third conv (bottlenecks)."""
    counts = []
    for stage in range(start, start + 4):
        pattern = re.compile(re.escape(stage_prefix.format(stage)) + r"(\d+)\.")
        counts.append(len({m.group(1) for k in state if (m := pattern.match(k))}))
    third = re.compile(bottleneck)
    return tuple(counts), any(third.match(k) for k in state)


def _resnet_name(counts: tuple[int, ...], bottleneck: bool) -> str:
    depth = _RESNET_DEPTHS.get((counts, bottleneck))
    return f"ResNet-{depth}" if depth else f"ResNet ({'bottleneck' if bottleneck else 'basic'} blocks {list(counts)})"


# ---------------------------------------------------------------------------------------------------
# Messages


def _notes(encoder: nn.Module, source: str, family: str | None) -> list[str]:
    notes = []
    if isinstance(encoder, MobileNetV3Large) and source == "torchvision":
        eps = sorted({m.eps for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)})
        if eps != [_TORCHVISION_MNV3_BN_EPS]:
            shown = ", ".join(f"{e:g}" for e in eps)
            notes.append(f"torchvision's MobileNetV3 uses BatchNorm eps={_TORCHVISION_MNV3_BN_EPS:g} (momentum 0.01); "
                         f"this encoder uses eps={shown}, so its eval-mode features differ slightly from "
                         f"torchvision's for the same weights")
    return notes


def _layout_phrase(encoder: nn.Module) -> str:
    layout = encoder_layout(encoder)
    if layout[0] == "mobilenetv3":
        return f"{layout[1]} blocks, stem {layout[2]} ch"
    return _resnet_name(layout[1], layout[2])


def _width_hint(source: str | None, family: str | None) -> str:
    if source == "timm" and family == "mobilenetv3":
        return (". timm scales MobileNetV3 widths differently from torchvision (expansion ratios, a fixed 16-ch "
                "stem below x0.75): only timm's x1.0 model matches MobileNetV3Large(width_mult=1.0)")
    return ""


def _names(names, limit: int = _SHOW) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
