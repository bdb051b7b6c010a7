"""Helpers shared by the filters: input checks, batching over row indices, eval-mode models."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from genq_core.devices import is_on
from genq_core.progress import Canceled

logger = logging.getLogger(__name__)


class FilterCanceled(Canceled):
    """``should_stop()`` returned True while a filter was scoring images."""


def check_images(images: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a non-empty float ``[N, C, H, W]`` tensor."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor, got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point() or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty float [N, C, H, W] tensor, got {images.dtype} "
            f"{tuple(images.shape)}"
        )


def check_batch_size(batch_size: int, minimum: int = 1) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < minimum:
        raise ValueError(f"batch_size must be an integer >= {minimum}, got {batch_size!r}")


def resolve_indices(count: int, indices: torch.Tensor | None) -> torch.Tensor:
    """``indices`` as a CPU long tensor (all ``count`` rows when ``None``), range-checked."""
    if indices is None:
        return torch.arange(count)
    result = torch.as_tensor(indices).to(device="cpu", dtype=torch.long).flatten()
    if result.numel() and (int(result.min()) < 0 or int(result.max()) >= count):
        raise ValueError(f"indices must lie in [0, {count}), got {result.min()}..{result.max()}")
    return result


def index_batches(indices: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive chunks of ``indices`` with at most ``batch_size`` entries each."""
    return list(torch.split(indices, batch_size))


@contextmanager
def evaluating(model: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """``model`` on ``device`` in eval mode for the duration of the block.

    A model already on ``device`` is used as is and every submodule's train/eval flag is restored
    afterwards; a model elsewhere is deep-copied to ``device`` so the caller's model never moves.
    """
    target = torch.device(device)
    if is_on(model, target):
        flags = [(module, module.training) for module in model.modules()]
        try:
            yield model.eval()
        finally:
            for module, training in flags:
                module.training = training
        return
    logger.info("copying the model to %s for filtering", target)
    yield copy.deepcopy(model).to(target).eval()


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 without any)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32
