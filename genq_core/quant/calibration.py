"""Range estimation for quantizers: min-max, percentile and MSE search.

Pure functions over tensors, plus :class:`ActivationObserver`, which accumulates what an activation
quantizer sees over a calibration set (its exact min and max and a bounded random sample of values)
so that percentile and MSE calibration work without holding every activation in memory.
"""

from __future__ import annotations

import torch

from genq_core.quant.functional import fake_quantize, qparams_from_range, quant_range

__all__ = [
    "CALIBRATION_METHODS",
    "ActivationObserver",
    "minmax_range",
    "mse_range",
    "percentile_range",
]

CALIBRATION_METHODS = ("minmax", "percentile", "mse")

_MSE_NORM = 2.4  # the exponent the BRECQ/QDrop reference uses for its range search
_MSE_STEPS = 80


def minmax_range(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact min and max of ``x``, per channel along ``axis`` (``[C]``) or per tensor (``[1]``)."""
    flat = _channels_first(x, axis)
    return flat.amin(dim=1), flat.amax(dim=1)


def percentile_range(
    x: torch.Tensor, percentile: float, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(100 - percentile)``-th and ``percentile``-th percentiles of ``x``, clipping outliers.

    Args:
        percentile: in ``(50, 100]``; 99.99 keeps all but one value in ten thousand on each side.
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    flat = _channels_first(x, axis).float()
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=flat.device)
    bounds = torch.quantile(flat, q, dim=1)
    return bounds[0], bounds[1]


def mse_range(
    x: torch.Tensor, bits: int, symmetric: bool, signed: bool, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range that minimises the ``L_2.4`` quantization error of ``x`` (grid search).

    Shrinks the min-max range by factors from 1.0 down to 0.2 and keeps, per channel, the factor
    with the smallest error.
    """
    flat = _channels_first(x, axis).float()
    x_min, x_max = flat.amin(dim=1), flat.amax(dim=1)
    quant_min, quant_max = quant_range(bits, signed)
    best_err = torch.full_like(x_min, float("inf"))
    best_min, best_max = x_min.clone(), x_max.clone()
    for step in range(_MSE_STEPS + 1):
        factor = 1.0 - step / _MSE_STEPS * 0.8
        cand_min, cand_max = x_min * factor, x_max * factor
        scale, zero_point = qparams_from_range(cand_min, cand_max, bits, symmetric, signed)
        x_hat = fake_quantize(flat, scale, zero_point, quant_min, quant_max, axis=0)
        err = (x_hat - flat).abs().pow(_MSE_NORM).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min = torch.where(better, cand_min, best_min)
        best_max = torch.where(better, cand_max, best_max)
    return best_min, best_max


class ActivationObserver:
    """Accumulates an activation's exact range and a bounded random sample of its values.

    Args:
        max_samples: how many values to keep in total (uniformly sampled across batches).
        generator: source of randomness for the sample, for reproducible calibration.
    """

    def __init__(self, max_samples: int = 1 << 20, generator: torch.Generator | None = None):
        if max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        self.max_samples = max_samples
        self.generator = generator
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        """Record one batch of activations (any shape)."""
        if not torch.isfinite(x).all():
            raise ValueError("activation contains NaN or Inf values; check the calibration data")
        values = x.detach().flatten().float()
        batch_min, batch_max = values.min().reshape(1), values.max().reshape(1)
        self.min = batch_min if self.min is None else torch.minimum(self.min, batch_min)
        self.max = batch_max if self.max is None else torch.maximum(self.max, batch_max)
        per_batch = min(values.numel(), max(self.max_samples // 16, 1))
        index = torch.randperm(values.numel(), generator=self.generator)[:per_batch]
        self._samples.append(values[index.to(values.device)].cpu())

    @property
    def empty(self) -> bool:
        return self.min is None

    def samples(self) -> torch.Tensor:
        """The kept values as one ``[1, K]`` tensor (``K <= max_samples``)."""
        if self.empty:
            raise RuntimeError("observer saw no data")
        values = torch.cat(self._samples)
        if values.numel() > self.max_samples:
            index = torch.randperm(values.numel(), generator=self.generator)[: self.max_samples]
            values = values[index]
        return values.reshape(1, -1)


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``[C, K]`` view with channels along dim 0 (``C = 1`` for per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, axis % x.dim()).reshape(x.shape[axis], -1)
