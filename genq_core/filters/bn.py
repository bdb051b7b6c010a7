"""Filter 2 for BatchNorm models: each image's leave-one-out effect on the BN statistics.

Every BatchNorm layer ``l`` of the float classifier remembers the mean ``mu_run`` and variance
``var_run`` of its input channels over the training data. For a batch ``B`` of images, with
``mu_c(B)`` and ``var_c(B)`` the statistics of channel ``c`` of the layer's *input* over the
batch and all spatial positions (the statistics BN itself would compute in training mode),

    D_BN(B) = sum_l mean_c ( |mu_c(B) - mu_run_c| + |sigma_c(B) - sigma_run_c| ),
    sigma = sqrt(var + eps)   (``eps`` of that layer, as BN normalises),

and the sensitivity of image ``i`` in ``B`` is ``S_i = D_BN(B) - D_BN(B \\ {i})``: positive when
removing ``i`` brings the batch closer to the training statistics. The filter drops the images
with the highest ``S_i``. Channels are averaged (not summed) so that wide layers do not dominate.

Closed form, one forward pass per batch. With ``M`` spatial positions per image and, for every
image ``i`` and channel ``c``, the sums (taken around ``mu_run``, which leaves variances unchanged
and avoids cancellation; accumulated in float64)

    s_i = sum_hw (x_i - mu_run),   q_i = sum_hw (x_i - mu_run)^2,   S = sum_i s_i,  Q = sum_i q_i,

the whole batch (``n = |B| M`` values) has ``mu - mu_run = S / n`` and ``var = Q / n - (S / n)^2``,
and the batch without ``i`` (``n' = (|B| - 1) M`` values) has ``mu - mu_run = (S - s_i) / n'`` and
``var = (Q - q_i) / n' - ((S - s_i) / n')^2``. Variances are the biased (population) ones,
dividing by ``n`` and ``n'``, for both the batch and every leave-one-out batch; they are the
statistics BN normalises a training batch with, and they are defined for a single image.
(PyTorch accumulates ``running_var`` from unbiased batch variances; the factor ``n / (n - 1)``
between the two is negligible for the ``n = |B| M`` of a batch.)

Every ``_BatchNorm`` with running statistics counts (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
timm's ``BatchNormAct2d``); a layer called twice in one forward pass counts twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from genq_core.filters._common import (
    FilterCanceled,
    check_batch_size,
    check_images,
    evaluating,
    model_dtype,
    resolve_indices,
)
from genq_core.progress import ProgressFn, StopFn, check_stop

__all__ = ["bn_distance", "bn_sensitivity", "has_batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics (what the filter uses)."""
    return any(_tracks_stats(module) for module in model.modules())


@torch.no_grad()
def bn_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    shuffle_seed: int | None = 0,
    indices: torch.Tensor | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Leave-one-out BN-statistics sensitivity ``S_i`` of every image (see the module docstring).

    Images are split into batches of ``batch_size``; a last batch of a single image joins the one
    before it, since leaving its only image out leaves nothing to compare. Each batch runs through
    the model once, in eval mode, with hooks on the BN inputs; the hooks are removed afterwards,
    also on errors and cancellation.

    Args:
        model: the unfolded float classifier with BatchNorm layers; not modified.
        images: ``[N, C, H, W]`` preprocessed images, ``N >= 2`` (after ``indices``).
        batch_size: images per batch, >= 2. ``S_i`` depends on the batch ``i`` lands in, so
            compare scores across batches of similar size.
        shuffle_seed: batches are drawn from a permutation seeded with this, so that batches mix
            classes (generated sets are usually ordered by class); ``None`` keeps the order.
        indices: rows of ``images`` to score (default all).

    Returns:
        float32 ``[len(indices)]`` sensitivities on the CPU; higher = pushes its batch further from
        the training statistics = drop first.

    Raises:
        ValueError: a model without BatchNorm running statistics, fewer than 2 images, bad input.
        FilterCanceled: ``should_stop()`` returned True between batches.
    """
    # 1. check inputs
    check_images(images)
    check_batch_size(batch_size, minimum=2)
    if not has_batchnorm(model):
        raise ValueError("bn_sensitivity needs a model with BatchNorm running statistics")
    rows = resolve_indices(images.shape[0], indices)
    total = rows.numel()
    if total < 2:
        raise ValueError(f"bn_sensitivity needs at least 2 images, got {total}")

    # 2. batches of a seeded permutation, none of a single image
    order = torch.arange(total)
    if shuffle_seed is not None:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(shuffle_seed))
    batches = list(torch.split(order, batch_size))
    if batches[-1].numel() == 1:
        batches = [*batches[:-2], torch.cat(batches[-2:])]

    # 3. one forward per batch, collecting per-image sums; closed-form leave-one-out distances
    scores = torch.empty(total, dtype=torch.float64)
    with evaluating(model, device) as net:
        collector = _StatsCollector(net)
        try:
            dtype = model_dtype(net)
            done = 0
            for batch in batches:
                check_stop(should_stop, "bn_sensitivity", FilterCanceled)
                collector.clear()
                net(images[rows[batch]].to(device=device, dtype=dtype))
                if not collector.layers:
                    raise ValueError("no BatchNorm layer ran during the forward pass")
                per_layer = [_loo_sensitivity(layer) for layer in collector.layers]
                scores[batch] = torch.stack(per_layer).sum(dim=0).cpu()
                done += batch.numel()
                if on_progress is not None:
                    on_progress("filter:distribution", done, total)
        finally:
            collector.remove()
    return scores.float()


def bn_distance(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """``D_BN`` of the whole image set taken as one batch: how far it is from the training data.

    The statistics of every BN layer's input are accumulated over all images (in batches of
    ``batch_size`` for memory; the result does not depend on it), then compared with the running
    statistics as in the module docstring. Real training-distribution data scores low; it is the
    quantity the distribution filter lowers, so it tells whether a calibration set got closer.

    Args:
        model: the unfolded float classifier with BatchNorm layers; not modified.
        images: ``[N, C, H, W]`` preprocessed images, ``N >= 1``.
        batch_size: images per forward pass, >= 1.

    Raises:
        ValueError: a model without BatchNorm running statistics, or bad input.
    """
    check_images(images)
    check_batch_size(batch_size)
    if not has_batchnorm(model):
        raise ValueError("bn_distance needs a model with BatchNorm running statistics")
    totals: list[_LayerSums] = []
    with evaluating(model, device) as net:
        collector = _StatsCollector(net)
        try:
            dtype = model_dtype(net)
            for batch in torch.split(images, batch_size):
                collector.clear()
                net(batch.to(device=device, dtype=dtype))
                if not totals:
                    totals = [_summed(layer) for layer in collector.layers]
                    continue
                for total, layer in zip(totals, collector.layers, strict=True):
                    total.s += layer.s.sum(dim=0, keepdim=True)
                    total.q += layer.q.sum(dim=0, keepdim=True)
                    total.positions += layer.s.shape[0] * layer.positions
        finally:
            collector.remove()
    if not totals:
        raise ValueError("no BatchNorm layer ran during the forward pass")
    distance = 0.0
    for total in totals:
        sigma_run = torch.sqrt(total.running_var + total.eps)
        n = total.positions
        distance += float(_distance(total.s[0] / n, total.q[0] / n, sigma_run, total.eps))
    return distance


@dataclass
class _LayerSums:
    """Per-image, per-channel sums of one BN call: ``s, q`` are float64 ``[B, C]``."""

    s: torch.Tensor
    q: torch.Tensor
    positions: int
    running_var: torch.Tensor
    eps: float


@dataclass
class _StatsCollector:
    """Forward pre-hooks on every BN layer with running stats; one ``_LayerSums`` per call."""

    model: nn.Module
    layers: list[_LayerSums] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)

    def __post_init__(self) -> None:
        for module in self.model.modules():
            if _tracks_stats(module):
                self.handles.append(module.register_forward_pre_hook(self._hook))

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert module.running_mean is not None and module.running_var is not None
        x = inputs[0].detach().double()
        # [B, C, *spatial] -> [B, C, M]; BatchNorm1d on [B, C] has M = 1
        x = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)
        centered = x - module.running_mean.double()[None, :, None]
        self.layers.append(
            _LayerSums(
                s=centered.sum(dim=2),
                q=centered.square().sum(dim=2),
                positions=x.shape[2],
                running_var=module.running_var.double(),
                eps=float(module.eps),
            )
        )

    def clear(self) -> None:
        self.layers.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.layers.clear()


def _summed(layer: _LayerSums) -> _LayerSums:
    """``layer`` with its images summed: ``s, q`` ``[1, C]``, ``positions`` over all images."""
    return _LayerSums(
        s=layer.s.sum(dim=0, keepdim=True),
        q=layer.q.sum(dim=0, keepdim=True),
        positions=layer.s.shape[0] * layer.positions,
        running_var=layer.running_var,
        eps=layer.eps,
    )


def _loo_sensitivity(layer: _LayerSums) -> torch.Tensor:
    """``D_l(B) - D_l(B without i)`` for every image ``i`` of the batch: float64 ``[B]``."""
    images = layer.s.shape[0]
    sigma_run = torch.sqrt(layer.running_var + layer.eps)
    total_s, total_q = layer.s.sum(dim=0), layer.q.sum(dim=0)
    n = images * layer.positions
    whole = _distance(total_s / n, total_q / n, sigma_run, layer.eps)  # scalar
    n_loo = (images - 1) * layer.positions
    loo = _distance((total_s - layer.s) / n_loo, (total_q - layer.q) / n_loo, sigma_run, layer.eps)
    return whole - loo


def _distance(
    mean_offset: torch.Tensor, mean_square: torch.Tensor, sigma_run: torch.Tensor, eps: float
) -> torch.Tensor:
    """``mean_c |mu - mu_run| + |sigma - sigma_run|`` from moments taken around ``mu_run``.

    ``mean_offset = mu - mu_run`` and ``mean_square = E[(x - mu_run)^2]``, both ``[..., C]``.
    """
    variance = (mean_square - mean_offset.square()).clamp_min(0.0)
    sigma = torch.sqrt(variance + eps)
    return (mean_offset.abs() + (sigma - sigma_run).abs()).mean(dim=-1)


def _tracks_stats(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.running_mean is not None
        and module.running_var is not None
    )
