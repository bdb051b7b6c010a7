"""Filter 1, energy: how in-distribution the full-precision classifier finds each image.

The free energy of an image under a classifier with logits ``f(x)`` is
``E(x) = -T * logsumexp(f(x) / T)``. Images the classifier recognises confidently have large
logits and so low (very negative) energy; out-of-distribution images have higher energy. The
filter keeps the lowest-energy fraction of each class (see :func:`genq_core.filters.keep_per_class`).

Label agreement is the cheaper, cruder check: does the classifier's top-1 class equal the class
the image was generated for?
"""

from __future__ import annotations

import torch
from torch import nn

from genq_core.filters._common import (
    FilterCanceled,
    check_batch_size,
    check_images,
    evaluating,
    index_batches,
    model_dtype,
    resolve_indices,
)
from genq_core.progress import ProgressFn, StopFn, check_stop

__all__ = ["classifier_logits", "energy_from_logits", "energy_scores", "label_agreement"]


@torch.no_grad()
def classifier_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    indices: torch.Tensor | None = None,
    stage: str = "filter:logits",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """The classifier's logits, batch by batch, in eval mode.

    Args:
        model: maps ``[B, C, H, W]`` to ``[B, K]`` logits; not modified (see ``evaluating``).
        images: ``[N, C, H, W]`` preprocessed images; may stay on the CPU, each batch is moved.
        indices: rows of ``images`` to score (default all), in the order of the result.
        stage: the name reported to ``on_progress(stage, done, total)`` (in images).

    Returns:
        float32 ``[len(indices), K]`` logits on the CPU.

    Raises:
        ValueError: bad images or batch size, or a model output that is not ``[B, K]``.
        FilterCanceled: ``should_stop()`` returned True between batches.
    """
    check_images(images)
    check_batch_size(batch_size)
    rows = resolve_indices(images.shape[0], indices)
    outputs: list[torch.Tensor] = []
    with evaluating(model, device) as net:
        dtype = model_dtype(net)
        target = torch.device(device)
        for batch in index_batches(rows, batch_size):
            check_stop(should_stop, stage, FilterCanceled)
            logits = net(images[batch].to(device=target, dtype=dtype))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else logits
                raise ValueError(f"the classifier must return [B, K] logits, got {shape}")
            outputs.append(logits.float().cpu())
            if on_progress is not None:
                on_progress(stage, sum(o.shape[0] for o in outputs), rows.numel())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def energy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``E = -T * logsumexp(logits / T)`` per row: ``[N, K]`` -> ``[N]``; lower is more in-distribution."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, K], got {tuple(logits.shape)}")
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def energy_scores(
    model: nn.Module,
    images: torch.Tensor,
    temperature: float = 1.0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    indices: torch.Tensor | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Free energy of each image under the full-precision classifier.

    Args:
        model: the unquantized classifier, ``[B, C, H, W]`` -> ``[B, K]`` logits.
        images: ``[N, C, H, W]`` images preprocessed for ``model``.
        temperature: ``T`` > 0; 1 is the usual choice.
        indices: rows to score (default all).

    Returns:
        float32 ``[len(indices)]`` energies on the CPU; lower means more in-distribution.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = classifier_logits(
        model,
        images,
        batch_size,
        device,
        indices=indices,
        stage="filter:energy",
        on_progress=on_progress,
        should_stop=should_stop,
    )
    return energy_from_logits(logits, temperature)


def label_agreement(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    indices: torch.Tensor | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Whether the classifier's top-1 class equals each image's label.

    Args:
        labels: ``[N]`` integer class of every row of ``images`` (the prompted class).
        indices: rows to check (default all).

    Returns:
        bool ``[len(indices)]`` on the CPU.
    """
    check_images(images)
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"labels must be [N] = [{images.shape[0]}] like the images, got {tuple(labels.shape)}"
        )
    rows = resolve_indices(images.shape[0], indices)
    logits = classifier_logits(
        model,
        images,
        batch_size,
        device,
        indices=rows,
        stage="filter:label_agreement",
        on_progress=on_progress,
        should_stop=should_stop,
    )
    if rows.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return logits.argmax(dim=1) == labels.cpu().long()[rows]
