"""Filter 2 for vision transformers without BatchNorm: patch-similarity entropy (PSAQ-ViT).

PSAQ-ViT (Li et al., 2022) observed that a ViT's self-attention responds to real images with
patch features whose pairwise similarities are spread out, and to noise or flat images with
similarities piled up in a narrow range. For each image and each transformer block ``l``:

1. ``F_l``: the block's output tokens, patch tokens only (class, distillation and register tokens
   dropped). PSAQ-ViT reads the self-attention output instead; the block output carries the
   same patch dependence plus each token's own input, works for every timm block type (fused
   ones too) and still separates inputs when attention is nearly uniform.
2. ``s_jk = cos(F_l[j], F_l[k])`` for every pair of patches ``j < k``.
3. A Gaussian kernel density estimate of the ``s_jk`` with bandwidth ``h``, evaluated on
   ``grid_size`` points spanning ``[-1, 1]``. Pairs are linearly binned onto the grid first
   ("binned KDE"), so the cost is ``O(pairs + grid_size^2)`` per image, not ``pairs * grid_size``.
4. Its differential entropy ``H_l = -integral f log f``, approximated on the grid after
   renormalising ``f`` to integrate to 1 over ``[-1, 1]``.

The score is ``sum_l H_l``; higher means more diverse patch interactions = keep. A density that
collapses onto one value scores about ``L * log(h * sqrt(2 pi e))``, one spread evenly over
``[-1, 1]`` at most ``L * log 2``.
"""

from __future__ import annotations

import torch
from timm.models import vision_transformer as timm_vit
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

__all__ = ["TRANSFORMER_BLOCK_TYPES", "is_vit_like", "patch_similarity_entropy"]

TRANSFORMER_BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    timm_vit.Block,
    timm_vit.ResPostBlock,
    timm_vit.ParallelScalingBlock,
    timm_vit.ParallelThingsBlock,
)
"""Blocks whose token features the filter reads (timm's ViT, DeiT and relatives)."""


def is_vit_like(model: nn.Module) -> bool:
    """Whether ``model`` has transformer blocks of :data:`TRANSFORMER_BLOCK_TYPES`."""
    return bool(_feature_modules(model))


@torch.no_grad()
def patch_similarity_entropy(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    bandwidth: float = 0.05,
    grid_size: int = 201,
    indices: torch.Tensor | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Patch-similarity entropy of every image, summed over blocks (see the module docstring).

    Args:
        model: a ViT-like classifier (:func:`is_vit_like`); not modified.
        images: ``[N, C, H, W]`` images preprocessed for ``model``.
        bandwidth: the KDE's Gaussian bandwidth ``h`` on the cosine-similarity axis, > 0.
        grid_size: points of the evaluation grid over ``[-1, 1]``, >= 3.
        indices: rows to score (default all).

    Returns:
        float32 ``[len(indices)]`` entropies in nats on the CPU; higher = more diverse = keep.

    Raises:
        ValueError: a model without transformer blocks, fewer than 2 patch tokens, bad input.
        FilterCanceled: ``should_stop()`` returned True between batches.
    """
    # 1. check inputs
    check_images(images)
    check_batch_size(batch_size)
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    if not isinstance(grid_size, int) or grid_size < 3:
        raise ValueError(f"grid_size must be an integer >= 3, got {grid_size!r}")
    if not is_vit_like(model):
        raise ValueError(
            "patch_similarity_entropy needs a ViT-like model with timm transformer blocks"
        )
    rows = resolve_indices(images.shape[0], indices)
    scores = torch.empty(rows.numel(), dtype=torch.float32)

    with evaluating(model, device) as net:
        # 2. hooks that turn each block's token features into one entropy per image
        prefix = _prefix_tokens(net)
        entropies: list[torch.Tensor] = []

        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() != 3:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else output
                raise ValueError(
                    f"{type(module).__name__} must output [B, tokens, dim] features, got {shape}"
                )
            entropies.append(_similarity_entropy(output[:, prefix:], bandwidth, grid_size))

        handles = [module.register_forward_hook(hook) for module in _feature_modules(net)]

        # 3. one forward per batch
        try:
            dtype = model_dtype(net)
            done = 0
            for batch in index_batches(rows, batch_size):
                check_stop(should_stop, "patch_similarity_entropy", FilterCanceled)
                entropies.clear()
                net(images[batch].to(device=device, dtype=dtype))
                positions = slice(done, done + batch.numel())
                scores[positions] = torch.stack(entropies).sum(dim=0).float().cpu()
                done += batch.numel()
                if on_progress is not None:
                    on_progress("filter:distribution", done, rows.numel())
        finally:
            for handle in handles:
                handle.remove()
    return scores


def _similarity_entropy(tokens: torch.Tensor, bandwidth: float, grid_size: int) -> torch.Tensor:
    """Entropy of the KDE of pairwise cosine similarities: ``[B, T, D]`` -> float64 ``[B]``."""
    count = tokens.shape[1]
    if count < 2:
        raise ValueError(f"patch similarity needs at least 2 patch tokens, got {count}")
    features = nn.functional.normalize(tokens.double(), dim=-1)
    similarity = features @ features.transpose(1, 2)
    upper = torch.triu_indices(count, count, offset=1, device=tokens.device)
    values = similarity[:, upper[0], upper[1]].clamp(-1.0, 1.0)  # [B, pairs]

    # linear binning onto the grid: each value splits its weight between its two grid neighbours
    step = 2.0 / (grid_size - 1)
    position = (values + 1.0) / step
    lower = position.floor().long().clamp(0, grid_size - 2)
    upper_weight = position - lower
    counts = torch.zeros(values.shape[0], grid_size, dtype=torch.float64, device=values.device)
    counts.scatter_add_(1, lower, 1.0 - upper_weight)
    counts.scatter_add_(1, lower + 1, upper_weight)

    # Gaussian smoothing on the grid, renormalised to a density over [-1, 1]
    grid = torch.linspace(-1.0, 1.0, grid_size, dtype=torch.float64, device=values.device)
    kernel = torch.exp(-0.5 * ((grid[:, None] - grid[None, :]) / bandwidth).square())
    density = counts @ kernel
    density = density / (density.sum(dim=1, keepdim=True) * step)
    mass = density * step
    return -(mass * torch.log(density.clamp_min(1e-300))).sum(dim=1)


def _feature_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, TRANSFORMER_BLOCK_TYPES)]


def _prefix_tokens(model: nn.Module) -> int:
    """Class/distillation/register tokens ahead of the patches (timm's ``num_prefix_tokens``)."""
    for module in model.modules():
        prefix = getattr(module, "num_prefix_tokens", None)
        if isinstance(prefix, int) and not isinstance(prefix, bool):
            return prefix
    return 0
