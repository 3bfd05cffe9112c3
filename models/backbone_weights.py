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
The mapping is built by walking the *target* encoder, module by module, so it follows the encoder's
real structure (which blocks have an expansion conv or a squeeze-excite) rather than a fixed table.
Each conv / BatchNorm / SE module of the encoder is paired with one module of the file; all of its
tensors (``weight``, ``bias`` and, for BatchNorm, ``running_mean``, ``running_var``,
``num_batches_tracked``) are taken from that module.

:class:`~models.mobilenetv3.MobileNetV3Large` (``stem``, ``blocks.0`` .. ``blocks.14``):

=====================================  ==============================  ===============================
sodkd                                  torchvision                     timm (``mobilenetv3_large_100``)
=====================================  ==============================  ===============================
``stem.0`` conv / ``stem.1`` BN        ``features.0.0`` / ``.0.1``     ``conv_stem`` / ``bn1``
``blocks.i`` (i = 0..14)               ``features.{i+1}.block``        ``blocks.{s}.{j}`` (*)
``  .expand.0`` / ``.expand.1``        ``.{k}.0`` / ``.{k}.1`` (**)    ``.conv_pw`` / ``.bn1``
``  .depthwise.0`` / ``.depthwise.1``  ``.{k}.0`` / ``.{k}.1``         ``.conv_dw`` / ``.bn2``
``  .se.fc1`` / ``.se.fc2``            ``.{k}.fc1`` / ``.{k}.fc2``     ``.se.conv_reduce`` / ``.se.conv_expand``
``  .project.0`` / ``.project.1``      ``.{k}.0`` / ``.{k}.1``         ``.conv_pwl`` / ``.bn3``
=====================================  ==============================  ===============================

(*) timm groups the 15 blocks into stages of 1, 2, 3, 4, 2 and 3 blocks, so block ``i`` is
``blocks.{s}.{j}``. timm's first block is a depthwise-separable block without an expansion conv whose
layers are named ``conv_dw`` / ``bn1`` / ``conv_pw`` / ``bn2`` (depthwise, then project).
(**) torchvision numbers the sub-modules of ``block`` in order, skipping absent ones: ``k`` counts
expand (when present), depthwise, SE (when present), project. Ignored: torchvision's
``features.16`` (the 960-channel 1x1 conv) and ``classifier.*``; timm's last stage ``blocks.6``
(the same 1x1 conv), ``conv_head`` and ``classifier``.

:class:`~models.resnet.ResNetEncoder` (torchvision and timm use the same names for plain ResNets):
``stem.0`` / ``stem.1`` <- ``conv1`` / ``bn1``; ``stages.s.b`` <- ``layer{s+1}.b``; inside a block the
n-th conv / BN of ``body`` <- ``conv{n}`` / ``bn{n}``; ``shortcut.0`` / ``shortcut.1`` <-
``downsample.0`` / ``downsample.1``. Ignored: ``fc.*``. (timm's ``resnet*d`` deep-stem variants
have a different stem and are rejected.)

A file in sodkd's own naming (an encoder state dict, or a whole model's with ``backbone.`` keys) is
accepted too (``source="sodkd"``, found by ``"auto"``) and mapped one to one.

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

from .mobilenetv3 import MobileNetV3Large
from .resnet import Bottleneck, ResNetEncoder

__all__ = ["load_backbone_weights", "BackboneLoadReport", "BackboneWeightsError", "ShapeMismatch",
           "SOURCES"]

log = logging.getLogger(__name__)

SOURCES = ("auto", "torchvision", "timm", "sodkd")
PathLike = Union[str, "os.PathLike[str]"]

# timm's MobileNetV3-Large puts its 15 inverted-residual blocks in stages of these sizes.
TIMM_MNV3_LARGE_STAGES = (1, 2, 3, 4, 2, 3)
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
    if family is not None and family != _family(encoder):
        raise BackboneWeightsError(f"{where}: looks like {file_desc}; this encoder is {target_desc}, "
                                   f"so nothing was loaded")
    if not _same_layout(info.layout, encoder_layout(encoder)):
        # Another depth (ResNet-50 into ResNet-18), variant (Small into Large) or width (a stem of
        # another width): some layers might still fit by shape, but the network would not be the same.
        raise BackboneWeightsError(f"{where}: looks like {file_desc}; this encoder is {target_desc} "
                                   f"({_layout_phrase(encoder)}), so nothing was loaded{_width_hint(kind, family)}")

    pairs = _mapping(encoder, source, state)
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
# Encoders and mappings


def find_encoder(model_or_backbone: nn.Module) -> nn.Module:
    """The supported encoder: the module itself or its ``backbone`` attribute."""
    if isinstance(model_or_backbone, (MobileNetV3Large, ResNetEncoder)):
        return model_or_backbone
    backbone = getattr(model_or_backbone, "backbone", None)
    if isinstance(backbone, (MobileNetV3Large, ResNetEncoder)):
        return backbone
    found = type(backbone).__name__ if isinstance(backbone, nn.Module) else "none"
    raise TypeError(f"{type(model_or_backbone).__name__} is not a MobileNetV3Large / ResNetEncoder and has no such "
                    f"`backbone` (found: {found}); cannot load backbone weights into it")


def describe_encoder(encoder: nn.Module) -> str:
    if isinstance(encoder, MobileNetV3Large):
        return f"MobileNetV3Large(width_mult={encoder.width_mult:g})"
    return f"ResNetEncoder(depth={encoder.depth})"


def _family(encoder: nn.Module) -> str:
    return "mobilenetv3" if isinstance(encoder, MobileNetV3Large) else "resnet"


def _mapping(encoder: nn.Module, source: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{encoder key: file key}`` for every encoder tensor that has a counterpart in this naming."""
    if source == "sodkd":
        prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
        return {k: prefix + k for k in encoder.state_dict()}
    if isinstance(encoder, MobileNetV3Large):
        modules = _mnv3_torchvision(encoder) if source == "torchvision" else _mnv3_timm(encoder, state)
    else:
        modules = _resnet(encoder)  # timm's ResNets use torchvision's names
    return _expand(encoder, modules)


def _expand(encoder: nn.Module, modules: dict[str, str]) -> dict[str, str]:
    """Turn a module-level pairing into a tensor-level one: ``a.b.weight`` <- ``modules[a.b] + .weight``."""
    pairs = {}
    for key in encoder.state_dict():
        module, _, leaf = key.rpartition(".")
        if module in modules:
            pairs[key] = f"{modules[module]}.{leaf}"
    return pairs


def _conv_bn(modules: dict[str, str], target: str, conv: str, bn: str) -> None:
    modules[f"{target}.0"] = conv
    modules[f"{target}.1"] = bn


def _mnv3_torchvision(encoder: MobileNetV3Large) -> dict[str, str]:
    modules: dict[str, str] = {}
    _conv_bn(modules, "stem", "features.0.0", "features.0.1")
    for i, block in enumerate(encoder.blocks):
        src, k = f"features.{i + 1}.block", 0
        if not isinstance(block.expand, nn.Identity):
            _conv_bn(modules, f"blocks.{i}.expand", f"{src}.{k}.0", f"{src}.{k}.1")
            k += 1
        _conv_bn(modules, f"blocks.{i}.depthwise", f"{src}.{k}.0", f"{src}.{k}.1")
        k += 1
        if not isinstance(block.se, nn.Identity):
            modules[f"blocks.{i}.se.fc1"] = f"{src}.{k}.fc1"
            modules[f"blocks.{i}.se.fc2"] = f"{src}.{k}.fc2"
            k += 1
        _conv_bn(modules, f"blocks.{i}.project", f"{src}.{k}.0", f"{src}.{k}.1")
    return modules


def _mnv3_timm(encoder: MobileNetV3Large, state: dict[str, torch.Tensor]) -> dict[str, str]:
    positions = [(s, j) for s, n in enumerate(TIMM_MNV3_LARGE_STAGES) for j in range(n)]
    modules: dict[str, str] = {}
    _conv_bn(modules, "stem", "conv_stem", "bn1")
    for i, (block, (s, j)) in enumerate(zip(encoder.blocks, positions)):
        src = f"blocks.{s}.{j}"
        if not isinstance(block.se, nn.Identity):
            modules[f"blocks.{i}.se.fc1"] = f"{src}.se.conv_reduce"
            modules[f"blocks.{i}.se.fc2"] = f"{src}.se.conv_expand"
        if f"{src}.conv_pwl.weight" in state or not isinstance(block.expand, nn.Identity):
            # InvertedResidual: conv_pw (expand) -> conv_dw -> se -> conv_pwl (project)
            if not isinstance(block.expand, nn.Identity):
                _conv_bn(modules, f"blocks.{i}.expand", f"{src}.conv_pw", f"{src}.bn1")
            _conv_bn(modules, f"blocks.{i}.depthwise", f"{src}.conv_dw", f"{src}.bn2")
            _conv_bn(modules, f"blocks.{i}.project", f"{src}.conv_pwl", f"{src}.bn3")
        else:
            # DepthwiseSeparableConv: conv_dw -> se -> conv_pw (project)
            _conv_bn(modules, f"blocks.{i}.depthwise", f"{src}.conv_dw", f"{src}.bn1")
            _conv_bn(modules, f"blocks.{i}.project", f"{src}.conv_pw", f"{src}.bn2")
    return modules


def _resnet(encoder: ResNetEncoder) -> dict[str, str]:
    modules: dict[str, str] = {"stem.0": "conv1", "stem.1": "bn1"}
    for s, stage in enumerate(encoder.stages):
        for b, block in enumerate(stage):
            target, src = f"stages.{s}.{b}", f"layer{s + 1}.{b}"
            convs = [i for i, m in enumerate(block.body) if isinstance(m, nn.Conv2d)]
            norms = [i for i, m in enumerate(block.body) if isinstance(m, nn.BatchNorm2d)]
            for n, index in enumerate(convs, start=1):
                modules[f"{target}.body.{index}"] = f"{src}.conv{n}"
            for n, index in enumerate(norms, start=1):
                modules[f"{target}.body.{index}"] = f"{src}.bn{n}"
            if not isinstance(block.shortcut, nn.Identity):
                _conv_bn(modules, f"{target}.shortcut", f"{src}.downsample.0", f"{src}.downsample.1")
    return modules


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
