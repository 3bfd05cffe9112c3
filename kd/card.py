"""Teacher cards: how to run a saliency model file that sodkd did not write.

A card is a small YAML file, ``FILE.card.yaml`` beside the model file or named explicitly, validated like
every config (unknown key or wrong type -> :class:`kd.config.ConfigError` naming its dotted path)::

    model: csnet-L-x2                  # a name for logs and label shards
    licence: CC BY-NC-SA 4.0           # recorded in model cards of students distilled from it
    source: github.com/ShangHua-Gao/SOD100K
    input:
      name: image                      # input tensor (null = the first)
      size: 224                        # the working size (square resize, aspect not kept)
      free: true                       # other sizes run too (then ``multiple`` must divide them)
      multiple: 1
      layout: NCHW                     # or NHWC
      channels: RGB                    # or BGR: the order the model wants
      scale: "0-1"                     # pixel values before mean/std: "0-1" (x / 255) or "0-255"
      mean: [0.485, 0.456, 0.406]      # in the units of ``scale``, in the model's channel order
      std: [0.229, 0.224, 0.225]
    output:
      index: 0                         # which output (or ``name``)
      name: null
      channel: 0                       # which channel of an N x C x H x W output
      kind: logits                     # logits (saliency = sigmoid) or probabilities
      resize: bilinear                 # how maps go back to the image's size: bilinear or nearest
    quantization:                      # only for a quantised file (sodkd export --int8); else null
      precision: int8
      format: qdq                      # ONNX Runtime layout: qdq or qoperator
      per_channel: true
      calibration: sample-data/ecssd/images   # where the calibration images came from ...
      calibration_count: 64                    # ... and how many
      eval_set: sample-data/ecssd      # the labelled set the MAE change was measured on
      eval_count: 50
      mae_reference: 0.0781            # fp32 eager on it
      mae: 0.0785                      # this file on it
      mae_change: 0.0004               # mae - mae_reference
      forced: false                    # kept although |mae_change| > 0.005 (--force)

The card only describes; :mod:`cluster.teachers` runs the file with it and checks the first batch
(:func:`check_first_batch`), so a card with a wrong output or value scale fails on the first images with a
message saying what looks wrong instead of writing a bucket of useless labels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import yaml

from kd.config import ConfigError, load_config, to_dict

__all__ = ["CardInput", "CardOutput", "CardQuantization", "TeacherCard", "load_card", "card_beside", "check_first_batch", "select_maps",
           "CardCheckError", "CARD_SUFFIX"]

CARD_SUFFIX = ".card.yaml"


@dataclasses.dataclass(frozen=True)
class CardInput:
    """The model's input: tensor, size and the preprocessing of RGB uint8 pixels (see the module doc)."""

    name: str | None = None
    size: int = 224
    free: bool = False
    multiple: int = 1
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR"] = "RGB"
    scale: Literal["0-1", "0-255"] = "0-1"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ConfigError(f"input.size: must be >= 16, got {self.size}")
        if self.multiple < 1:
            raise ConfigError(f"input.multiple: must be >= 1, got {self.multiple}")
        if self.size % self.multiple:
            raise ConfigError(f"input.size: {self.size} is not a multiple of input.multiple={self.multiple}")
        if min(self.std) <= 0:
            raise ConfigError(f"input.std: every value must be > 0, got {list(self.std)}")
        top = 1.0 if self.scale == "0-1" else 255.0
        if any(not 0 <= m <= top for m in self.mean):
            raise ConfigError(f"input.mean: {list(self.mean)} lies outside the value scale {self.scale}")

    def mean_std_255(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std in 0..255 units and RGB order: what ``(x255 - mean) / std`` needs."""
        k = 255.0 if self.scale == "0-1" else 1.0
        mean, std = [m * k for m in self.mean], [s * k for s in self.std]
        if self.channels == "BGR":
            mean, std = mean[::-1], std[::-1]
        return tuple(mean), tuple(std)

    def check_size(self, size: int) -> None:
        if size == self.size:
            return
        if not self.free:
            raise ConfigError(f"input.size: the card fixes the input at {self.size}; {size} was asked for "
                              "(set input.free: true if the model runs at other sizes)")
        if size % self.multiple:
            raise ConfigError(f"input.multiple: {size} is not a multiple of {self.multiple}")


@dataclasses.dataclass(frozen=True)
class CardOutput:
    """Which output holds the saliency map and what its values are."""

    index: int = 0
    name: str | None = None
    channel: int = 0
    kind: Literal["logits", "probabilities"] = "logits"
    resize: Literal["bilinear", "nearest"] = "bilinear"

    def __post_init__(self) -> None:
        if self.index < 0 or self.channel < 0:
            raise ConfigError(f"output.index and output.channel: must be >= 0, got {self.index}, {self.channel}")


@dataclasses.dataclass(frozen=True)
class CardQuantization:
    """How a quantised file was made and what it costs in accuracy (``sodkd export --int8``)."""

    precision: Literal["int8"] = "int8"
    format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    activations: Literal["uint8", "int8"] = "uint8"
    weights: Literal["int8", "uint8"] = "int8"
    calibration: str = ""
    calibration_count: int = 0
    eval_set: str | None = None
    eval_count: int = 0
    mae_reference: float | None = None
    mae: float | None = None
    mae_change: float | None = None
    forced: bool = False

    def __post_init__(self) -> None:
        if self.calibration_count < 1:
            raise ConfigError(f"quantization.calibration_count: must be >= 1, got {self.calibration_count}")


@dataclasses.dataclass(frozen=True)
class TeacherCard:
    """A teacher card (module docstring)."""

    model: str = "external"
    licence: str | None = None
    source: str | None = None
    notes: str | None = None
    check: bool = True            # check the first batch (check_first_batch); false for a model known to saturate
    input: CardInput = dataclasses.field(default_factory=CardInput)
    output: CardOutput = dataclasses.field(default_factory=CardOutput)
    quantization: CardQuantization | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_card(source: str | Path | Mapping[str, Any] | bytes, where: str = "card") -> TeacherCard:
    """A card from a YAML path, YAML bytes or a mapping; errors name ``where`` and the dotted key."""
    if isinstance(source, bytes):
        try:
            source = yaml.safe_load(source.decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{where}: not a YAML card ({e})") from e
        if not isinstance(source, Mapping):
            raise ConfigError(f"{where}: top level must be a mapping")
    try:
        return load_config(TeacherCard, source)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def card_beside(path: str) -> str:
    """The card a model file has by convention: ``FILE.card.yaml``."""
    return path + CARD_SUFFIX


def select_maps(outputs: list[np.ndarray], card: TeacherCard) -> np.ndarray:
    """The card's output and channel as probabilities (N, h, w) float32, without checks (every batch after
    the first)."""
    o = card.output
    y = np.asarray(outputs[o.index])
    m = (y[:, None] if y.ndim == 3 else y)[:, o.channel].astype(np.float32)
    return 1.0 / (1.0 + np.exp(-m)) if o.kind == "logits" else np.clip(m, 0.0, 1.0)


class CardCheckError(ValueError):
    """The first batch through a carded teacher does not look like saliency maps; says what looks wrong."""


def check_first_batch(outputs: list[np.ndarray], card: TeacherCard, n: int, hw: tuple[int, int],
                      who: str) -> np.ndarray:
    """Check a model's raw outputs on its first batch against its card; return the selected maps (N, h, w).

    Catches: a missing output index, an output that is not ``N x C x h x w`` (or ``N x h x w``), a channel
    that does not exist, non-finite values, probabilities outside [0, 1] (the output is logits), logits that
    all lie in [0, 1] (the output is already probabilities), and maps that are all one value or saturated
    (more than 90% of pixels below 1e-4 or above 1 - 1e-4: measured on CSNet-L-x2, a wrong value scale
    saturates 96% of them, the right one none) -- wrong value scale, mean/std or output.
    """
    o = card.output
    if not card.check:
        return select_maps(outputs, card)
    hint = f"{who}: the card's output section (index {o.index}, channel {o.channel}, kind {o.kind})"
    if o.index >= len(outputs):
        raise CardCheckError(f"{hint}: the model has {len(outputs)} output(s); output.index {o.index} does not exist")
    y = np.asarray(outputs[o.index])
    if y.ndim == 3:
        y = y[:, None]
    if y.ndim != 4 or y.shape[0] != n:
        raise CardCheckError(f"{hint}: output shape {tuple(y.shape)} is not N x C x H x W for a batch of {n}: "
                             "is output.index the saliency map?")
    if o.channel >= y.shape[1]:
        raise CardCheckError(f"{hint}: output has {y.shape[1]} channel(s); output.channel {o.channel} does not exist")
    if y.shape[1] > 4 or min(y.shape[2:]) < max(2, min(hw) // 16):
        raise CardCheckError(f"{hint}: output shape {tuple(y.shape)} does not look like a saliency map of a "
                             f"{hw[0]}x{hw[1]} input (a classifier or feature output? check output.index)")
    m = y[:, o.channel].astype(np.float64)
    if not np.isfinite(m).all():
        raise CardCheckError(f"{hint}: the output holds NaN or inf: check input.scale, input.mean and input.std")
    lo, hi = float(m.min()), float(m.max())
    if o.kind == "probabilities" and (lo < -1e-4 or hi > 1 + 1e-4):
        raise CardCheckError(f"{hint}: values lie in [{lo:.3g}, {hi:.3g}], outside [0, 1]: the output looks like "
                             "logits (set output.kind: logits)")
    if o.kind == "logits" and lo >= 0.0 and hi <= 1.0 and m.size > 64:
        raise CardCheckError(f"{hint}: every value lies in [0, 1] ([{lo:.3g}, {hi:.3g}]): the output looks like "
                             "probabilities already (set output.kind: probabilities)")
    p = 1.0 / (1.0 + np.exp(-np.clip(m, -60, 60))) if o.kind == "logits" else m
    spread = p.reshape(n, -1).max(axis=1) - p.reshape(n, -1).min(axis=1)
    if float(spread.max()) < 1e-3:
        raise CardCheckError(f"{who}: every map of the first batch is one value ({float(p.mean()):.3g}): the "
                             "output or the preprocessing is wrong (check output.index, input.scale, mean, std)")
    saturated = float(((p < 1e-4) | (p > 1 - 1e-4)).mean())
    if saturated > 0.9:
        raise CardCheckError(f"{who}: {saturated:.1%} of the first batch's pixels are saturated at 0 or 1: the "
                             "input looks mis-scaled (check input.scale: '0-1' or '0-255', input.mean, input.std)")
    return p.astype(np.float32)
