"""The contract every sodkd saliency model follows.

A :class:`SODModel` maps a normalised RGB batch (N, 3, H, W) to a list of side-output *logits*, finest
first, each already resized to (H, W); ``predict`` is the sigmoid of the finest one. The preprocessing a
model expects (mean, std, working resolution) is carried by the model itself, so a labelling job, an
evaluator or an exported artefact never has to guess it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["SODModel", "IMAGENET_MEAN_255", "IMAGENET_STD_255"]

# RGB statistics in 0-255 units used by KD-SCFNet (see REFERENCE.md 1.1).
IMAGENET_MEAN_255 = (124.55, 118.90, 102.94)
IMAGENET_STD_255 = (56.77, 55.97, 57.50)


class SODModel(nn.Module):
    """Base class of saliency models.

    Attributes:
        name: the registry name the model was built under (set by ``create_model``).
        config: the constructor keyword arguments, a plain JSON-able dict; ``create_model(name, **config)``
            rebuilds the same architecture (this is what weight files record).
        mean, std: per-channel RGB statistics in 0-255 units used by :meth:`normalize`.
        input_size: the square resolution the model is trained and evaluated at.
        num_outputs: how many side outputs ``forward`` returns.

    Subclasses implement ``forward(x) -> list[Tensor]`` and, when they have a pretrained-style encoder,
    set ``self.backbone`` so :meth:`param_groups` can give it its own learning rate.
    """

    name: str = "unnamed"
    mean: tuple[float, float, float] = IMAGENET_MEAN_255
    std: tuple[float, float, float] = IMAGENET_STD_255
    input_size: int = 352
    num_outputs: int = 4

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Saliency probabilities (N, 1, H, W) in [0, 1]: ``sigmoid`` of the finest side output.

        Does not change train/eval mode or grad mode; wrap in ``torch.inference_mode()`` and call
        ``eval()`` first for inference.
        """
        return torch.sigmoid(self(x)[0])

    def normalize(self, x: torch.Tensor | np.ndarray, value_range: float = 255.0) -> torch.Tensor:
        """``(x - mean) / std`` per RGB channel, as float32, channels first.

        Args:
            x: an image (3, H, W) or batch (N, 3, H, W), tensor or NumPy array. ``uint8`` input is in
                0-255; floating input is taken to span ``[0, value_range]`` (pass ``value_range=1.0`` for
                images already scaled to [0, 1]).
            value_range: the value a white pixel has in floating input; ignored for ``uint8``.
        """
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"normalize: expected a tensor or ndarray, got {type(x).__name__}")
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"normalize: expected shape (3, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float()
        elif x.is_floating_point():
            if value_range <= 0:
                raise ValueError(f"normalize: value_range must be > 0, got {value_range}")
            x = x.float() * (255.0 / value_range)
        else:
            raise TypeError(f"normalize: expected uint8 or floating input, got {x.dtype}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1,
                     weight_decay: float | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the encoder at ``lr * backbone_lr_mult``, everything else at ``lr``.

        KD-SCFNet trains the backbone with a 10x smaller learning rate. Each group carries a ``name``
        ("backbone" / "head") and its ``lr``; ``weight_decay`` is added to both when given. Only
        parameters with ``requires_grad`` are included, so a frozen part drops out.
        """
        backbone = getattr(self, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise AttributeError(f"{type(self).__name__} has no `backbone` module to split parameters on")
        backbone_ids = {id(p) for p in backbone.parameters()}
        groups = [
            {"name": "backbone", "lr": lr * backbone_lr_mult,
             "params": [p for p in backbone.parameters() if p.requires_grad]},
            {"name": "head", "lr": lr,
             "params": [p for p in self.parameters() if id(p) not in backbone_ids and p.requires_grad]},
        ]
        if weight_decay is not None:
            for g in groups:
                g["weight_decay"] = weight_decay
        return [g for g in groups if g["params"]]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, config={self.config}"
