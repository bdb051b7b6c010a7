"""Device placement without moving the caller's model."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["is_on", "on_device"]


def is_on(model: nn.Module, device: str | torch.device) -> bool:
    """Whether every parameter and buffer of ``model`` lives on ``device`` (``cuda`` = any GPU)."""
    target = torch.device(device)
    for tensor in (*model.parameters(), *model.buffers()):
        same_index = target.index is None or tensor.device.index == target.index
        if tensor.device.type != target.type or not same_index:
            return False
    return True


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` itself when it is on ``device``, else a deep copy moved there."""
    return model if is_on(model, device) else copy.deepcopy(model).to(device)
