"""Model size and cost: parameter count and multiply-accumulates (MACs) per image."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, size: int | tuple[int, int] = 352, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one ``size`` x ``size`` image.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` as FLOPs / 2, so every convolution
    (including depthwise and dilated ones), matrix product and attention call counts, whether it comes
    from a module or a functional call. Element-wise ops, normalisation, pooling and interpolation are
    not counted, following the usual convention of papers (KD-SCFNet reports 0.24 GMACs this way).
    The model runs once on zeros in eval mode under ``no_grad``; its mode is restored afterwards.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"count_macs: size must be positive, got {size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, in_channels, h, w, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
